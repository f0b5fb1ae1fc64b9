"""Packing examples into rows of block_size without cross-example attention, and batch collators.

A packed row carries `position_ids` that restart at 0 for every example and no attention_mask; with
attn_implementation "sdpa" or "flex_attention" (and use_cache=False) transformers 5 turns that into a
block-diagonal causal mask, so each example only ever sees itself. tests/test_data_pipeline.py checks the
logits against each example's own (test_packed_rows_give_exactly_the_per_example_logits).
"""

import sys
from typing import Dict, List, Optional

import pyarrow.compute as pc
import torch
from datasets import Dataset

from swallow_ft.data.encoding import IGNORE
from swallow_ft.data.fingerprint import map_fingerprint

# First-fit decreasing runs over groups of this many examples: good packing, bounded memory.
PACKING_GROUP = 2000


def _first_fit_decreasing(lengths: List[int], block_size: int) -> List[List[int]]:
    bins: List[List[int]] = []
    room: List[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(block_size - lengths[index])
    return bins


def pack(dataset: Dataset, block_size: int, rebuild: bool = False) -> Dataset:
    def pack_group(batch):
        rows = {"input_ids": [], "labels": [], "position_ids": []}
        for members in _first_fit_decreasing([len(ids) for ids in batch["input_ids"]], block_size):
            for key in rows:
                rows[key].append([])
            for i in members:
                rows["input_ids"][-1] += batch["input_ids"][i]
                rows["labels"][-1] += batch["labels"][i]
                rows["position_ids"][-1] += list(range(len(batch["input_ids"][i])))
        return rows

    # Keyed on this module's source too: pack_group calls _first_fit_decreasing, which datasets hashes by name.
    return dataset.map(pack_group, batched=True, batch_size=PACKING_GROUP, remove_columns=dataset.column_names,
                       new_fingerprint=map_fingerprint(dataset, pack_group, [sys.modules[__name__]]),
                       load_from_cache_file=not rebuild, desc=f"Packing into rows of {block_size}")


def packing_efficiency(dataset: Dataset, block_size: int) -> float:
    """Real tokens per token slot: how much of each block_size row carries data."""
    if not len(dataset):
        return 0.0
    lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"][:])
    return pc.sum(lengths).as_py() / (len(dataset) * block_size)


class PackedCollator:
    """Pads packed rows to the longest in the batch, or to a fixed width; the padding forms its own position run."""

    def __init__(self, pad_token_id: int, width: Optional[int] = None):
        self.pad_token_id, self.width = pad_token_id, width

    def __call__(self, rows: List[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        width = max([len(r["input_ids"]) for r in rows] + [self.width or 0])
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(r["labels"] + [IGNORE] * pad)
            batch["position_ids"].append(r["position_ids"] + list(range(pad)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
