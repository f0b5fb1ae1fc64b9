"""Where a checkpoint is, what it holds, and which base it was trained from; shared by export and compare.

A source is a `checkpoint-N` directory, a Determined checkpoint directory (metadata.json + checkpoint-N/), a local run
directory (its latest registered checkpoint), a UUID with --storage DIR, or on a cluster a checkpoint UUID or
`best:<experiment id>`. A cluster checkpoint is downloaded without what only resuming training reads (global_step*/
ZeRO and optimizer shards: ~1 TB beside the ~140 GB of weights of a 70B full fine-tuning); the shards follow only
when the saved weights are empty and must be rebuilt from them.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from safetensors import safe_open

from swallow_ft import REPO_ROOT
from swallow_ft.checkpoints import saved_by_trial
from swallow_ft.errors import UserError
from swallow_ft.local_core import latest_checkpoint

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STEP_RE = re.compile(r"^(?:checkpoint-|global_step)(\d+)$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RUN_FILES = ("checkpoints.jsonl", "checkpoints", "flags.json", "metrics.jsonl")  # what a local run writes
# Paths relative to the Determined checkpoint, as its storage lists them (directories end with "/").
ZERO_SHARDS = re.compile(r"(?:^|/)global_step\d+/")
TRAINING_STATE = re.compile(r"(?:^|/)(?:global_step\d+/|optimizer\.pt$|scheduler\.pt$|rng_state[^/]*\.pth$)")


class CheckpointRef(NamedTuple):
    """A resolved checkpoint: its local checkpoint-N directory and, when known, its Determined UUID and the trial
    that saved it (a search's best checkpoint need not come from its first trial)."""
    path: Path
    uuid: Optional[str] = None
    trial_id: Optional[int] = None

    def describe(self, with_path: bool = True) -> str:
        known = [f"UUID {self.uuid}"] * bool(self.uuid) + [f"trial {self.trial_id}"] * (self.trial_id is not None)
        if not with_path:
            return ", ".join(known + [self.path.name])
        return f"{self.path}" + (f" ({', '.join(known)})" if known else "")


def locate_checkpoint(source: str, storage: Optional[str] = None, download_dir: Optional[Path] = None,
                      flag: str = "", rebuild_full: bool = True) -> CheckpointRef:
    """The checkpoint SOURCE names (downloaded first if it is on a cluster). flag: the option SOURCE came from
    (compare's --tuned), so that errors name what the user typed. rebuild_full: also download the ZeRO shards of a
    full model saved without its weights (export rebuilds them; compare refuses such a checkpoint)."""
    named = f"{flag} {source}" if flag else source
    if storage:
        path = Path(storage).expanduser() / source
        if not path.is_dir():
            raise UserError(f"{path}: no such checkpoint in --storage {storage} (its subdirectories are UUIDs)")
        return _local_ref(_checkpoint_in(path))
    path = Path(source).expanduser()
    if path.exists():
        return _local_ref(_checkpoint_in(path))
    if UUID_RE.match(source) or source.startswith("best:"):
        return _download(cluster_checkpoint(source, named), Path(download_dir or "checkpoints"), rebuild_full)
    raise UserError(f"{named}: no such checkpoint directory; pass a checkpoint-N directory, a Determined "
                    "checkpoint directory, a run directory such as runs/local_tiny, or a UUID with --storage DIR")


def resolve_checkpoint(source: str, storage: Optional[str] = None, download_dir: Optional[Path] = None,
                       flag: str = "") -> Path:
    """The local `checkpoint-N` directory that SOURCE names (see locate_checkpoint)."""
    return locate_checkpoint(source, storage, download_dir, flag).path


def _checkpoint_in(path: Path) -> Path:
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path  # checkpoint-N itself, or any directory holding an adapter or a model
    steps = {int(m.group(1)): p for p in path.glob("checkpoint-*") if p.is_dir() and (m := STEP_RE.match(p.name))}
    if (path / "metadata.json").is_file() and steps:
        return steps[max(steps)]  # a Determined checkpoint: our callback uploads one checkpoint-N/ into it
    if any((path / name).exists() for name in RUN_FILES):  # flags.json alone: a run that failed before saving
        return _latest_of_run(path)
    raise UserError(f"{path}: not a checkpoint (no adapter_config.json, config.json, checkpoint-N/ or "
                    "checkpoints.jsonl); pass a checkpoint-N directory or a run directory such as runs/local_tiny")


def _latest_of_run(run_dir: Path) -> Path:
    """A local run's newest registered checkpoint, as resuming would pick it."""
    latest = latest_checkpoint(run_dir / "checkpoints.jsonl")
    if latest is None:
        raise UserError(f"{run_dir}: the run has no finished checkpoint yet; train until it saves one, or pass a "
                        "checkpoint-N directory")
    ckpt = run_dir / "checkpoints" / latest["storage_id"]
    if not ckpt.is_dir():
        # The YAML's checkpoint_storage may put checkpoints elsewhere; that directory + UUID still works.
        raise UserError(f"{ckpt}: registered checkpoint not found there; pass --storage DIR "
                        f"(the YAML's checkpoint_storage) and {latest['storage_id']}")
    return _checkpoint_in(ckpt)


def _local_ref(ckpt: Path) -> CheckpointRef:
    """A checkpoint-N inside a Determined checkpoint directory (a download, a run's storage) has a UUID, the
    directory's name, and DetCallback records the trial in its metadata.json."""
    if not (UUID_RE.match(ckpt.parent.name) and (ckpt.parent / "metadata.json").is_file()):
        return CheckpointRef(ckpt)
    return CheckpointRef(ckpt, ckpt.parent.name, saved_by_trial(ckpt.parent))


# ----- on a cluster -----------------------------------------------------------------------------
def cluster_checkpoint(source: str, named: str):
    """The Determined SDK's Checkpoint for a UUID or best:<experiment id>."""
    import determined as det

    if not (os.environ.get("DET_MASTER") or os.environ.get("DET_MASTER_ADDR") or det.get_cluster_info()):
        raise UserError(f"{named}: not a local path and no Determined master is configured; pass --storage DIR "
                        "(the directory holding <uuid>/) or set DET_MASTER to fetch it from the cluster")
    from determined.experimental import client

    if not source.startswith("best:"):
        return client.get_checkpoint(source)
    experiment_id = source[len("best:"):]
    if not experiment_id.isdigit():
        raise UserError(f"{source}: expected best:<experiment id>, e.g. best:42")
    return best_checkpoint(int(experiment_id), named)


def best_checkpoint(experiment_id: int, named: str):
    from determined.experimental import client

    # Without sort_by: by the searcher's metric and smaller_is_better, across every trial of the experiment.
    found = client.get_experiment(experiment_id).list_checkpoints(max_results=1)
    if not found:
        raise UserError(f"{named}: experiment {experiment_id} has no completed checkpoint")
    return found[0]


def trial_of(checkpoint) -> Optional[int]:
    if checkpoint.training is not None:
        return checkpoint.training.trial_id
    return (checkpoint.metadata or {}).get("trial_id")


def metric_history(run_dir: Optional[str] = None, experiment_id: Optional[int] = None,
                   trial_id: Optional[int] = None) -> Dict[str, List[Dict]]:
    """{"training": [...], "validation": [...]} rows with steps_completed, from a local run's metrics.jsonl or, on a
    cluster through the Determined client, from trial TRIAL_ID (SideBySide's checkpoint.trial_id: the trial whose
    checkpoint is compared) or else from the trial of EXPERIMENT_ID's best checkpoint, the one best:<id> compares."""
    groups = ("training", "validation")
    if run_dir is not None:
        from swallow_ft.local_core import read_jsonl

        rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
        return {g: [r for r in rows if r["group"] == g] for g in groups}
    if trial_id is None and experiment_id is not None:
        trial_id = trial_of(best_checkpoint(int(experiment_id), f"EXPERIMENT_ID {experiment_id}"))
    if trial_id is None:
        raise UserError("metric_history needs RUN_DIR (a local run directory), or on a cluster the trial of a "
                        "Determined checkpoint (CHECKPOINT) or EXPERIMENT_ID")
    from determined.experimental import client  # needs DET_MASTER and a login, as on a cluster notebook

    trial = client.get_trial(trial_id)
    return {g: [{"steps_completed": m.steps_completed, **m.metrics} for m in trial.iter_metrics(g)] for g in groups}


def _size(size: Optional[int]) -> str:
    if size is None:
        return "an unknown size"
    return f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


def _download(checkpoint, download_dir: Path, rebuild_full: bool) -> CheckpointRef:
    target = download_dir / checkpoint.uuid
    partial = download_dir / f".{checkpoint.uuid}.partial"  # renamed when complete: a broken download is redone
    if not (target / "metadata.json").is_file():
        _fetch(checkpoint, partial, lambda path: not TRAINING_STATE.search(path),
               "all but the optimizer and ZeRO state (global_step*/), which only resuming training reads")
        if not (partial / "metadata.json").is_file():  # _checkpoint_in looks for it; older uploads lack it
            checkpoint.write_metadata_file(str(partial / "metadata.json"))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    ckpt = _checkpoint_in(target)
    if weights_need_shards(ckpt, rebuild_full) and not any(ckpt.glob("global_step*/*")):
        _fetch(checkpoint, partial, ZERO_SHARDS.search, "its ZeRO shards, to rebuild the weights ZeRO-3 saved empty")
        for path in sorted(p for p in partial.rglob("*") if p.is_file()):
            (target / path.relative_to(partial)).parent.mkdir(parents=True, exist_ok=True)
            path.rename(target / path.relative_to(partial))
        shutil.rmtree(partial)
    return CheckpointRef(ckpt, checkpoint.uuid, trial_of(checkpoint))


def _fetch(checkpoint, dst: Path, selector, what: str) -> None:
    """Download the files SELECTOR picks into DST, through the Core API's CheckpointContext.download, which takes a
    selector (the SDK's Checkpoint.download does not); where the Core API cannot reach the storage, the whole
    checkpoint through Checkpoint.download (from the storage, else through the master), with the size up front."""
    import determined as det

    shutil.rmtree(dst, ignore_errors=True)
    sizes = {path: size for path, size in (checkpoint.resources or {}).items() if not path.endswith("/")}
    wanted = sum(size for path, size in sizes.items() if selector(path)) if sizes else None
    total = sum(sizes.values()) if sizes else None
    config = checkpoint.training.experiment_config.get("checkpoint_storage") if checkpoint.training else None
    reason = "the Core API takes no shared_fs storage" if (config or {}).get("type") == "shared_fs" else None
    if config and not reason:
        print(f"checkpoint {checkpoint.uuid}: downloading {_size(wanted)} of its {_size(total)}: {what}", flush=True)
        try:
            with det.core.init(checkpoint_storage=config, distributed=det.core.DummyDistributedContext()) as core:
                core.checkpoint.download(checkpoint.uuid, str(dst), det.core.DownloadMode.NoSharedDownload,
                                         selector=selector)
            return
        except Exception as exc:  # no credentials or mount here (NoDirectStorageAccess, CheckpointNotFound), ...:
            # the SDK's download still works, through the master if need be, as it did before this one was tried.
            reason = f"the partial download failed: {type(exc).__name__}"
    shutil.rmtree(dst, ignore_errors=True)
    print(f"warning: checkpoint {checkpoint.uuid}: downloading all of it, {_size(total)}, into {dst} "
          f"({reason or 'no storage config'}), where {_size(wanted)} would do ({what}); make room, or mount the "
          "checkpoint storage and pass --storage DIR with the UUID", file=sys.stderr, flush=True)
    checkpoint.download(str(dst))


# ----- what a checkpoint holds ------------------------------------------------------------------
def empty_tensors(path: Path) -> list:
    """Names of zero-size tensors: what ZeRO-3 saves when the 16-bit weights are not gathered."""
    with safe_open(str(path), framework="pt") as f:
        return [name for name in f.keys() if 0 in f.get_slice(name).get_shape()]


def _holds_no_tensor(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as f:
        return not list(f.keys())


def has_whole_weights(ckpt: Path) -> bool:
    """Whether CKPT holds a whole model for from_pretrained: config.json and weights (not an adapter's) of which
    none has size 0 (ZeRO-3's empty save). Reads only the safetensors headers."""
    weights = [p for p in Path(ckpt).glob("*.safetensors") if p.name != ADAPTER_WEIGHTS]
    bins = list(Path(ckpt).glob("pytorch_model*.bin"))
    return (Path(ckpt) / "config.json").is_file() and bool(weights or bins) and not any(map(empty_tensors, weights))


def weights_need_shards(ckpt: Path, full_models: bool = True) -> bool:
    """Whether only the ZeRO shards hold the trained weights: ZeRO-3 saved them empty (not gathered)."""
    adapter = ckpt / ADAPTER_WEIGHTS
    if (ckpt / "adapter_config.json").is_file():
        return adapter.is_file() and (_holds_no_tensor(adapter) or bool(empty_tensors(adapter)))
    return full_models and (ckpt / "config.json").is_file() and not has_whole_weights(ckpt)


def tuned_weights(checkpoint: Path, source: str, storage: Optional[str] = None,
                  flag: str = "--tuned") -> Tuple[Optional[tuple], Optional[str]]:
    """For compare: ((adapter config, state), None) for a LoRA checkpoint; (None, directory) for whole model weights
    (merged, exported or fully fine-tuned). Reads no model weights: only the tensor shapes in the safetensors headers.
    source, storage, flag: what the checkpoint was given as, for the error."""
    from swallow_ft.export import load_adapter

    if (checkpoint / "adapter_config.json").is_file():
        return load_adapter(checkpoint)[:2], None  # also rebuilds ZeRO-3 adapters that were saved empty
    if has_whole_weights(checkpoint):
        return None, str(checkpoint)
    # ZeRO-3 saves a full model's tensors with size 0 unless gathered. Export rebuilds them from the shards on the
    # CPU in fp32 (~280 GB of memory for 70B): a job to do once, not at every comparison.
    given = f"{source} --storage {storage}" if storage else source
    raise UserError(f"{flag} {source}: {checkpoint} holds no LoRA adapter and no whole model weights (ZeRO-3 saves "
                    f"them empty); write them with python -m swallow_ft.export {given} --out DIR and pass that DIR")


def read_user_data(ckpt: Path) -> dict:
    """The run's user_data.json in a checkpoint or exported model (run_clm.py's finetuned_from, dataset,
    prompt_format, system_prompt; export copies it); {} if there is none (checkpoints from before it was written)."""
    path = Path(ckpt) / "user_data.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # every checkpoint of a run holds the same file
        raise UserError(f"{path}: not valid JSON ({exc}); restore it, e.g. from another checkpoint of the same "
                        "run: it records the base model and the prompt format the run trained with") from exc


def prompt_settings(checkpoint: Path, prompt_format: Optional[str] = None,
                    system_prompt: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(prompt format, system prompt) to render with: those given, else the run's (run_clm.py records them in the
    checkpoint's user_data.json), else "auto" and the format's default."""
    trained = {} if prompt_format and system_prompt is not None else read_user_data(checkpoint)
    return (prompt_format or trained.get("prompt_format", "auto"),
            system_prompt if system_prompt is not None else trained.get("system_prompt"))


# ----- the base it was trained from -------------------------------------------------------------
def recorded_base(ckpt: Path) -> Tuple[Optional[str], str]:
    """(the base model the checkpoint records, where it does): peft's adapter_config.json, else run_clm.py's
    user_data.json (full fine-tuning, and merged exports, which copy it)."""
    adapter_config = Path(ckpt) / "adapter_config.json"
    if adapter_config.is_file():
        recorded = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if recorded:
            return recorded, "adapter_config.json's base_model_name_or_path"
    return read_user_data(ckpt).get("finetuned_from"), "user_data.json's finetuned_from"


def local_model_dir(name: str) -> Optional[Path]:
    """NAME as a directory: as given, else relative to the repo root, as a run gave it; None for a Hub id."""
    for candidate in (Path(name).expanduser(), REPO_ROOT / name) if name else ():
        if candidate.is_dir():
            return candidate
    return None


def _canonical(name: str) -> str:
    """A directory's absolute path, or the Hub id of a snapshot in the Hugging Face cache."""
    local = local_model_dir(name)
    text = str(local.resolve()) if local else name.rstrip("/")
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/", text + "/")
    return f"{cached[1]}/{cached[2]}" if cached else text


def _config_of(name: str) -> Optional[dict]:
    """config.json of a directory, or of a Hub id already in the local cache (never downloaded for this), without
    what saving a copy changes."""
    local = local_model_dir(name)
    path = local / "config.json" if local else None
    if local is None and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "dtype",
                                                          "torch_dtype")}


def same_model(a: str, b: str) -> bool:
    """Whether two names of a base model name one model: the same directory or Hub id, the same last path part
    (a local copy of tokyotech-llm/Swallow-70b-instruct-v0.1 in /models/Swallow-70b-instruct-v0.1), or equal
    config.json files (a copy saved under another name)."""
    a, b = str(a), str(b)
    names = [_canonical(name) for name in (a, b)]
    if names[0] == names[1] or names[0].rsplit("/", 1)[-1].lower() == names[1].rsplit("/", 1)[-1].lower():
        return True
    configs = [_config_of(name) for name in (a, b)]
    return configs[0] is not None and configs[0] == configs[1]


def base_warning(base: str, ckpt: Path, flag: str) -> Optional[str]:
    """One line when BASE is not the base model CKPT records it was trained from; None when it is, or nothing
    records one. A warning, not an error: a copy of the base may differ in name and config."""
    recorded, where = recorded_base(ckpt)
    if not recorded or same_model(base, recorded):
        return None
    return (f"warning: {flag} {base} is not the base the checkpoint was trained from ({recorded}, in its {where}); "
            f"pass that model unless {base} is a copy of it")
