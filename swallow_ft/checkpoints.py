"""Checkpoints in Determined's storage: the upload from every node, and what a trial starts from.

A trial restarted by the master (after preemption, a pause or a crash) resumes its own latest checkpoint: weights,
optimizer, schedule, RNG and data position. A trial given another trial's checkpoint (`searcher.source_trial_id` or
`source_checkpoint_uuid`) is warm-started, as Determined defines it: the weights come from the checkpoint, and
training starts at step 0 with this trial's hyperparameters.
"""

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import determined as det
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from swallow_ft.errors import UserError

logger = logging.getLogger(__name__)

RESTORED_DIR = "restored"
ZERO_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def upload_checkpoint(core_context: det.core.Context, output_dir: str, folder: str, metadata: Dict[str, Any]) -> str:
    """Upload `output_dir/folder` from every node into one checkpoint; a collective, called by every rank.

    The ranks of a node share `output_dir` and each writes its own files into the folder (ZeRO-3's zero_pp_rank_*,
    rng_state_*). One process per node lists and uploads them all: were every rank to list the folder, each would see
    its neighbours' files as conflicts, and Determined settles a conflict by reading the whole file into memory to
    hash it, on every rank (about 100 GB per save per node for a 7B full fine-tune on 8 GPUs)."""
    node_leader = core_context.distributed.local_rank == 0
    return core_context.checkpoint.upload(
        output_dir if node_leader else None, metadata=metadata, shard=True,
        selector=(lambda path: path.startswith(folder + "/")) if node_leader else None)


def clear_earlier_attempts(core_context: det.core.Context, output_dir: str) -> None:
    """Remove what an earlier run of this trial left in a node's output_dir; a collective, called by every rank.

    Where /tmp outlives the container (Slurm or PBS with Singularity or Apptainer bind it from the host), a crashed
    attempt's checkpoint-N folders stay. When the restarted trial saves step N again on other nodes, two nodes offer
    the same shard with different contents and Determined refuses the upload, on every restart."""
    if core_context.distributed.local_rank == 0:
        for stale in [*Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"), Path(output_dir) / RESTORED_DIR]:
            logger.info("removing %s, left by an earlier run of this trial", stale)
            shutil.rmtree(stale, ignore_errors=True)
    core_context.distributed.allgather(None)  # nobody writes into output_dir before every node has cleared its own


@dataclass
class StartingPoint:
    path: str  # the checkpoint-N folder
    storage_id: str
    warm_start: bool  # another trial's checkpoint: its weights only
    source_trial: Optional[int] = None


def download_starting_point(core_context: det.core.Context, storage_id: str, output_dir: str,
                            trial_id: Optional[int]) -> StartingPoint:
    """Download the checkpoint the trial starts from; every rank calls it, and each node downloads once."""
    # A directory of its own, so checkpoint-N folders in output_dir are never mistaken for the one handed to us.
    target = os.path.join(output_dir, RESTORED_DIR, storage_id)
    core_context.checkpoint.download(storage_id, target)
    path = get_last_checkpoint(target)
    if path is None:
        raise UserError(f"checkpoint {storage_id} holds no {PREFIX_CHECKPOINT_DIR}-N folder: it was not saved by "
                        "this project's run_clm.py, so a trial cannot start from it")
    source_trial = saved_by_trial(target)
    warm_start = trial_id is not None and source_trial is not None and source_trial != trial_id
    if not warm_start:
        check_same_world_size(path, storage_id, core_context.distributed.size)
    return StartingPoint(path, storage_id, warm_start, source_trial)


def saved_by_trial(checkpoint_dir) -> Optional[int]:
    """The trial that uploaded a Determined checkpoint directory, from the metadata.json DetCallback writes; None for
    a local run's checkpoint or an unreadable file."""
    try:
        return json.loads(Path(checkpoint_dir, "metadata.json").read_text(encoding="utf-8")).get("trial_id")
    except (OSError, ValueError, AttributeError):
        return None


def check_same_world_size(path: str, storage_id: str, world_size: int) -> None:
    """DeepSpeed resumes ZeRO's optimizer shards only on as many ranks as saved them; say so before the weights load,
    not in DeepSpeed's error after they did, once per restart."""
    ranks = {int(m.group(1)) for f in Path(path).glob("global_step*/*") if (m := ZERO_SHARD.search(f.name))}
    if ranks and len(ranks) != world_size:
        raise UserError(f"checkpoint {storage_id} holds DeepSpeed ZeRO optimizer shards of {len(ranks)} ranks and "
                        f"this trial runs {world_size}: set resources.slots_per_trial: {len(ranks)} to resume it "
                        "(ZeRO resumes only on as many ranks as saved it)")


def check_warm_start(start: StartingPoint, use_lora: bool, lora_r: int) -> None:
    """Before any weights load: a warm start reads the adapter of a LoRA checkpoint into an adapter of its shape."""
    where = f"checkpoint {start.storage_id} (trial {start.source_trial})"
    config_path = Path(start.path, "adapter_config.json")
    if not use_lora or not config_path.exists():
        raise UserError(f"{where} is another trial's: this project warm-starts LoRA runs from a LoRA checkpoint "
                        "only; for a full fine-tune export it (python3 -m swallow_ft.export) and pass the folder as "
                        "--model_name_or_path, or remove searcher.source_trial_id/source_checkpoint_uuid")
    saved_r = json.loads(config_path.read_text()).get("r")
    if saved_r != lora_r:
        raise UserError(f"{where} has LoRA rank {saved_r} and this trial --lora_r {lora_r}: warm-starting needs the "
                        f"same rank; set --lora_r {saved_r}")
