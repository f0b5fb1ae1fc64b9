"""Datasets: load from the Hub or local files, turn rows into token ids, batch them.

Rows in the camel-ai/math schema become `message_1` followed by `message_2`; rows with a `text` column
are taken as plain text. The seed's HF run_clm took the *first* column instead, which for
camel-ai/math is `role_1` ("Mathematician_RoleType.ASSISTANT"), so it trained on that string alone.
"""

import logging
from pathlib import Path
from typing import Dict, List

from datasets import DatasetDict, load_dataset
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase, TrainingArguments

from swallow_ft.arguments import DataTrainingArguments
from swallow_ft.errors import UserError

logger = logging.getLogger("swallow_ft.data")

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SHAPES = {"camel-math": ("message_1", "message_2"), "text": ("text",)}


def _builder_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; use .json, .jsonl, .csv or .parquet")
    if not Path(path).is_file():
        raise UserError(f"{path}: data file not found")
    return LOCAL_FORMATS[suffix]


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir=None) -> DatasetDict:
    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    else:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        builders = {_builder_for(f) for f in files.values()}
        if len(builders) > 1:
            raise UserError(f"--train_file and --validation_file must have the same type, got {sorted(builders)}")
        raw = load_dataset(builders.pop(), data_files=files, cache_dir=cache_dir)
    if "validation" not in raw:
        if not 0 < data_args.validation_split_percentage < 100:
            raise UserError("no validation split: give --validation_file or a --validation_split_percentage in 1..99")
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=42)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    if data_args.max_train_samples:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    if data_args.max_eval_samples:
        raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
    return raw


def detect_shape(columns: List[str], source: str) -> str:
    for shape, needed in SHAPES.items():
        if all(c in columns for c in needed):
            return shape
    raise UserError(f"{source}: no usable columns in {columns}; expected message_1 and message_2 "
                    f"(camel-ai/math) or text")


def render(row: Dict, shape: str) -> str:
    if shape == "camel-math":
        return f"{row['message_1']}\n{row['message_2']}"
    return row["text"]


def tokenize_datasets(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, data_args: DataTrainingArguments,
                      training_args: TrainingArguments) -> DatasetDict:
    source = data_args.dataset_name or data_args.train_file
    shape = detect_shape(raw["train"].column_names, source)
    for split, ds in raw.items():
        if len(ds) == 0:
            raise UserError(f"{source}: the {split} split is empty")
    block_size = data_args.block_size or min(tokenizer.model_max_length, 2048)

    def tokenize(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        ids = [[tokenizer.bos_token_id, *tokenizer.encode(render(r, shape), add_special_tokens=False),
                tokenizer.eos_token_id][:block_size] for r in rows]
        return {"input_ids": ids}

    # The main process tokenises first and fills the datasets cache; the others then read it
    # instead of all tokenising at once (which on big data outlasts the NCCL timeout).
    with training_args.main_process_first(desc="tokenising"):
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names,
                            num_proc=data_args.preprocessing_num_workers,
                            load_from_cache_file=not data_args.overwrite_cache, desc="Tokenising")
    logger.info("data: %s rows (%s shape), %d train / %d validation examples, block_size %d",
                source, shape, len(tokenized["train"]), len(tokenized["validation"]), block_size)
    return tokenized


def build_collator(tokenizer: PreTrainedTokenizerBase):
    """Pads each batch to its longest row; labels are the inputs with padding set to -100."""
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def build_datasets(data_args: DataTrainingArguments, training_args: TrainingArguments,
                   tokenizer: PreTrainedTokenizerBase, cache_dir=None) -> DatasetDict:
    return tokenize_datasets(load_raw_datasets(data_args, cache_dir), tokenizer, data_args, training_args)
