"""Cache keys for tokenised datasets that change when the code deciding the tokens changes.

`datasets` keys a `map` cache on a dill hash of the mapped function. dill pickles module-level functions by
name, so a function that calls `render_llama2_chat` or `encode` hashes the same after either one is edited, and a
rerun would train on the tokens of the old template. Mixing a hash of the modules' source into the key turns such
an edit into a cache miss. Any byte counts (a comment too): re-tokenising after an edit is cheap next to training
on stale tokens.
"""

import hashlib
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

from datasets import Dataset
from datasets.fingerprint import update_fingerprint


def module_source_hash(modules: Sequence[ModuleType]) -> str:
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def map_fingerprint(dataset: Dataset, transform: Callable, modules: Sequence[ModuleType]) -> str:
    """The `new_fingerprint` for dataset.map(transform): what datasets would use, plus the modules' source.

    update_fingerprint is datasets' own: an unhashable transform still gets its random key and warning.
    """
    return update_fingerprint(dataset._fingerprint, transform, {"source": module_source_hash(modules)})
