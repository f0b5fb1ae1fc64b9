"""compare: both models answer in the run's own prompt format; report files, scores and losses are consistent."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_clm

from swallow_ft.arguments import DataTrainingArguments
from swallow_ft.compare import SideBySide, compare, prompt_settings
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
