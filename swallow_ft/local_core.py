"""Core API contexts for local runs, layered on Determined's own off-cluster ("dummy") contexts.

`det.core.init()` off a cluster already gives real checkpoint storage (a shared-fs storage manager)
and a distributed context; what it lacks is somewhere to put metrics and a way to be preempted.
These two subclasses add that: metrics go to `metrics.jsonl` and TensorBoard, and SIGTERM/SIGINT
act like a Determined preemption.
"""

import json
import logging
import math
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional

from determined import core

logger = logging.getLogger("swallow_ft.local")


class LocalTrainContext(core.DummyTrainContext):
    """Writes every report_metrics() call to metrics.jsonl and TensorBoard (chief only)."""

    def __init__(self, metrics_path: Path, tensorboard_dir: Path) -> None:
        super().__init__(tensorboard_path=tensorboard_dir)
        self.metrics_path = Path(metrics_path)
        self._writer = None

    def _report_trial_metrics(self, group: str, steps_completed: int, metrics: Dict[str, Any],
                              batch_metrics: Optional[List[Dict[str, Any]]] = None) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        row = {"group": group, "steps_completed": steps_completed, **metrics}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self._tbd_directory))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(f"{group}/{key}", value, steps_completed)
        self._writer.flush()

    def report_progress(self, progress: float) -> None:
        logger.debug("progress %.0f%%", 100 * progress)


def truncate_metrics(metrics_path: Path, steps_completed: int) -> None:
    """Drop rows reported after the checkpoint we resume from, as the master does on a restart."""
    path = Path(metrics_path)
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["steps_completed"] <= steps_completed]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


class SignalPreemptContext(core.DummyPreemptContext):
    """Treat SIGTERM/SIGINT like the master's preemption signal; a second SIGINT aborts."""

    def __init__(self, dist: core.DistributedContext) -> None:
        super().__init__(dist, core.PreemptMode.WorkersAskChief)
        self.signalled = False
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
        if self._dist.size == 1:
            return self.signalled
        return bool(self._dist.broadcast(self.signalled if self._dist.rank == 0 else None))
