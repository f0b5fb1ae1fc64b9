"""Core API contexts for local runs, layered on Determined's own off-cluster ("dummy") contexts.

`det.core.init()` off a cluster already gives real checkpoint storage (a shared-fs storage manager)
and a distributed context. What it lacks is the master's bookkeeping, which these subclasses add:
metrics go to `metrics.jsonl` and TensorBoard; finished checkpoints are registered in
`checkpoints.jsonl` and garbage-collected by the experiment's retention policy; SIGTERM/SIGINT act
like a Determined preemption.
"""

import json
import logging
import math
import shutil
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional

from determined import core


logger = logging.getLogger(__name__)


class LocalTrainContext(core.DummyTrainContext):
    """Writes every report_metrics() call to metrics.jsonl and TensorBoard (chief only)."""

    def __init__(self, metrics_path: Path, tensorboard_dir: Path) -> None:
        super().__init__(tensorboard_path=tensorboard_dir)
        self.metrics_path = Path(metrics_path)
        self._writer = None
        self.validation: Dict[int, Dict[str, Any]] = {}
        self.purge_step: Optional[int] = None  # set on resume: TensorBoard drops its older events from this step on

    def _report_trial_metrics(self, group: str, steps_completed: int, metrics: Dict[str, Any],
                              batch_metrics: Optional[List[Dict[str, Any]]] = None) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        row = {"group": group, "steps_completed": steps_completed, **metrics}
        if group == "validation":
            self.validation[steps_completed] = metrics
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step is TensorBoard's own way to forget what an interrupted run logged after its checkpoint
            self._writer = SummaryWriter(str(self._tbd_directory), purge_step=self.purge_step)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{group}/{key}", value, steps_completed)
        self._writer.flush()

    def report_progress(self, progress: float) -> None:
        logger.debug("progress %.0f%%", 100 * progress)


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Replace the file atomically: a crash leaves the old version, never half of a new one."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def truncate_metrics(metrics_path: Path, steps_completed: int) -> None:
    """Drop rows reported after the checkpoint we resume from, as the master does on a restart."""
    if Path(metrics_path).exists():
        write_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r["steps_completed"] <= steps_completed])


def latest_checkpoint(registry_path: Path) -> Optional[Dict[str, Any]]:
    """The registered checkpoint with the most steps (the last registered wins a tie)."""
    rows = read_jsonl(registry_path)
    return max(reversed(rows), key=lambda r: r["steps_completed"]) if rows else None


def abort_message(registry_path: Path) -> str:
    """One line for a run aborted by a second Ctrl-C: what a rerun resumes from."""
    latest = latest_checkpoint(registry_path)
    if latest is None:
        return "aborted: no checkpoint saved; a rerun starts from step 0"
    return f"aborted: no checkpoint saved after step {latest['steps_completed']}; a rerun resumes from there"


class LocalCheckpointContext(core.DummyCheckpointContext):
    """Registers finished checkpoints and applies the experiment's retention policy.

    An upload only counts once every rank has finished it and the chief reports it, exactly where
    the master would be told, so a process killed mid-upload leaves an unregistered directory that
    resuming ignores.
    """

    def __init__(self, dist: core.DistributedContext, storage_manager, registry_path: Path,
                 train: LocalTrainContext, searcher: Dict[str, Any], storage_config: Dict[str, Any]) -> None:
        super().__init__(dist, storage_manager)
        self.registry_path = Path(registry_path)
        self._train = train
        self._metric = searcher.get("metric")
        self._smaller_is_better = searcher.get("smaller_is_better", True)
        self._keep_latest = _count(storage_config, "save_trial_latest", 1)
        self._keep_best = max(_count(storage_config, "save_trial_best", 1),
                              _count(storage_config, "save_experiment_best", 0))

    def _report_checkpoint(self, storage_id: str, resources: Optional[Dict[str, int]] = None,
                           metadata: Optional[Dict[str, Any]] = None) -> None:
        steps = (metadata or {}).get("steps_completed", 0)
        value = self._train.validation.get(steps, {}).get(self._metric) if self._metric else None
        rows = read_jsonl(self.registry_path) + [
            {"storage_id": storage_id, "steps_completed": steps, "searcher_metric": value}]
        self.registry_path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.registry_path, rows)
        logger.info("checkpoint %s saved at step %d", storage_id, steps)
        self.collect_garbage()

    def collect_garbage(self) -> None:
        rows = read_jsonl(self.registry_path)
        keep = {r["storage_id"] for r in sorted(rows, key=lambda r: r["steps_completed"])[-self._keep_latest:]}
        if not self._keep_latest:
            keep = set()
        scored = [r for r in rows if r["searcher_metric"] is not None]
        scored.sort(key=lambda r: r["searcher_metric"], reverse=not self._smaller_is_better)
        keep |= {r["storage_id"] for r in scored[:self._keep_best]}
        keep.add(latest_checkpoint(self.registry_path)["storage_id"])  # never delete what we resume from
        for row in rows:
            if row["storage_id"] not in keep:
                self._storage_manager.delete(row["storage_id"], ["**/*"])
        write_jsonl(self.registry_path, [r for r in rows if r["storage_id"] in keep])


def _count(storage_config: Dict[str, Any], key: str, default: int) -> int:
    value = storage_config.get(key)
    return default if value is None else int(value)


class SignalPreemptContext(core.DummyPreemptContext):
    """Treat SIGTERM/SIGINT like the master's preemption signal; a second SIGINT aborts.

    Ranks started by our torchrun re-launch are told through `flag_file` instead: the launcher
    runs in its own session, so a signal meant for the job never reaches torchrun, which would
    otherwise kill the ranks 30 s later, mid-save.
    """

    def __init__(self, dist: core.DistributedContext, flag_file: Optional[Path] = None) -> None:
        super().__init__(dist, core.PreemptMode.WorkersAskChief)
        self.signalled = False
        self.flag_file = Path(flag_file) if flag_file else None
        self._previous = {}

    def start(self) -> "SignalPreemptContext":
        super().start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = True
        if self._dist.rank == 0:
            logger.warning("%s received: saving a checkpoint at the next step boundary, then exiting "
                           "(press Ctrl-C again to abort without saving)", signal.Signals(signum).name)

    def should_preempt(self, auto_ack: bool = True) -> bool:
        # Only the chief's answer counts, and it is broadcast, so all ranks stop at the same step
        # even when the signal reaches them at slightly different times.
        answer = None
        if self._dist.rank == 0:
            answer = self.signalled or bool(self.flag_file and self.flag_file.exists())
        return bool(answer if self._dist.size == 1 else self._dist.broadcast(answer))


def start_over(job) -> None:
    """--fresh: forget this experiment's checkpoints, metrics and comparison report (and only this experiment's).
    job: a runtime.Job."""
    if job.checkpoint_dir == job.run_dir / "checkpoints":
        remove(job.checkpoint_dir)  # our own directory
    else:  # storage named by the YAML may hold other experiments' checkpoints too
        for row in read_jsonl(job.registry_path):
            remove(job.checkpoint_dir / row["storage_id"])
    for stale in (job.registry_path, job.metrics_path, job.tensorboard_dir, job.run_dir / "flags.json",
                  job.run_dir / "comparison"):
        remove(stale)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
