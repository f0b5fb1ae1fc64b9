"""Build "tiny Swallow": a few-layer LlamaForCausalLM with a real sentencepiece Llama tokenizer.

The real Swallow checkpoints are 14-140 GB. Local runs and the tests need the same architecture
family and the same tokenizer machinery in a size that trains in seconds on a CPU, so this module
trains a byte-fallback BPE sentencepiece model on text the repo ships (Japanese and English) and
initialises a small Llama with a fixed seed. Everything is deterministic, written once to
`.cache/tiny-swallow` and then loaded through the ordinary `from_pretrained` path.

    python -m swallow_ft.tiny [--out DIR] [--force]
"""

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from swallow_ft import REPO_ROOT

DEFAULT_DIR = REPO_ROOT / ".cache" / "tiny-swallow"
CORPUS_FILES = (REPO_ROOT / "data" / "tokenizer_corpus.txt", REPO_ROOT / "data" / "camel_math_ja.jsonl")

# Shape knobs. Swallow-7b is hidden 4096 x 32 layers with a 43,176 vocabulary; this keeps the family
# (RMSNorm, RoPE, SwiGLU, grouped KV heads) at a size a 2-core CI machine trains in seconds.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
VOCAB_SIZE = 1200
SEED = 1234
PRETRAIN_STEPS = 300
# Bumped whenever the recipe changes, so a stale cache is rebuilt instead of silently reused.
RECIPE_VERSION = "2"
# A Llama-2 chat template that renders exactly the swallow-instruct-v0.1 format (tests hold it to that).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = none -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token }}[INST] {% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] }} [/INST]"
    "{%- elif message['role'] == 'assistant' %}"
    " {{ message['content'] }} {{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _corpus_lines(with_answers: bool = True):
    for path in CORPUS_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if path.suffix == ".jsonl":
                row = json.loads(line)
                yield row["message_1"]
                if with_answers:
                    yield row["message_2"]
            elif line.strip():
                yield line


def _pretrain(model, tokenizer, steps: int = PRETRAIN_STEPS) -> None:
    """A short causal-LM pre-training so the base is a language model, not noise.

    It sees the bilingual corpus and the sample's questions but never their answers: like a real
    base model, it knows the language of the task but has not been tuned to answer it, which leaves
    fine-tuning something to learn. One thread and a fixed seed keep it reproducible.
    """
    import torch

    lines = list(_corpus_lines(with_answers=False))
    ids = [tokenizer(line).input_ids + [tokenizer.eos_token_id] for line in lines]
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(steps):
            batch = [ids[i] for i in torch.randint(len(ids), (16,), generator=generator).tolist()]
            width = max(map(len, batch))
            input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in batch])
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
            labels = input_ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def recipe_fingerprint() -> str:
    h = hashlib.sha256(RECIPE_VERSION.encode())
    h.update(json.dumps([TINY_CONFIG, VOCAB_SIZE, SEED, PRETRAIN_STEPS, CHAT_TEMPLATE], sort_keys=True).encode())
    for path in CORPUS_FILES:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _train_sentencepiece(model_file: Path) -> None:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    # Llama-2/Swallow conventions: BPE, byte fallback, digits split, <unk>=0 <s>=1 </s>=2, no pad
    # piece (Swallow pads with id 0). One thread and an in-memory corpus (no temp paths recorded in
    # the model's trainer spec) make the file byte-identical on every machine.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_corpus_lines())), model_writer=model, vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
        minloglevel=2,
    )
    model_file.write_bytes(model.getvalue())


def build(out_dir: Path = DEFAULT_DIR, force: bool = False) -> Path:
    """Create the tiny model at out_dir unless an up-to-date copy is already there."""
    out_dir = Path(out_dir)
    stamp = out_dir / "tiny_recipe.txt"
    fingerprint = recipe_fingerprint()
    if not force and stamp.exists() and stamp.read_text().strip() == fingerprint:
        return out_dir

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename at the end: an interrupted build never leaves a
    # half-written model that later runs would pick up.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".tiny-build-") as tmp:
        tmp = Path(tmp)
        stage = tmp / "model"
        stage.mkdir()
        _train_sentencepiece(stage / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(stage, add_bos_token=True, add_eos_token=False,
                                                   model_max_length=4096)
        tokenizer.pad_token = tokenizer.unk_token  # Swallow pads with id 0 (<unk>), never with EOS.
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(stage)

        torch.manual_seed(SEED)
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **TINY_CONFIG)
        model = LlamaForCausalLM(config)
        _pretrain(model, tokenizer)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, do_sample=False)
        model.save_pretrained(stage, safe_serialization=True)
        (stage / "tiny_recipe.txt").write_text(fingerprint + "\n")

        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.rename(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="where to write the model")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date copy exists")
    args = parser.parse_args(argv)
    path = build(args.out, force=args.force)
    print(f"tiny Swallow ready at {path}")


if __name__ == "__main__":
    main()
