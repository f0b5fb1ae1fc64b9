"""compare: both models answer in the run's own prompt format; report files, scores and losses are consistent."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_clm
from transformers import AutoModelForCausalLM

from swallow_ft.arguments import DataTrainingArguments
from swallow_ft.compare import SideBySide, compare, main, prompt_settings
from swallow_ft.data.loading import encode_example, load_raw_datasets
from swallow_ft.data.templates import FORMATS
from swallow_ft.export import resolve_checkpoint

PROMPTS = str(REPO / "data/eval_prompts_ja.jsonl")
# Not local_tiny.yaml's swallow-instruct-v0.1 with its default system prompt, which compare used to assume.
FORMAT, SYSTEM = "chat_template", "あなたは計算の先生です。答えだけを書きます。"


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run_clm("--config", "experiments/local_tiny.yaml", "--runs_dir", runs, "--max_steps", 80,
                     "--eval_steps", 40, "--save_steps", 40, "--prompt_format", FORMAT, "--system_prompt", SYSTEM)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / "local_tiny"


def test_prompts_are_rendered_as_the_run_trained_them(trained_run, tiny_model):
    models = SideBySide(str(tiny_model), str(trained_run))
    assert (models.prompt_format, models.system_prompt) == (FORMAT, SYSTEM)
    example = models.examples(PROMPTS, limit=1)[0]
    # The template's text, "<s>" included, is tokenised as one string: no word-boundary space after BOS, unlike
    # swallow-instruct-v0.1's "<s> [INST] <<SYS>>\nあなたは誠実で優秀な日本人のアシスタントです。...", compare's old guess.
    assert models.tokenizer.decode(example.prompt_ids) == (
        f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n53 と 50 の和を求めなさい。 [/INST]")
    # Token for token what training encoded for the same row, and the prompt is exactly its untrained head.
    trained = DataTrainingArguments(train_file=PROMPTS, prompt_format=FORMAT, system_prompt=SYSTEM)
    row = load_raw_datasets(trained)["train"][0]
    ids, labels = encode_example(row, "row 0", "camel-math", FORMATS[FORMAT], models.tokenizer, trained)
    assert (example.input_ids, example.labels) == (ids, labels)
    assert ids[:len(example.prompt_ids)] == example.prompt_ids and labels[len(example.prompt_ids) - 1] == -100


def test_the_run_records_its_settings_and_explicit_ones_override_them(trained_run, tmp_path):
    checkpoint = resolve_checkpoint(str(trained_run))
    assert json.loads((checkpoint / "user_data.json").read_text(encoding="utf-8")) == {
        "finetuned_from": ".cache/tiny-swallow", "dataset": "data/camel_math_ja.jsonl",
        "prompt_format": FORMAT, "system_prompt": SYSTEM}
    assert prompt_settings(checkpoint) == (FORMAT, SYSTEM)
    assert prompt_settings(checkpoint, "swallow-instruct-v0.1") == ("swallow-instruct-v0.1", SYSTEM)
    assert prompt_settings(checkpoint, system_prompt="") == (FORMAT, "")
    # A checkpoint from before the settings were recorded: the format from the base's name, the format's default.
    old = tmp_path / "checkpoint-40"
    old.mkdir()
    (old / "user_data.json").write_text(json.dumps({"finetuned_from": ".cache/tiny-swallow", "dataset": "x"}))
    assert prompt_settings(old) == ("auto", None)


def test_compare_writes_a_report_where_fine_tuning_shows(trained_run, tiny_model, tmp_path):
    summary = compare(str(tiny_model), str(trained_run), PROMPTS, tmp_path, max_new_tokens=32, limit=6)
    rows = [json.loads(line) for line in (tmp_path / "comparison.jsonl").read_text().splitlines()]
    assert len(rows) == summary["n"] == 6
    assert set(rows[0]) == {"index", "prompt", "reference", "base", "tuned", "scores"}
    assert rows[0]["reference"] == "53 + 50 = 103 です。答え: 103"
    # Fine-tuning on the answers lowers the loss on held-out references.
    assert summary["tuned"]["loss"] < summary["base"]["loss"]
    assert summary["tuned"]["perplexity"] < summary["base"]["perplexity"]
    report = (tmp_path / "comparison.md").read_text()
    assert "| model | char F1 | ROUGE-L (chars) | final-number match | loss | perplexity |" in report
    assert "53 と 50 の和を求めなさい。" in report and f"prompt format: `{FORMAT}`" in report


def test_the_base_really_answers_without_the_adapter(trained_run, tiny_model):
    models = SideBySide(str(tiny_model), str(trained_run))
    examples = models.examples(PROMPTS, limit=2)
    base_loss, tuned_loss = models.losses(examples)
    assert base_loss != tuned_loss
    answer = models.ask("12 と 30 の和を求めなさい。", max_new_tokens=16)
    assert set(answer) == {"base", "tuned"}


def test_cli_prints_where_the_report_is(trained_run, tiny_model, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "swallow_ft.compare", "--base", str(tiny_model), "--tuned",
                             str(trained_run), "--prompts", "data/eval_prompts_ja.jsonl", "--out", str(out),
                             "--n", "3", "--max_new_tokens", "16"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {out / 'comparison.md'}" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "swallow_ft.compare", "--base", str(tiny_model), "--tuned",
                          str(trained_run), "--prompts", "data/nope.jsonl"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "error: data/nope.jsonl: data file not found" in bad.stderr


def test_cli_takes_a_checkpoint_uuid_with_storage(trained_run, tiny_model, tmp_path, capsys):
    uuid_dir = resolve_checkpoint(str(trained_run)).parent  # runs/local_tiny/checkpoints/<uuid>
    models = SideBySide(str(tiny_model), uuid_dir.name, storage=str(uuid_dir.parent))
    assert (models.prompt_format, models.system_prompt) == (FORMAT, SYSTEM)  # the same run's record
    out = tmp_path / "report"
    assert main(["--base", str(tiny_model), "--tuned", uuid_dir.name, "--storage", str(uuid_dir.parent),
                 "--prompts", PROMPTS, "--out", str(out), "--n", "1", "--max_new_tokens", "4"]) == 0
    assert json.loads((out / "summary.json").read_text())["tuned_model"] == uuid_dir.name


TEXT_ROWS = '{"text": "53 と 50 の和は 103 です。"}\n'
BAD_ROW = '{"message_1": "53 と 50 の和を求めなさい。", "message_2": 103}\n'


@pytest.mark.parametrize("flags, files, error", [
    (["--prompts", "{tmp}/nope.jsonl"], {}, "{tmp}/nope.jsonl: data file not found"),
    (["--prompts", "{tmp}/text.jsonl"], {"text.jsonl": TEXT_ROWS},
     "{tmp}/text.jsonl: compare needs prompts with reference answers, not `text` rows"),
    (["--prompts", "{tmp}/bad.jsonl"], {"bad.jsonl": BAD_ROW},
     "{tmp}/bad.jsonl line 1: message_2 must be a string, got int; convert it to text"),
    (["--prompt_format", "llama-3"], {}, "--prompt_format 'llama-3' is not one of auto, swallow-instruct-v0.1, "
     "swallow-instruct-v0, llama3, chat_template, none"),
    (["--base", ".cache/tiny-swalow"], {},
     "--base .cache/tiny-swalow: no such directory; pass the base model's directory or its Hub id"),
    (["--tuned", "{tmp}/local_tny"], {}, "--tuned {tmp}/local_tny: no such checkpoint directory; pass a "
     "checkpoint-N directory, a Determined checkpoint directory, a run directory such as runs/local_tiny, or a UUID "
     "with --storage DIR"),
    (["--storage", "{tmp}"], {}, "{tmp}/{uuid}: no such checkpoint in --storage {tmp} (its subdirectories are UUIDs)"),
], ids=["missing-prompts", "text-rows", "bad-row", "unknown-format", "base-typo", "tuned-typo", "wrong-storage"])
def test_bad_inputs_fail_in_one_line_before_any_weights_load(flags, files, error, trained_run, tiny_model, tmp_path,
                                                               capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the inputs were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    uuid = resolve_checkpoint(str(trained_run)).parent.name
    given = {"--base": str(tiny_model), "--tuned": str(trained_run), "--prompts": PROMPTS}
    given.update(zip(flags[::2], (f.format(tmp=tmp_path) for f in flags[1::2])))
    if "--storage" in given:
        given["--tuned"] = uuid
    assert main([part for pair in given.items() for part in pair]) == 2
    err = capsys.readouterr().err  # after any progress bars of the datasets library
    assert f"\n{err}".endswith(f"\nerror: {error.format(tmp=tmp_path, uuid=uuid)}\n")
    assert err.count("error:") == 1
