"""Data and prompt templates: loading, row shapes, prompt formats, tokenising with labels, packing.

`python -m swallow_ft.data preview ...` shows what a run would train on.
"""

from swallow_ft.data.loading import PreparedData, build_collator, build_datasets, load_raw_datasets

__all__ = ["PreparedData", "build_collator", "build_datasets", "load_raw_datasets"]
