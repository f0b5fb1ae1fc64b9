"""Where a run happens: on a Determined cluster, or locally from the same experiment YAML.

Cluster: the master started us (`det.get_cluster_info()` is set); hyperparameters come from the trial,
the launcher decides the distributed context, and `det.core.init()` talks to the master.

Local: `python run_clm.py --config EXPERIMENT.yaml [overrides]`. We do the master's part for one
trial: read the YAML, start `slots_per_trial` processes under torchrun (swallow_ft/launch.py), keep checkpoints in real
Core API storage under runs/<name>/checkpoints, and resume from the newest one on the next run.
"""

import argparse
import logging
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import determined as det

from swallow_ft import arguments
from swallow_ft.arguments import flag_value, given_fields, parse_input_arguments, split_equals, without_deepspeed
from swallow_ft.errors import UserError
from swallow_ft.experiment import Experiment
from swallow_ft.local_core import (
    LocalCheckpointContext,
    LocalTrainContext,
    SignalPreemptContext,
    abort_message,
    latest_checkpoint,
    remove,
    start_over,
    truncate_metrics,
)
from swallow_ft.launch import LAUNCHED_ENV, PORTS_ENV, PREEMPT_FILE_ENV, die_with_parent, without_fresh
from swallow_ft.preflight import startup_checks
from swallow_ft.run_record import check_same_run

logger = logging.getLogger(__name__)
is_chief_process = arguments.is_chief_process  # run_clm.py's name for it


@dataclass
class Job:
    """Everything main() needs besides the model: parsed arguments and where things go.

    A local launcher process (which only starts the ranks) has no parsed arguments.
    """

    model_args: Any = None
    data_args: Any = None
    training_args: Any = None
    cluster_info: Optional[det.ClusterInfo] = None
    experiment: Optional[Experiment] = None
    run_dir: Optional[Path] = None
    checkpoint_dir: Optional[Path] = None
    latest_checkpoint: Optional[str] = None
    argv: List[str] = field(default_factory=list)  # run_clm.py's arguments, for the resume command

    @property
    def is_local(self) -> bool:
        return self.cluster_info is None

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    @property
    def registry_path(self) -> Path:
        return self.run_dir / "checkpoints.jsonl"


@dataclass
class LocalCommand:
    config: Optional[Path]
    fresh: bool
    runs_dir: Path
    overrides: List[str] = field(default_factory=list)


# ----- the cluster ------------------------------------------------------------------------------
def prepare_cluster(info: det.ClusterInfo, argv: Sequence[str]) -> Job:
    model_args, data_args, training_args = parse_input_arguments(info.trial.hparams, argv)
    # The trials of an experiment share its --output_dir, and containers on one node may share /tmp (Slurm and PBS
    # with Singularity or Apptainer bind it from the host): a folder per trial keeps their checkpoints apart.
    training_args.output_dir = os.path.join(training_args.output_dir, f"trial-{info.trial.trial_id}")
    return Job(model_args, data_args, training_args, cluster_info=info)


def distributed_context() -> Optional[det.core.DistributedContext]:
    """The launcher's process layout as a Determined DistributedContext (None for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if "CROSS_RANK" in os.environ:  # set by the deepspeed launcher, not by torchrun
        return det.core.DistributedContext.from_deepspeed()
    if PORTS_ENV in os.environ:  # our local relaunch: Determined's fixed ports would clash with another local run
        pub_port, pull_port = map(int, os.environ[PORTS_ENV].split(","))
        env = {key: int(os.environ[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                       "GROUP_RANK", "GROUP_WORLD_SIZE")}
        return det.core.DistributedContext(
            rank=env["RANK"], size=env["WORLD_SIZE"], local_rank=env["LOCAL_RANK"], local_size=env["LOCAL_WORLD_SIZE"],
            cross_rank=env["GROUP_RANK"], cross_size=env["GROUP_WORLD_SIZE"], chief_ip="127.0.0.1",
            pub_port=pub_port, pull_port=pull_port)
    return det.core.DistributedContext.from_torch_distributed()


# ----- local ------------------------------------------------------------------------------------
def parse_local_command(argv: Sequence[str]) -> LocalCommand:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--runs_dir", type=Path, default=Path("runs"))
    known, overrides = parser.parse_known_args(list(argv))
    return LocalCommand(known.config, known.fresh, known.runs_dir, overrides)


def local_default_flags() -> List[str]:
    import torch

    if torch.cuda.is_available():
        return []
    # HF computes world_size=1 on CPU unless use_cpu is set, and NCCL needs GPUs.
    flags = ["--use_cpu", "true"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        flags += ["--ddp_backend", "gloo"]
    return flags


def local_flags(cmd: LocalCommand, experiment: Optional[Experiment], run_dir: Path) -> List[str]:
    """Entrypoint flags, then the YAML's training_arguments, then our scratch dir, then overrides."""
    flags = local_default_flags()
    if experiment is not None:
        flags += experiment.flags(cmd.overrides)
    # output_dir is scratch space, as in a trial container: checkpoints live in the storage dir.
    return flags + ["--output_dir", str(run_dir / "output")] + split_equals(cmd.overrides)


def needs_launcher(experiment: Optional[Experiment], flags: Sequence[str]) -> bool:
    slots = experiment.slots_per_trial if experiment else 1
    return slots > 1 or "deepspeed" in given_fields(flags)


def prepare_local(argv: Sequence[str], launched: bool) -> Job:
    cmd = parse_local_command(argv)
    if cmd.config is None and not cmd.overrides:
        raise UserError("nothing to run: try python run_clm.py --config experiments/local_tiny.yaml "
                        "(or pass run_clm.py's flags; --help lists them)")
    experiment = Experiment.load(cmd.config) if cmd.config else None
    name = experiment.name if experiment else "run_clm"
    run_dir = cmd.runs_dir / name
    checkpoint_dir = experiment.local_checkpoint_dir(cmd.runs_dir) if experiment else run_dir / "checkpoints"
    if experiment and experiment.cluster_only_storage():
        logger.warning("%s: checkpoint_storage type %s is for the cluster; local checkpoints go to %s",
                       experiment.path, experiment.cluster_only_storage(), checkpoint_dir)
    flags = local_flags(cmd, experiment, run_dir)
    job = Job(experiment=experiment, run_dir=run_dir, checkpoint_dir=checkpoint_dir)
    launcher = not launched and needs_launcher(experiment, flags)
    # Everything that can refuse the flags, data or model comes before the run directory is touched: --fresh deletes
    # its checkpoints, and a mistake must not cost them.
    parsed = _parse_and_check(flags, experiment, launcher)
    if not launched:
        # Only the first process touches the run directory: children find it ready.
        check_gpus(job, flags)
        if cmd.fresh:
            read_inputs(*parsed)
            start_over(job)
        remove(run_dir / "output")
        check_same_run(job.run_dir, job.registry_path, flags, parsed)
    if not launcher:
        job.model_args, job.data_args, job.training_args = parsed
        latest = latest_checkpoint(job.registry_path)
        job.latest_checkpoint = latest["storage_id"] if latest else None
    return job


def _parse_and_check(flags: List[str], experiment: Optional[Experiment], launcher: bool) -> tuple:
    from swallow_ft.data.loading import builder_for
    from swallow_ft.model import check_local_model_path

    if launcher:
        # Fail fast, before starting N processes: everything but DeepSpeed's own set-up, which needs them.
        parsed = parse_input_arguments({}, without_deepspeed(flags))
        parsed[2].deepspeed = flag_value(flags, "--deepspeed")
        startup_checks(*parsed, world_size=experiment.slots_per_trial if experiment else 1)
    else:
        parsed = parse_input_arguments({}, flags)
        startup_checks(*parsed)
    # A path not there is caught here; what is in the files is read by the run itself (or first, by read_inputs).
    model_args, data_args, _ = parsed
    for name in filter(None, (model_args.tokenizer_name, model_args.model_name_or_path)):
        check_local_model_path(name)
    if not data_args.dataset_name:
        for path, flag in ((data_args.train_file, "--train_file"), (data_args.validation_file, "--validation_file")):
            if path:
                builder_for(path, flag)
    return parsed


def check_gpus(job: Job, flags: List[str]) -> None:
    """Local ranks each take a GPU when there are GPUs: more ranks than GPUs fail in NCCL after the weights load."""
    import torch

    ranks = job.experiment.slots_per_trial if job.experiment else 1
    if ranks > 1 and torch.cuda.is_available() and ranks > torch.cuda.device_count() \
            and "use_cpu" not in given_fields(flags):
        raise UserError(f"{job.experiment.path}: slots_per_trial is {ranks} but this machine has "
                        f"{torch.cuda.device_count()} GPU(s): pass --use_cpu true --ddp_backend gloo to run the ranks "
                        "on the CPU, or lower slots_per_trial")


def read_inputs(model_args, data_args, training_args) -> None:
    """Read what could still refuse the run after it starts: the tokenizer, the model's config and every data row.
    --fresh does this before deleting anything; the datasets cache keeps the tokens for the run itself."""
    from transformers import AutoConfig

    from swallow_ft.data import build_datasets
    from swallow_ft.model import from_pretrained, load_tokenizer

    tokenizer = load_tokenizer(model_args)
    from_pretrained(AutoConfig.from_pretrained, model_args.model_name_or_path, cache_dir=model_args.cache_dir,
                    revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code)
    build_datasets(data_args, training_args, tokenizer, model_args.model_name_or_path, cache_dir=model_args.cache_dir)


@contextmanager
def core_context(job: Job) -> Iterator[det.core.Context]:
    """det.core.init() for the job; locally with the master's bookkeeping done by local_core."""
    distributed = distributed_context()
    if not job.is_local:
        with det.core.init(distributed=distributed) as context:
            yield context
        return
    # The Trainer already prints every metric; Determined's echo of each report is noise locally.
    logging.getLogger("determined.core").setLevel(logging.WARNING)
    context = det.core.init(distributed=distributed, checkpoint_storage=str(job.checkpoint_dir.resolve()))
    context.train = LocalTrainContext(job.metrics_path, job.tensorboard_dir)
    experiment_config = job.experiment.config if job.experiment else {}
    context.checkpoint = LocalCheckpointContext(
        context.distributed, context.checkpoint._storage_manager, job.registry_path, context.train,
        searcher=experiment_config.get("searcher") or {},
        storage_config=experiment_config.get("checkpoint_storage") or {})
    context.preempt = SignalPreemptContext(context.distributed, flag_file=os.environ.get(PREEMPT_FILE_ENV))
    if job.latest_checkpoint and context.distributed.rank == 0:
        resumed_at = latest_checkpoint(job.registry_path)["steps_completed"]
        truncate_metrics(job.metrics_path, resumed_at)
        context.train.purge_step = resumed_at + 1
    elif context.distributed.rank == 0:  # nothing to resume: what an earlier, killed attempt reported is void
        remove(job.metrics_path)
        remove(job.tensorboard_dir)
    try:
        with context:
            yield context
    except KeyboardInterrupt:  # SignalPreemptContext's second Ctrl-C: the user chose to lose the unsaved steps
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):  # the Trainer's, left open, redraws itself at exit
            bar.close()
        print(abort_message(job.registry_path), file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None


def prepare(argv: Sequence[str]) -> Job:
    info = det.get_cluster_info()
    if info is not None:
        if info.task_type != "TRIAL":
            raise UserError(f"run_clm.py runs as a Determined trial (det experiment create), not as a {info.task_type}")
        job = prepare_cluster(info, argv)
    else:
        launched = os.environ.get(LAUNCHED_ENV) == "1"
        if launched:
            # A second Ctrl-C kills torchrun outright, and torchrun puts each rank in a session of its own, out of
            # reach of that kill: a rank must not outlive it (and go on to save) when the user aborted.
            die_with_parent(signal.SIGKILL)
        job = prepare_local(argv, launched=launched)
    job.argv = list(argv)
    if job.training_args is not None:
        if not job.is_local:  # prepare_local checked before touching the run directory
            startup_checks(job.model_args, job.data_args, job.training_args)
        if job.training_args.deepspeed:
            join_deepspeed_comm(job.training_args)
    return job


def join_deepspeed_comm(training_args) -> None:
    """Make deepspeed.comm use the process group the Trainer's arguments already created.

    On CPU (use_cpu + gloo) accelerate sets up torch.distributed itself, and DeepSpeed's zero.Init
    then sees world_size 1 and fails its batch-size check unless deepspeed.comm joins that group.
    """
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=training_args.ddp_backend or "nccl")


def print_summary(summary: Dict[str, Any], job: Job) -> None:
    def loss(value):
        return "n/a" if value is None else f"{value:.4f}"

    tokens = summary["tokens_per_second"]
    where = (f"{job.checkpoint_dir}/{summary['checkpoint']}" if job.is_local and summary["checkpoint"]
             else summary["checkpoint"] or "none saved")
    lines = [
        "",
        f"{'Preempted' if summary['preempted'] else 'Finished'} at step {summary['steps_completed']}",
        f"  eval_loss   first {loss(summary['first_eval_loss'])}  ->  last {loss(summary['last_eval_loss'])}",
        f"  checkpoint  {where}",
        f"  throughput  {'nothing trained' if tokens is None else f'{tokens:,.0f} tokens/s'}"
        + ("" if tokens is None else " (non-padding, training steps only)"),
    ]
    if job.is_local:
        lines.append(f"  metrics     {job.metrics_path}  (tensorboard --logdir {job.tensorboard_dir})")
        if summary["preempted"]:
            again = " ".join(without_fresh(job.argv))
            lines.append(f"  resume      rerun without --fresh: python run_clm.py {again}")
    print("\n".join(lines), flush=True)
