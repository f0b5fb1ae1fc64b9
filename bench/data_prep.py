"""Host time of the data path (tokenise, split, pack) at camel-ai/math's size, on this machine's CPU.

The rows are data/camel_math_ja.jsonl's, numbered and with each answer repeated 1-20 times (seeded), so that lengths
are skewed as real solutions are. The tokenizer is the tiny model's SentencePiece (`make tiny`): it cuts Japanese
into more tokens than Swallow's 43k vocabulary does, so rows/s, not tokens/s, is the figure to carry over.
Three builds, as a run meets them: a cold cache, a warm one (a rerun or a resumed trial), and a warm one with
another --max_train_samples (re-packs, does not re-tokenise).
    python bench/data_prep.py [--rows 50000] [--block_size 2048] [--workers N] [--json OUT]
"""
import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import datasets
from transformers import AutoTokenizer, TrainingArguments

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from swallow_ft.arguments import DataTrainingArguments  # noqa: E402
from swallow_ft.data import build_datasets  # noqa: E402


def write_rows(path: Path, rows: int) -> None:
    seeds = [json.loads(line) for line in (REPO / "data/camel_math_ja.jsonl").open(encoding="utf-8")]
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            row = dict(seeds[i % len(seeds)])
            row["message_1"] += f" (問題 {i})"
            row["message_2"] = " ".join([row["message_2"]] * rng.randint(1, 20))
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=None, help="--preprocessing_num_workers")
    parser.add_argument("--tokenizer", default=str(REPO / ".cache/tiny-swallow"))
    parser.add_argument("--json", help="also write the results here")
    options = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)

    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "rows.jsonl"
        write_rows(data_file, options.rows)
        training_args = TrainingArguments(output_dir=tmp, use_cpu=True, report_to="none")
        results = []
        for build, extra in (("cold cache", {}), ("warm cache", {}),
                             ("warm, other --max_train_samples", {"max_train_samples": options.rows // 2})):
            data_args = DataTrainingArguments(train_file=str(data_file), block_size=options.block_size, packing=True,
                                              preprocessing_num_workers=options.workers, **extra)
            start = time.perf_counter()
            data = build_datasets(data_args, training_args, tokenizer, "tiny", cache_dir=str(Path(tmp) / "cache"))
            seconds = time.perf_counter() - start
            results.append({"build": build, "seconds": round(seconds, 2), "rows": options.rows,
                            "rows_per_second": round(options.rows / seconds), "packed_train_rows": len(data.train),
                            "packing_efficiency": round(data.packing_efficiency, 4)})

    print(f"{'build':34} {'seconds':>8} {'rows/s':>8}  packed rows  filled")
    for r in results:
        print(f"{r['build']:34} {r['seconds']:8.2f} {r['rows_per_second']:8,}  {r['packed_train_rows']:11,}  "
              f"{r['packing_efficiency']:.1%}")
    if options.json:
        Path(options.json).write_text(json.dumps({"tokenizer": options.tokenizer, "block_size": options.block_size,
                                                  "workers": options.workers, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
