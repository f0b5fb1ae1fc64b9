"""Run by tests/test_data_pipeline.py under torchrun: two ranks build the datasets as run_clm does.

Each build's stderr (where datasets draws a progress bar for each map it computes, and none for a cache hit) goes
to OUT/rank{R}-{build}.log; what each rank got goes to OUT/rank{R}.json.
"""

import contextlib
import json
import os
import sys
from pathlib import Path

from transformers import AutoTokenizer, TrainingArguments

from swallow_ft.arguments import DataTrainingArguments
from swallow_ft.data import build_datasets

BUILDS = [{}, {"overwrite_cache": True}, {"max_train_samples": 30, "max_eval_samples": 5}]

model, data_file, cache_dir, out = sys.argv[1:5]
rank = int(os.environ["RANK"])
training_args = TrainingArguments(output_dir=out, use_cpu=True, report_to="none")
tokenizer = AutoTokenizer.from_pretrained(model)
results = []
for build, options in enumerate(BUILDS):
    log = Path(out) / f"rank{rank}-{build}.log"
    with log.open("w") as stderr, contextlib.redirect_stderr(stderr):
        data = build_datasets(DataTrainingArguments(train_file=data_file, block_size=256, packing=True, **options),
                              training_args, tokenizer, "tiny", cache_dir=cache_dir)
    results.append({"train": data.train._fingerprint, "validation": data.validation._fingerprint,
                    "rows": len(data.train), "log": log.read_text()})
(Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
