"""compare: both models answer in the training format; report files, scores and losses are consistent."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_clm

from swallow_ft.compare import SideBySide, compare


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = run_clm("--config", "experiments/local_tiny.yaml", "--runs_dir", runs, "--max_steps", 80,
                     "--eval_steps", 40, "--save_steps", 40)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / "local_tiny"


def test_compare_writes_a_report_where_fine_tuning_shows(trained_run, tiny_model, tmp_path):
    summary = compare(str(tiny_model), str(trained_run), str(REPO / "data/eval_prompts_ja.jsonl"), tmp_path,
                      max_new_tokens=32, limit=6)
    rows = [json.loads(line) for line in (tmp_path / "comparison.jsonl").read_text().splitlines()]
    assert len(rows) == summary["n"] == 6
    assert set(rows[0]) == {"index", "prompt", "reference", "base", "tuned", "scores"}
    assert rows[0]["reference"] == "53 + 50 = 103 です。答え: 103"
    # Fine-tuning on the answers lowers the loss on held-out references.
    assert summary["tuned"]["loss"] < summary["base"]["loss"]
    assert summary["tuned"]["perplexity"] < summary["base"]["perplexity"]
    report = (tmp_path / "comparison.md").read_text()
    assert "| model | char F1 | ROUGE-L (chars) | final-number match | loss | perplexity |" in report
    assert "53 と 50 の和を求めなさい。" in report


def test_the_base_really_answers_without_the_adapter(trained_run, tiny_model):
    models = SideBySide(str(tiny_model), str(trained_run))
    examples = models.examples(str(REPO / "data/eval_prompts_ja.jsonl"), limit=2)
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
