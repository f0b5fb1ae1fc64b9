"""See what a run trains on before spending GPUs.

    python -m swallow_ft.data preview --config experiments/local_tiny.yaml --n 2
    python -m swallow_ft.data preview --model_name_or_path .cache/tiny-swallow --train_file data/chat_ja.jsonl \\
        --prompt_format swallow-instruct-v0.1 --format json

Takes the same data and model flags as run_clm.py (or an experiment file, plus overrides). In the
text view, trained tokens are shown between ⟦ and ⟧ (and in green on a terminal).
"""

import argparse
import json
import sys

from swallow_ft.arguments import parse_model_and_data
from swallow_ft.data.encoding import IGNORE
from swallow_ft.data.loading import encode_example, load_raw_datasets, source_name
from swallow_ft.data.shapes import detect_shape, row_name
from swallow_ft.data.templates import choose_format
from swallow_ft.errors import exit_code_of
from swallow_ft.experiment import Experiment
from swallow_ft.model import load_tokenizer

GREEN, RESET = "\033[32m", "\033[0m"


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m swallow_ft.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    preview = sub.add_parser("preview", help="render examples and show which tokens are trained")
    preview.add_argument("--config", help="an experiment YAML; its run_clm.py flags are used")
    preview.add_argument("--n", type=int, default=3, help="how many examples (default 3)")
    preview.add_argument("--format", choices=["text", "json"], default="text")
    options, flags = parser.parse_known_args(argv)
    if options.config:
        # Searched hyperparameters (learning rate, LoRA rank) do not change the tokens: one trial's values will do.
        flags = Experiment.load(options.config).flags(sampled=True) + flags
    model_args, data_args = parse_model_and_data(flags)
    return options, model_args, data_args


def segments(tokenizer, ids, labels):
    """(text, trained) runs, decoded by prefix so that spaces fall exactly where the model sees them."""
    out, done, start = [], "", 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] != IGNORE) != (labels[start] != IGNORE):
            text = tokenizer.decode(ids[:end])
            out.append((text[len(done):], labels[start] != IGNORE))
            done, start = text, end
    return out


def preview(options, model_args, data_args, out=sys.stdout):
    tokenizer = load_tokenizer(model_args)
    raw = load_raw_datasets(data_args, model_args.cache_dir)["train"]
    source = source_name(data_args, "train")
    shape = detect_shape(raw.column_names, source, data_args.dataset_shape)
    fmt = choose_format(data_args.prompt_format, model_args.model_name_or_path, tokenizer, shape)
    color = out.isatty()
    for index in range(min(options.n, len(raw))):
        where = row_name(source, index)
        ids, labels = encode_example(raw[index], where, shape, fmt, tokenizer, data_args.system_prompt)
        trained = [i for i, label in zip(ids, labels) if label != IGNORE]
        if options.format == "json":
            out.write(json.dumps({"text": tokenizer.decode(ids), "train_text": tokenizer.decode(trained),
                                  "n_tokens": len(ids), "n_train_tokens": len(trained)}, ensure_ascii=False) + "\n")
            continue
        out.write(f"── {where} · {fmt.name} · {len(ids)} tokens, {len(trained)} trained ──\n")
        for text, is_trained in segments(tokenizer, ids, labels):
            out.write((f"{GREEN}⟦{text}⟧{RESET}" if color else f"⟦{text}⟧") if is_trained else text)
        out.write("\n\n")


def main(argv=None) -> int:
    return exit_code_of(lambda: preview(*parse(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
