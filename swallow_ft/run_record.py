"""What a local run was started with, kept beside its checkpoints, so a rerun under the same name resumes only
checkpoints trained the same way (a cluster trial's hyperparameters are fixed by the master instead)."""

import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from swallow_ft.arguments import REFUSED_FLAGS, given_fields, normalize_flags, parse_input_arguments
from swallow_ft.errors import UserError
from swallow_ft.local_core import latest_checkpoint

logger = logging.getLogger(__name__)

# Flags that change how a run is driven, not what it trains: a resumed run may change them.
RESUMABLE_FLAGS = {
    "--max_steps", "--num_train_epochs", "--logging_steps", "--eval_steps", "--save_steps", "--save_total_limit",
    "--eval_strategy", "--save_strategy", "--logging_strategy", "--report_to", "--disable_tqdm", "--output_dir",
    "--use_cpu", "--ddp_backend", "--dataloader_num_workers", "--preprocessing_num_workers", "--overwrite_cache",
    "--per_device_eval_batch_size", "--max_eval_samples", "--logging_nan_inf_filter", "--include_num_input_tokens_seen",
    "--attn_implementation", "--use_liger_kernel", "--torch_compile", "--skip_bad_rows", "--do_eval",
    "--liger_kernel_config", "--ddp_find_unused_parameters",
}
SETTINGS_FORMAT = 2  # flags.json before it held {--flag: text}
SECRET_FIELDS = {flag[2:] for flag in REFUSED_FLAGS}  # flags.json is a plain file beside the metrics


def run_settings(flags: List[str], parsed: Sequence[Any]) -> Dict[str, Any]:
    """What a run trains with: every parsed argument, and which of them the flags set.

    Parsed values, not the flags' text, so that 5e-3 and 0.005, --learning-rate and --learning_rate, --use_lora and
    --use_lora true, --evaluation_strategy and --eval_strategy are the same run.
    """
    return {"format": SETTINGS_FORMAT, "given": sorted(given_fields(normalize_flags(flags))),
            "values": {f.name: _plain(getattr(args, f.name)) for args in parsed for f in fields(args)
                       if f.init and f.name not in SECRET_FIELDS}}


def _plain(value: Any) -> Any:
    """A JSON value that compares equal after a round trip through flags.json (enums by value)."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", None) or str(v)))


def _read_settings(recorded_path: Path) -> Optional[Dict[str, Any]]:
    """The recorded settings; None when unknown: no record, an unreadable one, or old flags that no longer parse."""
    try:
        recorded = json.loads(Path(recorded_path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict):
        return None
    if recorded.get("format") == SETTINGS_FORMAT:
        return recorded
    # Before SETTINGS_FORMAT the record was {--flag: text} (a bare switch ""): parse it as the run did then.
    flags = [word for flag, value in recorded.items() for word in ([flag, value] if value != "" else [flag])]
    try:
        return run_settings(flags, parse_input_arguments({}, flags))
    except (ValueError, TypeError):
        return None


def changed_flags(recorded_path: Path, flags: List[str], parsed: Sequence[Any]) -> List[str]:
    """What differs, other than RESUMABLE_FLAGS, between what a run started with and these flags; [] if that is
    unknown (a run from before it was kept). Only arguments that a flag set on either side are compared: the ones
    the Trainer derives from others follow them."""
    before, now = _read_settings(recorded_path), run_settings(flags, parsed)
    if before is None:
        return []
    resumable = {flag[2:] for flag in RESUMABLE_FLAGS}
    named = (set(before["given"]) | set(now["given"])) - resumable
    old, new = before["values"], now["values"]
    # A field only one side knows is one that another transformers version added or removed: not a difference.
    return [f"--{name} {_show(old[name])} -> {_show(new[name])}"
            for name in sorted(named) if name in old and name in new and old[name] != new[name]]


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)


def check_same_run(run_dir: Path, registry_path: Path, flags: List[str], parsed: Sequence[Any]) -> None:
    """A run is found by its name, so a rerun with other flags would resume checkpoints trained differently (or
    "finish" at once on someone else's adapter). Its settings are kept beside its registry and compared."""
    recorded = Path(run_dir) / "flags.json"
    if latest_checkpoint(registry_path) is None:
        record_flags(recorded, flags, parsed)
        return
    changed = changed_flags(recorded, flags, parsed)
    if changed:
        raise UserError(f"{run_dir} holds checkpoints trained with other flags ({'; '.join(changed)}): pass "
                        "--fresh to start over, or --runs_dir DIR to keep both")
    if warn_of_a_new_schedule(recorded, run_settings(flags, parsed)["values"]):
        record_flags(recorded, flags, parsed)  # the next resume compares with this length


def warn_of_a_new_schedule(recorded_path: Path, now: Dict[str, Any]) -> bool:
    """--max_steps and --num_train_epochs may change on resume, but the Trainer then lays the learning-rate schedule
    over the new length: past the warm-up, the rate at the resumed step is not the one the checkpoint left."""
    before = (_read_settings(recorded_path) or {}).get("values", {})
    changed = [f"--{name} {_show(before[name])} -> {_show(now[name])}" for name in ("max_steps", "num_train_epochs")
               if name in before and before[name] != now.get(name)]
    if changed and now.get("lr_scheduler_type") not in ("constant", "constant_with_warmup"):
        logger.warning("resuming with %s: the %s learning-rate schedule is recomputed for the new length, so the rate "
                       "changes at the resumed step", "; ".join(changed), now.get("lr_scheduler_type"))
    return bool(changed)


def record_flags(recorded_path: Path, flags: List[str], parsed: Sequence[Any]) -> None:
    Path(recorded_path).parent.mkdir(parents=True, exist_ok=True)
    Path(recorded_path).write_text(json.dumps(run_settings(flags, parsed), indent=1, sort_keys=True))
