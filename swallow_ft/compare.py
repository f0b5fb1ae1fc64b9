"""Base vs fine-tuned, side by side, in the prompt format the model was trained with.

    python -m swallow_ft.compare --base .cache/tiny-swallow --tuned runs/local_tiny \\
        --prompts data/eval_prompts_ja.jsonl --out runs/local_tiny/comparison

--tuned takes export's checkpoint sources (checkpoint_files.py) holding a LoRA adapter or whole model weights; a
ZeRO-3 full fine-tuning checkpoint saved without its weights is refused, naming export, which rebuilds them. Every
input (checkpoint, prompts file and rows, prompt format, dtype, device map) is checked before any weights load.
With an adapter only one copy of the base is loaded: the base answers with the adapter switched off. A merged or full
model is a second copy, loaded under --dtype auto in the base's dtype (a full fine-tuning checkpoint saves fp32).
Answers are greedy, up to --max_new_tokens (default: twice the longest reference in the whole prompts file, in tokens,
within 64..1024, whatever --n is); one that reaches it before the model's end-of-sequence token (or the token closing
a reply in the prompt format) is marked cut, and its final number never counts as a match.
Prompts are rendered in the prompt format and with the system prompt that the run recorded in its checkpoint's
user_data.json (--prompt_format / --system_prompt override them; without a record, the format is chosen from the
base model's name and the system prompt is the format's default). A --base other than the checkpoint's is warned of.
Writes comparison.jsonl (one row per prompt) and comparison.md (the table, the summary, the checkpoint compared).
Messages name the flag and the notebook's parameter (Finetune_Swallow_70B.ipynb) both.
"""

import argparse
import contextlib
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from tqdm.auto import tqdm

from swallow_ft import metrics
from swallow_ft.chat_template import stop_token_ids
from swallow_ft.checkpoint_files import CheckpointRef, base_warning, locate_checkpoint, prompt_settings, tuned_weights
from swallow_ft.data.encoding import IGNORE, encode
from swallow_ft.data.loading import load_raw_datasets
from swallow_ft.data.shapes import detect_shape, row_name, to_conversation
from swallow_ft.data.templates import Conversation, PromptFormat, Turn, choose_format
from swallow_ft.errors import UserError, exit_code_of


@dataclass
class Example:
    index: int
    question: str
    reference: str
    prompt_ids: List[int]
    input_ids: List[int]
    labels: List[int]


class Answer(NamedTuple):
    """A generated answer. cut: generation stopped at max_new_tokens before any stop token, so the answer is
    unfinished (its last number may be one from the working)."""
    text: str
    cut: bool

    def __str__(self) -> str:
        return f"{self.text} {CUT}" if self.cut else self.text


CUT = "[cut]"
BASE, TUNED, PROMPTS = "--base / BASE_MODEL", "--tuned / CHECKPOINT", "--prompts / PROMPTS"
DTYPE, DEVICE_MAP = "--dtype / DTYPE", "--device_map / DEVICE_MAP"
DTYPE_NAMES = {"auto": "auto", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "float32": "float32", "fp32": "float32"}
PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's: on the CPU/disk when GPUs are full
# The default max_new_tokens: twice the longest reference leaves room for an answer worded at more length, the floor
# for short references, and the cap bounds a model that never stops (tiny Swallow may never emit EOS).
NEW_TOKENS_PER_REFERENCE_TOKEN, MIN_NEW_TOKENS, MAX_DEFAULT_NEW_TOKENS = 2, 64, 1024


def load_examples(prompts: str, tokenizer, model_name: str, prompt_format: str = "auto",
                  system_prompt: Optional[str] = None, limit: Optional[int] = None) -> List[Example]:
    """The prompts rendered and tokenised; needs only the tokenizer, so bad files and rows fail before weights."""
    from swallow_ft.arguments import DataTrainingArguments

    rows = load_raw_datasets(DataTrainingArguments(train_file=prompts), train_flag=PROMPTS)["train"]
    shape = detect_shape(rows.column_names, prompts)
    fmt = choose_format(prompt_format, model_name, tokenizer, shape)
    examples = []
    for index in range(min(limit or len(rows), len(rows))):
        conv = to_conversation(rows[index], shape, row_name(prompts, index))
        if conv.text is not None:
            raise UserError(f"{prompts}: compare needs prompts with reference answers, not `text` rows")
        prompt_ids, _ = encode(fmt.render(conv, tokenizer, system_prompt, for_generation=True), tokenizer,
                               fmt.literal_specials)
        input_ids, labels = encode(fmt.render(conv, tokenizer, system_prompt), tokenizer, fmt.literal_specials)
        if len(prompt_ids) < len(input_ids) and input_ids[:len(prompt_ids)] == prompt_ids:
            # The loss is on the reference the report shows, the last reply: the earlier replies of a `messages`
            # row are part of its prompt, as is the question of a `none` (raw text) row.
            labels = [IGNORE] * len(prompt_ids) + labels[len(prompt_ids):]
        examples.append(Example(index, conv.turns[-1].user, conv.turns[-1].assistant, prompt_ids, input_ids, labels))
    return examples


def default_max_new_tokens(examples: List[Example]) -> int:
    longest = max((sum(label != IGNORE for label in e.labels) for e in examples), default=0)
    return min(MAX_DEFAULT_NEW_TOKENS, max(MIN_NEW_TOKENS, NEW_TOKENS_PER_REFERENCE_TOKEN * longest))


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def generate(model, tokenizer, examples: List[Example], max_new_tokens: int, batch_size: int, desc: str,
             fmt: Optional[PromptFormat] = None, system_prompt: Optional[str] = None) -> List[Answer]:
    """Greedy, batched, left-padded (so every row's prompt ends where generation starts). It stops at every id of
    stop_token_ids: generate()'s eos_token_id replaces the model's generation_config's."""
    pad = tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None), fmt, system_prompt)
    outputs = []
    for batch in tqdm(list(_batches(examples, batch_size)), desc=desc, unit="batch"):
        width = max(len(e.prompt_ids) for e in batch)
        ids = torch.tensor([[pad] * (width - len(e.prompt_ids)) + e.prompt_ids for e in batch])
        mask = torch.tensor([[0] * (width - len(e.prompt_ids)) + [1] * len(e.prompt_ids) for e in batch])
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad)
        for row in out[:, width:].tolist():
            # The answer ends before its first stop token (padding follows it); a row without one ran to
            # max_new_tokens. A stop id from generation_config need not be a special token that decode() skips.
            end = next((i for i, token in enumerate(row) if token in stops), None)
            outputs.append(Answer(tokenizer.decode(row[:end], skip_special_tokens=True).strip(), end is None))
    return outputs


@torch.no_grad()
def reference_loss(model, examples: List[Example], batch_size: int, pad_token_id: int) -> float:
    """Mean loss per reference token (the last reply's trained tokens, see load_examples): perplexity = exp(loss)."""
    total, count = 0.0, 0
    for batch in _batches(examples, batch_size):
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [pad_token_id] * (width - len(e.input_ids)) for e in batch])
        labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in batch])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(e.input_ids) for e in batch])[:, None]).long()
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        shifted = labels[:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE,
                                                   reduction="sum")
        total += losses.item()
        count += int((shifted != IGNORE).sum())
    return total / max(count, 1)


class SideBySide:
    """The tokenizer and both models: for compare() and for trying prompts in the notebook.

    Construction checks every input and loads the tokenizer (and a LoRA adapter's small weights); the models load
    once, on first use or load(), so that examples() can reject a bad prompts file before minutes of loading.
    prompt_format and system_prompt default to what the tuned run trained with (see checkpoint_files.prompt_settings).
    storage: the directory holding <uuid>/ when --tuned is a UUID; .checkpoint: what --tuned resolved to.
    A LoRA checkpoint loads one copy of the base (the base answers with the adapter off); a merged or fully fine-tuned
    one loads a second full model, twice the memory (for 70B in bf16, ~277 GB).
    """

    def __init__(self, base: str, tuned: str, prompt_format: Optional[str] = None, system_prompt: Optional[str] = None,
                 dtype: str = "auto", device_map: Optional[str] = None, storage: Optional[str] = None):
        from swallow_ft.arguments import ModelArguments
        from swallow_ft.export import resolve_base
        from swallow_ft.model import load_tokenizer

        self._dtype, self._device_map = check_dtype(dtype), check_device_map(device_map)
        self.base_name, self.tuned_name = base, tuned
        self._base = resolve_base(base, flag=BASE)
        # Once: on a cluster this downloads it. A full model saved empty is refused below, so without its shards.
        self.checkpoint = locate_checkpoint(tuned, storage, flag=TUNED, rebuild_full=False)
        self.prompt_format, self.system_prompt = prompt_settings(self.checkpoint.path, prompt_format, system_prompt)
        self.tokenizer = load_tokenizer(ModelArguments(model_name_or_path=self._base))
        self.tokenizer.padding_side = "left"
        self._format("messages")  # an unknown --prompt_format fails now, not after the weights have loaded
        self._adapter, self._tuned_model_dir = tuned_weights(self.checkpoint.path, tuned, storage, TUNED)
        _warn(base_warning(base, self.checkpoint.path, BASE))
        self.base_model = self.tuned_model = self.as_base = None

    def load(self) -> "SideBySide":
        """Load the weights now (answers() and losses() do on first use); once only."""
        if self.tuned_model is None:
            self.base_model, self.tuned_model, self.as_base = _load_models(
                self._base, self._tuned_model_dir, self._adapter, self._dtype, self._device_map)
        return self

    def _format(self, shape: str):
        return choose_format(self.prompt_format, self.base_name, self.tokenizer, shape)

    def examples(self, prompts: str, limit: Optional[int] = None) -> List[Example]:
        return load_examples(prompts, self.tokenizer, self.base_name, self.prompt_format, self.system_prompt, limit)

    def answers(self, examples: List[Example], max_new_tokens: Optional[int] = None,
                batch_size: int = 8) -> Tuple[List[Answer], List[Answer]]:
        """(base answers, tuned answers); max_new_tokens None: default_max_new_tokens(examples)."""
        max_new_tokens = max_new_tokens or default_max_new_tokens(examples)
        self.load()
        settings = (self._format("messages"), self.system_prompt)  # its closing token stops generation too
        with self.as_base():
            base = generate(self.base_model, self.tokenizer, examples, max_new_tokens, batch_size, "base", *settings)
        tuned = generate(self.tuned_model, self.tokenizer, examples, max_new_tokens, batch_size, "tuned", *settings)
        return base, tuned

    def losses(self, examples: List[Example], batch_size: int = 8):
        pad = self.tokenizer.pad_token_id
        self.load()
        with self.as_base():
            base = reference_loss(self.base_model, examples, batch_size, pad)
        return base, reference_loss(self.tuned_model, examples, batch_size, pad)

    def ask(self, question: str, max_new_tokens: Optional[int] = None) -> Dict[str, Answer]:
        """One free-form prompt, answered by both models in the training format (None: 256 new tokens at most;
        print an Answer to see its text, marked [cut] if it reached the limit)."""
        conv = Conversation(turns=[Turn(question, "")])
        fmt = self._format("messages")
        ids, _ = encode(fmt.render(conv, self.tokenizer, self.system_prompt, for_generation=True), self.tokenizer,
                        fmt.literal_specials)
        example = Example(0, question, "", ids, ids, [IGNORE] * len(ids))
        base, tuned = self.answers([example], max_new_tokens or 256, batch_size=1)
        return {"base": base[0], "tuned": tuned[0]}


def _warn(line: Optional[str]) -> None:
    if line:
        print(line, file=sys.stderr, flush=True)


def check_dtype(dtype) -> str:
    """The torch dtype's name that from_pretrained takes, or "auto"; also from bf16/fp16/fp32 or a torch.dtype."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise UserError(f"{DTYPE} {dtype!r}: not one of auto, bfloat16, float16, float32 (or bf16, fp16, fp32); "
                        "bfloat16 for Swallow-70B")
    return DTYPE_NAMES[name]


def check_device_map(device_map):
    """Checked against this machine's devices before anything loads: from_pretrained fails only at the weights."""
    if device_map is None or isinstance(device_map, dict) or device_map in PLACEMENTS:
        return device_map
    kind, _, index = ("cuda", "", str(device_map)) if str(device_map).isdigit() else str(device_map).partition(":")
    counts = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if kind not in counts or not re.fullmatch(r"\d*", index):
        raise UserError(f"{DEVICE_MAP} {device_map!r}: not one of {', '.join(PLACEMENTS)}, cpu, cuda, cuda:N; "
                        '"auto" spreads the model over the GPUs, None loads it on the CPU')
    if int(index or 0) >= counts[kind]:
        raise UserError(f"{DEVICE_MAP} {device_map!r}: no such device here ({counts['cuda']} CUDA GPUs visible); "
                        'use None to load on the CPU, or "auto" where there are GPUs (notebook.yaml)')
    return device_map


def offload_warning(model, device_map, which: str, adapter: bool = False) -> Optional[str]:
    """One line when accelerate put part of MODEL on the CPU or disk (run there, or copied to a GPU per token).
    Refused for a base on disk with an adapter to load: peft's loader (_update_offload) rewrites the safetensors files
    that disk offloading reads, which are the base model's own unless it is in the Hub cache."""
    placed = getattr(model, "hf_device_map", None) or {}
    slow = sorted({str(device) for device in placed.values() if device in ("cpu", "disk")})
    if adapter and "disk" in slow:
        raise UserError(f"{DEVICE_MAP} {device_map}: part of the base model went to disk, where loading the adapter "
                        "would rewrite the base's weight files; give it more GPU (or CPU) memory: Swallow-70B in bf16 "
                        "needs 4 x 80 GB GPUs")
    if device_map in PLACEMENTS and slow:
        return (f"warning: {DEVICE_MAP} {device_map}: parts of the {which} model are on {' and '.join(slow)} (GPU "
                "memory full, or no GPU), so generation will be very slow; Swallow-70B in bf16 needs 4 x 80 GB GPUs "
                "(~129 GiB of weights, see notebook.yaml)")
    return None


def _load_models(base: str, tuned_model_dir: Optional[str], adapter: Optional[tuple], dtype: str,
                 device_map: Optional[str]):
    """(base_model, tuned_model, base_context): base_context() switches the adapter off when shared."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(path, dtype, which):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map).eval()
        _warn(offload_warning(model, device_map, which, adapter=adapter is not None))
        return model

    base_model = load(base, dtype, "base")
    if adapter is None:
        # "auto" means the base's dtype for both, as export writes: full fine-tuning without DeepSpeed saves fp32
        # weights of a bf16 base, which would take twice the memory and compare two precisions.
        tuned_model = load(tuned_model_dir, base_model.dtype if dtype == "auto" else dtype, "tuned")
        return base_model, tuned_model, contextlib.nullcontext
    from swallow_ft.export import write_adapter

    # Written out only for peft's loader, which reads it into memory: nothing is left in /tmp.
    with tempfile.TemporaryDirectory(prefix="swallow-adapter-") as adapter_dir:
        write_adapter(Path(adapter_dir), *adapter)
        tuned_model = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    return tuned_model, tuned_model, tuned_model.disable_adapter


def compare(base: str, tuned: str, prompts: str, out: Path, prompt_format: Optional[str] = None,
            system_prompt: Optional[str] = None, max_new_tokens: Optional[int] = None, batch_size: int = 8,
            limit: Optional[int] = None, dtype: str = "auto", device_map: Optional[str] = None,
            models: Optional[SideBySide] = None, storage: Optional[str] = None) -> Dict:
    for flag, value, fix in (("--max_new_tokens / MAX_NEW_TOKENS", max_new_tokens, ", or None, for the default"),
                             ("--batch_size", batch_size, " for 8"), ("--n / N_PROMPTS", limit, ", or None, for all")):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1 (leave it out{fix})")
    models = models or SideBySide(base, tuned, prompt_format, system_prompt, dtype, device_map, storage)
    examples = models.examples(prompts)  # every row, checked before models.answers() loads the weights
    # The default from every reference in the file (tokens only, cheap): --n 3 and a full run cut answers alike.
    max_new_tokens = max_new_tokens or default_max_new_tokens(examples)
    examples = examples[:limit]
    answers = dict(zip(("base", "tuned"), models.answers(examples, max_new_tokens, batch_size)))
    losses = dict(zip(("base", "tuned"), models.losses(examples, batch_size)))
    rows = [{"index": e.index, "prompt": e.question, "reference": e.reference,
             **{name: answers[name][i].text for name in answers},
             "cut": {name: answers[name][i].cut for name in answers},
             "scores": {name: metrics.score(answers[name][i].text, e.reference, cut=answers[name][i].cut)
                        for name in answers}}
            for i, e in enumerate(examples)]
    ref = models.checkpoint  # recorded: best:<id> and a run directory name another checkpoint as the run goes on
    summary = {"prompts": prompts, "n": len(rows), "base_model": base, "tuned_model": tuned,
               "tuned_checkpoint": str(ref.path), "tuned_uuid": ref.uuid, "tuned_trial_id": ref.trial_id,
               "prompt_format": models.prompt_format, "system_prompt": models.system_prompt,
               "max_new_tokens": max_new_tokens}
    for name, loss in losses.items():
        summary[name] = {**metrics.mean_scores(r["scores"][name] for r in rows), "loss": loss,
                         "perplexity": math.exp(min(loss, 50)), "cut": sum(r["cut"][name] for r in rows)}
    write_report(Path(out), rows, summary)
    return summary


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_table(summary: Dict) -> str:
    lines = [f"| model | char F1 | ROUGE-L (chars) | final-number match | cut at {summary['max_new_tokens']} tokens "
             "| loss | perplexity |", "|---|---|---|---|---|---|---|"]
    for name in ("base", "tuned"):
        s = summary[name]
        lines.append(f"| {name} | {_fmt(s['char_f1'])} | {_fmt(s['rouge_l'])} | {_fmt(s['number_match'])} "
                     f"| {s['cut']}/{summary['n']} | {_fmt(s['loss'])} | {_fmt(s['perplexity'])} |")
    return "\n".join(lines)


def write_report(out: Path, rows: List[Dict], summary: Dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "comparison.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    resolved = CheckpointRef(Path(summary["tuned_checkpoint"]), summary["tuned_uuid"], summary["tuned_trial_id"])
    table = ["| # | prompt | reference | base | tuned | char F1 base → tuned | number base → tuned |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, t = r["scores"]["base"], r["scores"]["tuned"]
        base, tuned = (_cell(str(Answer(r[name], r["cut"][name]))) for name in ("base", "tuned"))
        table.append(f"| {r['index']} | {_cell(r['prompt'])} | {_cell(r['reference'])} | {base} "
                     f"| {tuned} | {_fmt(b['char_f1'])} → {_fmt(t['char_f1'])} "
                     f"| {_fmt(b['number_match'])} → {_fmt(t['number_match'])} |")
    (out / "comparison.md").write_text(
        f"# Base vs fine-tuned\n\nbase: `{summary['base_model']}`  \ntuned: `{summary['tuned_model']}` → "
        f"{resolved.describe()}  \n"
        f"prompts: `{summary['prompts']}` ({summary['n']})  \nprompt format: `{summary['prompt_format']}`  \n"
        f"max new tokens: {summary['max_new_tokens']} ({CUT}: the answer reached it before an end-of-sequence token; "
        "unfinished, so its final number is not counted as a match)\n\n"
        f"{summary_table(summary)}\n\n" + "\n".join(table) + "\n",
        encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swallow_ft.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base model: Hub id or directory")
    parser.add_argument("--tuned", required=True,
                        help="adapter dir, merged model dir, or a checkpoint source (a UUID with --storage DIR)")
    parser.add_argument("--prompts", required=True, help="json/jsonl/csv/parquet in a shape run_clm.py reads")
    parser.add_argument("--out", type=Path, default=Path("comparison"))
    parser.add_argument("--prompt_format", help="default: the run's (from its checkpoint), else auto")
    parser.add_argument("--system_prompt", help="default: the run's (from its checkpoint), else the format's")
    parser.add_argument("--max_new_tokens", type=int,
                        help="default: twice the longest reference in the prompts file (in tokens), within 64..1024")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--n", type=int, help="only the first N prompts")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPE_NAMES))
    parser.add_argument("--device_map", help='e.g. "auto" to spread a 70B model over the GPUs')
    parser.add_argument("--storage", help="checkpoint storage directory holding <uuid>/ (for a UUID --tuned)")
    args = parser.parse_args(argv)

    def run():
        summary = compare(args.base, args.tuned, args.prompts, args.out, args.prompt_format, args.system_prompt,
                          args.max_new_tokens, args.batch_size, args.n, args.dtype, args.device_map,
                          storage=args.storage)
        print(f"\n{summary_table(summary)}\n\nreport: {args.out / 'comparison.md'} "
              f"(rows: {args.out / 'comparison.jsonl'})")

    return exit_code_of(run)


if __name__ == "__main__":
    sys.exit(main())
