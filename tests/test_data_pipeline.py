"""The data path as training uses it: packing without contamination, loss normalisation, policies, preview."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from swallow_ft.arguments import DataTrainingArguments
from swallow_ft.data import build_collator, build_datasets
from swallow_ft.data.encoding import IGNORE
from swallow_ft.data.packing import PackedCollator, pack
from swallow_ft.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    model.config.use_cache = False
    return model


def training_args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kw)


def data_args(**kw):
    return DataTrainingArguments(**{"train_file": str(REPO / "data/camel_math_ja.jsonl"), **kw})


def examples(tokenizer):
    texts = ["81 と 70 の和を求めなさい。", "方程式 3x + 4 = 19 を解きなさい。 x = 5 です。", "こんにちは"]
    return [tokenizer(t).input_ids for t in texts]


def test_packed_rows_give_exactly_the_per_example_logits(model, tokenizer):
    rows = examples(tokenizer)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in rows]
        flat = torch.tensor([sum(rows, [])])
        restart = torch.tensor([sum((list(range(len(ids))) for ids in rows), [])])
        packed = model(input_ids=flat, position_ids=restart).logits[0]
        naive = model(input_ids=flat).logits[0]  # plain concatenation: later examples see earlier ones
    expected = torch.cat(alone)
    assert torch.allclose(packed, expected, atol=1e-5)
    later = slice(len(rows[0]), None)
    assert (naive[later] - expected[later]).abs().max() > 1e-2  # the check above can see contamination


def test_pack_fills_rows_and_the_collator_restarts_positions(tokenizer):
    from datasets import Dataset

    lengths = [5, 3, 7, 2, 6]
    ds = Dataset.from_dict({"input_ids": [[7] * n for n in lengths], "labels": [[7] * n for n in lengths]})
    packed = pack(ds, block_size=10)
    # First-fit decreasing: 7+3, 6+2, 5.
    assert sorted(packed["position_ids"], key=len) == [
        [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]]
    batch = PackedCollator(pad_token_id=0)([packed[0], packed[2]])
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape[1] == max(len(packed[0]["input_ids"]), len(packed[2]["input_ids"]))
    assert (batch["labels"] == IGNORE).sum() == abs(len(packed[0]["input_ids"]) - len(packed[2]["input_ids"]))
    # A fixed width (what --torch_compile uses: one static shape): the padding is its own position run, never trained.
    fixed = PackedCollator(pad_token_id=0, width=12)([packed[0], packed[2]])
    assert fixed["input_ids"].shape == (2, 12)
    assert fixed["position_ids"][0].tolist() == packed[0]["position_ids"] + list(range(12 - len(packed[0]["input_ids"])))
    assert torch.equal(fixed["labels"][:, :batch["labels"].shape[1]][batch["labels"] != IGNORE],
                       batch["labels"][batch["labels"] != IGNORE])
    assert (fixed["labels"] != IGNORE).sum() == (batch["labels"] != IGNORE).sum()


def test_unpacked_batches_pad_to_the_longest_row_not_block_size(tokenizer, tmp_path):
    data = build_datasets(data_args(block_size=512, prompt_format="swallow-instruct-v0.1"),
                          training_args(tmp_path), tokenizer, "tiny")
    rows = [data.train[i] for i in range(4)]
    batch = build_collator(tokenizer, packing=False)(rows)
    assert batch["input_ids"].shape[1] == max(len(r["input_ids"]) for r in rows) < 512
    assert (batch["labels"] == tokenizer.eos_token_id).sum() == 4  # EOS trained, never masked as padding


class GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def test_gradient_accumulation_normalises_per_token(tiny_model, tokenizer, tmp_path):
    """1 x batch 4 and 4 x batch 1 must give the same gradient: a mean over trained tokens."""
    data = build_datasets(data_args(prompt_format="swallow-instruct-v0.1", max_train_samples=4),
                          training_args(tmp_path), tokenizer, "tiny")
    n_trained = [sum(label != IGNORE for label in r["labels"]) for r in data.train]
    assert len(set(n_trained)) > 1  # unequal lengths, or a mean of per-batch means would also pass

    grads = []
    for batch, accumulation in ((4, 1), (1, 4)):
        capture = GradCapture()
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        args = training_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             max_steps=1, learning_rate=0.0, train_sampling_strategy="sequential", save_strategy="no")
        Trainer(model=model, args=args, train_dataset=data.train, data_collator=build_collator(tokenizer, False),
                callbacks=[capture]).train()
        grads.append(capture.grads)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_overlong_policy_and_examples_with_no_reply_left(tokenizer, tmp_path, caplog):
    # block_size 30 is shorter than the default system prompt: every reply is cut away
    with pytest.raises(UserError, match="no example is left to train on"):
        build_datasets(data_args(block_size=30, prompt_format="swallow-instruct-v0.1"), training_args(tmp_path),
                       tokenizer, "tiny")
    kept = build_datasets(data_args(block_size=60, prompt_format="swallow-instruct-v0.1"), training_args(tmp_path),
                          tokenizer, "tiny")
    dropped = build_datasets(data_args(block_size=60, prompt_format="swallow-instruct-v0.1", overlong="drop"),
                             training_args(tmp_path), tokenizer, "tiny")
    assert len(dropped.train) < len(kept.train)
    assert all(len(r) <= 60 for r in kept.train["input_ids"])
    assert "longer than block_size were truncated (--overlong truncate)" in caplog.text


def test_bad_rows_stop_with_the_row_index_or_are_skipped_and_counted(tokenizer, tmp_path, caplog):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    bad = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "user", "content": "?"}]}
    path.write_text("\n".join(json.dumps(r) for r in [good] * 30 + [bad] + [good] * 9) + "\n")
    args = dict(train_file=str(path), prompt_format="swallow-instruct-v0.1", validation_split_percentage=10)
    with pytest.raises(UserError, match=f"{path} row 30: messages 0.. have roles \\['user', 'user'\\]"):
        build_datasets(DataTrainingArguments(**args), training_args(tmp_path), tokenizer, "tiny")
    data = build_datasets(DataTrainingArguments(**args, skip_bad_rows=True), training_args(tmp_path), tokenizer, "tiny")
    assert len(data.train) + len(data.validation) == 39
    assert "skipped 1 bad rows" in caplog.text


def test_packing_reports_its_efficiency(tokenizer, tmp_path):
    data = build_datasets(data_args(block_size=256, prompt_format="swallow-instruct-v0.1", packing=True),
                          training_args(tmp_path), tokenizer, "tiny")
    assert set(data.train.column_names) == {"input_ids", "labels", "position_ids"}
    assert all(len(r) <= 256 for r in data.train["input_ids"])
    assert 0.8 < data.packing_efficiency <= 1.0


def test_preview_json_shows_exactly_what_is_trained(tiny_model):
    result = subprocess.run([sys.executable, "-m", "swallow_ft.data", "preview", "--config",
                             "experiments/local_tiny.yaml", "--n", "2", "--format", "json"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0] == {
        "text": "<s> [INST] <<SYS>>\nあなたは誠実で優秀な日本人のアシスタントです。\n<</SYS>>\n\n"
                "81 と 70 の和を求めなさい。 [/INST] 81 + 70 = 151 です。答え: 151 </s>",
        "train_text": "81 + 70 = 151 です。答え: 151 </s>", "n_tokens": 58, "n_train_tokens": 22}
    assert len(rows) == 2 and rows[1]["train_text"].endswith("答え: 1 </s>")


def test_preview_text_marks_trained_spans(tiny_model):
    result = subprocess.run([sys.executable, "-m", "swallow_ft.data", "preview", "--model_name_or_path",
                             str(tiny_model), "--train_file", "data/chat_ja.jsonl", "--n", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "row 0 · swallow-instruct-v0.1" in result.stdout
    assert "[/INST]⟦ 32 + 13 = 45 です。 </s>⟧<s> [INST] その答えを 4 倍にしてください。 [/INST]⟦" in result.stdout
