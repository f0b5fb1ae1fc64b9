"""From a dataset name or file to tokenised (and optionally packed) train/validation splits.

The reference's HF run_clm took the *first* column, which for camel-ai/math is `role_1`
("Mathematician_RoleType.ASSISTANT"), concatenated everything and trained on all of it. Here every
row becomes a conversation in the model's own prompt format, with loss on the replies only.
"""

import csv
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
from datasets import Dataset, DatasetDict, Features, Value, load_dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, TrainingArguments

from swallow_ft.arguments import DataTrainingArguments
from swallow_ft.data import encoding, shapes, templates
from swallow_ft.data.encoding import IGNORE, encode, encode_batch
from swallow_ft.data.fingerprint import map_fingerprint
from swallow_ft.data.packing import PackedCollator, pack, packing_efficiency
from swallow_ft.data.shapes import BadRow, detect_shape, row_name, to_conversation
from swallow_ft.data.templates import FORMATS, PromptFormat, choose_format
from swallow_ft.errors import UserError

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The modules whose code decides an example's tokens (encode_example here included): part of the cache key.
TOKEN_CODE = (sys.modules[__name__], shapes, templates, encoding)


@dataclass
class PreparedData:
    train: Dataset
    validation: Dataset
    prompt_format: PromptFormat
    shape: str
    packing_efficiency: Optional[float] = None
    block_size: Optional[int] = None
    system_prompt: Optional[str] = None  # the one trained with: --system_prompt or the format's default

    def prompt_settings(self) -> Dict[str, Optional[str]]:
        """How prompts were rendered, for a checkpoint's user_data: compare renders its prompts the same way."""
        return {"prompt_format": self.prompt_format.name, "system_prompt": self.system_prompt}


def builder_for(path: str, flag: Optional[str] = None) -> str:
    """The datasets builder for a local data file (json, csv, parquet); a UserError if it is missing or unsupported.
    flag: the option that named the file, for the message."""
    suffix = Path(path).suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; use .json, .jsonl, .csv or .parquet")
    if not Path(path).is_file():
        raise UserError(f"{path}: data file not found" + (f": check the path given to {flag}" if flag else ""))
    return LOCAL_FORMATS[suffix]


def _csv_as_text(path: str) -> Dict[str, object]:
    """load_dataset options that read every column of a CSV as text. CSV has no types, and pandas would guess them:
    an answer column of 2, 4, 2.50 becomes numbers, which a row then fails as "must be a string" with no way to fix it
    in the file. Only empty cells stay missing ("NA" or "None" is an answer too)."""
    import pandas

    try:  # the header as pandas names the columns (a duplicate becomes x.1), which the features must match
        names = pandas.read_csv(path, nrows=0).columns
    except ValueError:  # empty or unreadable: left to load_dataset, whose failure _file_problem explains
        return {}
    return {"features": Features({name: Value("string") for name in names}), "keep_default_na": False,
            "na_values": [""]}


class _HeldBuilderLogs(logging.Handler):
    """Holds what datasets' file readers log while loading: on a file it cannot read, the JSON reader logs an error
    (printed twice, by datasets' own handler and the root one) that counts rows from 0 and skips blank lines, just
    before the one line _file_problem gives. Dropped when that line replaces it (a UserError), else passed on."""

    def __init__(self):
        super().__init__()
        self.logger = logging.getLogger("datasets.packaged_modules")
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self.logger.addHandler(self)
        self.propagate, self.logger.propagate = self.logger.propagate, False
        return self

    def __exit__(self, kind, exc, traceback):
        self.logger.removeHandler(self)
        self.logger.propagate = self.propagate
        if not (kind and issubclass(kind, UserError)):
            for record in self.records:
                self.logger.handle(record)


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir=None,
                      train_flag: str = "--train_file") -> DatasetDict:
    """train_flag: the option the train file came from, for messages (compare's --prompts)."""
    if data_args.dataset_name:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    flags = {"train": train_flag, "validation": "--validation_file"}
    builders = {builder_for(path, flags[split]) for split, path in files.items()}
    if len(builders) > 1:
        raise UserError(f"--train_file and --validation_file must have the same type, got {sorted(builders)}")
    builder = builders.pop()
    with _HeldBuilderLogs():
        raw = DatasetDict({split: _load_file(builder, split, path, flags[split], cache_dir)
                           for split, path in files.items()})
    for split, ds in raw.items():
        if len(ds) == 0:
            raise UserError(_no_rows(files[split], flags[split]))
    return raw


def _load_file(builder: str, split: str, path: str, flag: str, cache_dir) -> Dataset:
    """One file at a time: datasets casts every file of one call to the first one's columns, and a validation file
    with other columns failed in a DatasetGenerationError traceback (detect_split_shapes names the difference)."""
    try:
        return load_dataset(builder, data_files={split: path}, cache_dir=cache_dir,
                            **(_csv_as_text(path) if builder == "csv" else {}))[split]
    except Exception:
        # datasets reports an empty or malformed file as StopIteration, "corresponds to no data" or ArrowInvalid,
        # naming neither the file nor the line; the file is read again here, only once it has failed.
        problem = _file_problem(path, flag)
        if problem:
            raise UserError(problem) from None
        raise


def detect_split_shapes(raw: DatasetDict, data_args: DataTrainingArguments) -> str:
    """The train split's shape; a UserError if the validation split has another, since both are read in it."""
    shapes = {split: detect_shape(ds.column_names, source_name(data_args, split), data_args.dataset_shape)
              for split, ds in raw.items() if split in ("train", "validation")}
    if shapes.get("validation", shapes["train"]) != shapes["train"]:
        raise UserError(f"{source_name(data_args, 'validation')} has {shapes['validation']} rows but "
                        f"{source_name(data_args, 'train')} has {shapes['train']} rows: give both files one shape")
    return shapes["train"]


def _no_rows(path: str, flag: str) -> str:
    return f"{path}: no rows: add examples to it or point {flag} at another file"


def _file_problem(path: str, flag: str) -> Optional[str]:
    """Why a local file cannot be read as rows, naming the line where there is one; None if nothing is found."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            rows = sum(1 for _, row in zip(range(2), csv.reader(f)) if row)
        return _no_rows(path, flag) if rows < 2 else None  # the first row is the header
    if suffix == ".parquet":
        import pyarrow.parquet

        try:
            empty = pyarrow.parquet.read_metadata(path).num_rows == 0
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
            return f"{path}: not a readable Parquet file ({' '.join(str(exc).split())}): write it again"
        return _no_rows(path, flag) if empty else None
    rows = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
                if rows == 0 and suffix == ".json":
                    return _json_document_problem(path, flag)  # a .json file may be one (pretty-printed) document
                return f"{path} line {number}: not valid JSON ({getattr(exc, 'msg', exc)}): fix or remove the line"
            if rows == 0 and suffix == ".json" and not isinstance(row, dict):
                return _json_document_problem(path, flag)
            if not isinstance(row, dict):
                return (f"{path} line {number}: a JSON {type(row).__name__}, not an object: each line must be one "
                        "row {...}: fix or remove the line")
            rows += 1
    return None if rows else _no_rows(path, flag)


def _json_document_problem(path: str, flag: str) -> Optional[str]:
    try:
        document = json.loads(Path(path).read_bytes())
    except UnicodeDecodeError as exc:
        return f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}): save it as UTF-8"
    except ValueError as exc:
        return f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}): fix it"
    return _no_rows(path, flag) if document == [] else None


def source_name(data_args: DataTrainingArguments, split: str) -> str:
    if data_args.dataset_name:
        return f"{data_args.dataset_name}[{split}]"
    return data_args.validation_file if split == "validation" else data_args.train_file


def example_key(input_ids: np.ndarray, labels: np.ndarray) -> int:
    """A 64-bit digest of an example's tokens and labels: equal keys mean identical examples."""
    both = np.concatenate([input_ids, labels]).astype("<i8")
    return int.from_bytes(hashlib.blake2b(both.tobytes(), digest_size=8).digest(), "little", signed=True)


def render_example(row, where: str, shape: str, fmt: PromptFormat, tokenizer, system_prompt: Optional[str]):
    """One dataset row -> the format's pieces; a BadRow naming the row if it cannot be rendered."""
    conv = to_conversation(row, shape, where)
    try:
        return fmt.render(conv, tokenizer, system_prompt)
    except BadRow:
        raise
    except UserError as exc:  # a format that cannot render this row: name the row
        raise BadRow(f"{where}: {exc}") from exc


def encode_example(row, where: str, shape: str, fmt: PromptFormat, tokenizer, system_prompt: Optional[str]):
    """One dataset row -> (input_ids, labels), exactly as training sees it (before truncation)."""
    return encode(render_example(row, where, shape, fmt, tokenizer, system_prompt), tokenizer, fmt.literal_specials)


def encode_split(dataset: Dataset, source: str, shape: str, fmt: PromptFormat, tokenizer,
                 data_args: DataTrainingArguments, block_size: int, rebuild: bool = False) -> Dataset:
    """Rows -> input_ids/labels plus bookkeeping columns (n_train, truncated, bad) and `key` (example_key).

    rebuild: tokenise again instead of reading the datasets cache (--overwrite_cache, on the main process only).
    """
    # Only what decides the tokens goes into the closure, since datasets keys the cache on everything it holds.
    system_prompt, skip_bad_rows = data_args.system_prompt, data_args.skip_bad_rows

    def encode_rows(batch, indices):
        rendered, bad = [], []
        for values, index in zip(zip(*batch.values()), indices):
            try:
                rendered.append(render_example(dict(zip(batch, values)), row_name(source, index), shape, fmt,
                                               tokenizer, system_prompt))
                bad.append(False)
            except BadRow:
                if not skip_bad_rows:
                    raise
                rendered.append([])
                bad.append(True)
        out = {"input_ids": [], "labels": [], "n_train": [], "truncated": [], "bad": bad, "key": []}
        for ids, labels in encode_batch(rendered, tokenizer, fmt.literal_specials):
            out["truncated"].append(len(ids) > block_size)
            ids, labels = ids[:block_size], labels[:block_size]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["n_train"].append(int(np.count_nonzero(labels != IGNORE)))
            out["key"].append(example_key(ids, labels))
        return out

    return dataset.map(encode_rows, batched=True, with_indices=True, remove_columns=dataset.column_names,
                       num_proc=data_args.preprocessing_num_workers,
                       new_fingerprint=map_fingerprint(dataset, encode_rows, TOKEN_CODE),
                       load_from_cache_file=not rebuild, desc=f"Tokenising {source}")


def columns(dataset: Dataset, *names: str) -> Tuple[np.ndarray, ...]:
    """Whole columns as numpy arrays, read in one go (datasets' Column object would iterate row by row)."""
    table = dataset.with_format("numpy", columns=list(names))[:]
    return tuple(table[name] for name in names)


def keep_trainable(dataset: Dataset, source: str, data_args: DataTrainingArguments) -> Dataset:
    """Apply the over-long policy and drop rows that would train nothing, saying how many and why."""
    if len(dataset) == 0:
        raise UserError(f"{source}: the split has no rows: give data with examples in it")
    bad, truncated, n_train = columns(dataset, "bad", "truncated", "n_train")
    drop_truncated = data_args.overlong == "drop"
    empty = ~bad & (n_train == 0)
    keep = ~bad & (n_train > 0) & ~(truncated & drop_truncated)
    if bad.any():
        logger.warning("%s: skipped %d bad rows (--skip_bad_rows)", source, bad.sum())
    if truncated.any():
        logger.warning("%s: %d examples longer than block_size were %s (--overlong %s)", source, truncated.sum(),
                       "dropped" if drop_truncated else "truncated", data_args.overlong)
    if empty.any():
        logger.warning("%s: dropped %d examples with no trained tokens left after truncation", source, empty.sum())
    kept = dataset.select(np.flatnonzero(keep)).remove_columns(["n_train", "truncated", "bad"])
    if len(kept) == 0:
        raise UserError(f"{source}: no example is left to train on (bad rows, or every reply was cut by "
                        "block_size: raise --block_size)")
    return kept


def without_leaks(validation: Dataset, train: Dataset, source: str, held_out: bool) -> Dataset:
    """Validation examples identical (token for token) to a training example measure recall, not generalisation.

    A split held out here drops them, since getting that split right is ours to do; a --validation_file is the
    user's benchmark and is kept as given, with a warning. Either way the count is logged.
    """
    leaked = np.isin(*columns(validation, "key"), *columns(train, "key"))
    count = int(leaked.sum())
    if not count:
        return validation
    if not held_out:
        logger.warning("%s: %d of %d validation examples are identical (token for token) to a training example, so "
                       "eval_loss partly measures recall; remove them from the validation file", source, count,
                       len(validation))
        return validation
    logger.warning("%s: dropped %d of %d held-out validation examples identical (token for token) to a training "
                   "example, so that eval_loss measures unseen data; deduplicate the data to keep them", source, count,
                   len(validation))
    if count == len(validation):
        raise UserError(f"{source}: every held-out validation example duplicates a training example; deduplicate "
                        "the data or give a --validation_file")
    return validation.select(np.flatnonzero(~leaked))


def build_datasets(data_args: DataTrainingArguments, training_args: TrainingArguments,
                   tokenizer: PreTrainedTokenizerBase, model_name: str, cache_dir=None) -> PreparedData:
    """The main process builds first (download, tokenising, split, packing), filling the datasets cache at each step;
    the other ranks then read it, instead of all downloading and tokenising at once (which on big data outlasts the
    NCCL timeout). --overwrite_cache rebuilds on the main process only."""
    with training_args.main_process_first(desc="building the datasets"):
        return _build(data_args, tokenizer, model_name, cache_dir,
                      rebuild=data_args.overwrite_cache and training_args.local_process_index == 0)


def _build(data_args: DataTrainingArguments, tokenizer: PreTrainedTokenizerBase, model_name: str, cache_dir,
           rebuild: bool) -> PreparedData:
    raw = load_raw_datasets(data_args, cache_dir)
    train_source = source_name(data_args, "train")
    shape = detect_split_shapes(raw, data_args)
    fmt = choose_format(data_args.prompt_format, model_name, tokenizer, shape)
    block_size = data_args.block_size or min(tokenizer.model_max_length, 2048)
    held_out = "validation" not in raw
    if held_out and not 0 < data_args.validation_split_percentage < 100:
        raise UserError("no validation split: give --validation_file or a --validation_split_percentage in 1..99")

    splits = {split: keep_trainable(encode_split(ds, source_name(data_args, split), shape, fmt, tokenizer, data_args,
                                                 block_size, rebuild), source_name(data_args, split), data_args)
              for split, ds in raw.items() if split in ("train", "validation")}
    if held_out:
        split = splits["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=42)
        splits = {"train": split["train"], "validation": split["test"]}
    if data_args.max_train_samples:
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    # Against the examples actually trained on, and before max_eval_samples so that it still gives that many.
    validation_source = f"{train_source} (held out)" if held_out else source_name(data_args, "validation")
    splits["validation"] = without_leaks(splits["validation"], splits["train"], validation_source, held_out)
    if data_args.max_eval_samples:
        splits["validation"] = splits["validation"].select(
            range(min(data_args.max_eval_samples, len(splits["validation"]))))
    splits = {name: ds.remove_columns("key") for name, ds in splits.items()}
    logger.info("data: %s (%s rows) in prompt format %s, %d train / %d validation examples, block_size %d",
                train_source, shape, fmt.name, len(splits["train"]), len(splits["validation"]), block_size)

    efficiency = None
    if data_args.packing:
        splits = {name: pack(ds, block_size, rebuild) for name, ds in splits.items()}
        efficiency = packing_efficiency(splits["train"], block_size)
        logger.info("packing: %d train rows of %d slots, %.1f%% filled with real tokens",
                    len(splits["train"]), block_size, 100 * efficiency)
    return PreparedData(splits["train"], splits["validation"], fmt, shape, efficiency, block_size,
                        fmt.system_prompt(data_args.system_prompt))


def build_collator(tokenizer: PreTrainedTokenizerBase, packing: bool, width: Optional[int] = None):
    """Batches are padded to their longest row, labels with -100. With width, packed batches are padded to exactly
    width tokens instead, so that torch.compile compiles once for one static shape."""
    if packing:
        return PackedCollator(tokenizer.pad_token_id, width)
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)


__all__ = ["FORMATS", "PreparedData", "build_collator", "build_datasets", "load_raw_datasets"]
