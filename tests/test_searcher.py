"""swallow_ft.searcher: the searcher section against the Trainer's flags finds, before any weights load, what the
Determined 0.38 master would only trip over mid-search, and computes the rungs the master really judges at."""

import re

import pytest
import yaml
from conftest import REPO, read_metrics, run_clm

from swallow_ft import searcher as checks
from swallow_ft.arguments import parse_input_arguments
from swallow_ft.expconf import validate
from swallow_ft.experiment import Experiment

SEARCH = REPO / "experiments/swallow_7b_search.yaml"
ASHA = {"name": "adaptive_asha", "metric": "eval_loss", "time_metric": "batches", "max_time": 400, "max_trials": 16}


def training_args(*flags):
    base = ["--model_name_or_path", "x", "--train_file", "data/camel_math_ja.jsonl", "--output_dir", "/tmp/unused",
            "--eval_strategy", "steps", "--eval_steps", "25", "--use_cpu", "true"]
    return parse_input_arguments({}, base + list(flags))[2]


@pytest.fixture(scope="module")
def steps400():
    return training_args("--max_steps", "400")


# --- the Determined version the experiment runs on ------------------------------------------------------

@pytest.mark.parametrize("version, refused", [((0, 37), True), ((0, 37, 2), True), ((0, 38), False)])
def test_the_version_given_decides_the_legacy_check(steps400, version, refused):
    """The preflight's --determined-version 0.37 must check for a 0.37 cluster, whatever is installed here."""
    problems = checks.searcher_problems(ASHA, steps400, version)
    legacy = [p for p in problems if "several searcher operations" in p]
    assert bool(legacy) is refused
    if refused:
        assert legacy[0].startswith(f"searcher adaptive_asha on Determined {'.'.join(map(str, version))} ")
        assert "use Determined 0.38, or a single, random or grid searcher" in legacy[0]


def test_without_a_version_the_installed_one_is_checked(steps400, monkeypatch):
    monkeypatch.setattr(checks, "determined_version", lambda: (0, 37))
    assert any("Determined 0.37" in p for p in checks.searcher_problems(ASHA, steps400))
    monkeypatch.setattr(checks, "determined_version", lambda: (0, 38))
    assert checks.searcher_problems(ASHA, steps400) == []


# --- one place for each rule ------------------------------------------------------------------------------

@pytest.mark.parametrize("missing", [("max_time",), ("time_metric",), ("max_time", "time_metric")])
def test_a_missing_max_time_or_time_metric_is_reported_once(steps400, missing):
    """The preflight prints expconf's problems and then searcher_problems': the master's rule is expconf's alone."""
    searcher = {key: value for key, value in ASHA.items() if key not in missing}
    config = {"name": "x", "entrypoint": "python3 run_clm.py", "searcher": searcher}
    messages = validate(config, (0, 38)) + checks.searcher_problems(searcher, steps400, (0, 38))
    assert sorted(m.split(": ")[0] for m in messages) == sorted(f"searcher.{key}" for key in missing), messages
    assert all("is required for adaptive_asha in Determined 0.38" in m for m in messages)
    assert "--max_steps" in " ".join(messages)  # the fix still says what to set it to


# --- time_metric: what the master reads from every validation ---------------------------------------------

@pytest.mark.parametrize("typo, hint", [("batch", " (did you mean 'batches'?)"), ("steps", ""), ("records", ""),
                                        ("Batches", " (did you mean 'batches'?)")])
@pytest.mark.parametrize("name", ["adaptive_asha", "async_halving"])
def test_a_time_metric_the_trial_never_reports_is_refused(steps400, name, typo, hint):
    searcher = {**ASHA, "name": name, "num_rungs": 3, "time_metric": typo}
    assert checks.searcher_problems(searcher, steps400) == [
        f"searcher.time_metric is {typo!r}, which the trial never reports{hint}: the master would fail at the first "
        "validation; use time_metric: batches and max_time: 400, matching --max_steps"]


def test_epochs_count_progress_for_a_run_by_epochs():
    args = training_args("--num_train_epochs", "2")
    assert checks.searcher_problems({**ASHA, "time_metric": "epochs", "max_time": 2}, args) == []
    assert checks.searcher_problems({**ASHA, "time_metric": "epochs", "max_time": 3}, args) == [
        "searcher.max_time is 3 epochs but --num_train_epochs gives epochs=2.0; set max_time: 2.0 and "
        "time_metric: epochs, or change --num_train_epochs"]


# --- searcher.metric: what evaluation reports -------------------------------------------------------------

@pytest.mark.parametrize("metric, hint", [
    ("eval_los", " (did you mean 'eval_loss'?)"),
    ("loss", " (did you mean 'eval_loss'?)"),  # a training metric: never in a validation report
    ("eval_accuracy", ""),  # no compute_metrics: there is no accuracy
    ("perplexity", ""),
])
@pytest.mark.parametrize("name", ["single", "adaptive_asha"])
def test_a_searcher_metric_evaluation_never_reports_is_refused(steps400, metric, hint, name):
    searcher = {**ASHA, "name": name, "metric": metric} if name != "single" else {"name": name, "metric": metric}
    problems = checks.searcher_problems(searcher, steps400)
    assert problems == [f"searcher.metric is {metric!r}, which evaluation never reports{hint}; set it to one of "
                        "eval_loss, eval_runtime, eval_samples_per_second, eval_steps_per_second, batches, epochs, "
                        "num_input_tokens_seen"]


def test_the_token_count_is_a_metric_only_while_the_trainer_counts(steps400):
    searcher = {"name": "single", "metric": "num_input_tokens_seen"}
    assert checks.searcher_problems(searcher, steps400) == []
    off = training_args("--max_steps", "400", "--include_num_input_tokens_seen", "no")
    assert checks.searcher_problems(searcher, off)[0].startswith("searcher.metric is 'num_input_tokens_seen', which")


def test_the_metrics_named_are_the_ones_a_validation_reports(tiny_model, tmp_path):
    """The list the check accepts is what a real run reports to the master, no more and no fewer."""
    config = REPO / "experiments/local_tiny.yaml"
    result = run_clm("--config", config, "--runs_dir", tmp_path, "--max_steps", 2, "--eval_steps", 2,
                     "--save_steps", 2, "--logging_steps", 1, "--max_eval_samples", 8)
    assert result.returncode == 0, result.stderr[-3000:]
    validation = [r for r in read_metrics(tmp_path / "local_tiny" / "metrics.jsonl") if r["group"] == "validation"]
    args = parse_input_arguments({}, Experiment.load(config).script_args() + ["--use_cpu", "true"])[2]
    assert validation and all(set(r) - {"group", "steps_completed"} == set(checks.reported_metrics(args))
                              for r in validation)


# --- the rungs the master judges at ---------------------------------------------------------------------

# (config, brackets): the expectations of Determined's own tests (master/pkg/searcher/adaptive_asha_test.go,
# TestBracketMaxTrials, TestMakeBrackets and TestAdaptiveASHA), and the review's case of the old shipped search.
BRACKETS = [
    ({"max_time": 900, "max_trials": 20, "divisor": 3, "bracket_rungs": [3, 2, 1]},
     [([100, 300, 900], 12), ([300, 900], 5), ([900], 3)]),
    ({"max_time": 900, "max_trials": 50, "divisor": 3, "bracket_rungs": [4, 3]},
     [([33, 100, 300, 900], 35), ([100, 300, 900], 15)]),
    ({"max_time": 900, "max_trials": 50, "divisor": 4, "bracket_rungs": [2, 3]},  # the master sorts them
     [([56, 225, 900], 37), ([225, 900], 13)]),
    ({"max_time": 900, "max_trials": 100, "divisor": 4, "bracket_rungs": [4, 3, 2]},
     [([14, 56, 225, 900], 70), ([56, 225, 900], 22), ([225, 900], 8)]),
    ({"max_time": 100, "max_trials": 10, "mode": "standard", "max_concurrent_trials": 2}, [([25, 100], 7), ([100], 3)]),
    ({"max_time": 1000, "max_trials": 10, "mode": "conservative", "divisor": 3.0},
     [([111, 333, 1000], 7), ([333, 1000], 2), ([1000], 1)]),
    ({"max_time": 900, "max_trials": 10, "mode": "standard", "divisor": 3.0}, [([100, 300, 900], 7), ([300, 900], 3)]),
    ({"max_time": 400, "max_trials": 12, "divisor": 4, "max_rungs": 5, "mode": "standard"},
     [([100, 400], 8), ([400], 4)]),
    ({"max_time": 400, "max_trials": 12, "max_rungs": 5, "mode": "aggressive"}, [([100, 400], 12)]),
    ({"max_time": 400, "max_trials": 256}, [([1, 6, 25, 100, 400], 182), ([6, 25, 100, 400], 56),
                                             ([25, 100, 400], 18)]),
    ({"max_time": 20, "max_trials": 256, "max_rungs": 5, "mode": "aggressive"}, [([1, 5, 20], 256)]),  # max_time caps
]


@pytest.mark.parametrize("config, brackets", BRACKETS)
def test_adaptive_asha_brackets_are_the_masters(config, brackets):
    searcher = {**ASHA, **config}
    assert checks.asha_rungs(searcher) == sorted({rung for rungs, _ in brackets for rung in rungs})
    assert checks.asha_brackets(searcher) == brackets


def test_async_halving_runs_its_num_rungs_uncapped():
    searcher = {**ASHA, "name": "async_halving", "num_rungs": 5, "max_trials": 2}
    assert checks.asha_brackets(searcher) == [([1, 6, 25, 100, 400], 2)]


@pytest.mark.parametrize("searcher", [
    {"name": "single", "metric": "eval_loss", "max_length": {"batches": 400}},
    {**ASHA, "max_trials": None}, {**ASHA, "time_metric": None}, {**ASHA, "max_time": "400"},
    {**ASHA, "divisor": 1}, {**ASHA, "max_rungs": "3"}, {**ASHA, "mode": "bold"}, {**ASHA, "bracket_rungs": 3},
    {**ASHA, "name": "async_halving"},
])
def test_no_rungs_for_what_the_master_would_not_run(searcher):
    """expconf reports these; the rung arithmetic must not crash the preflight on them."""
    assert checks.asha_rungs(searcher) == [] and checks.asha_brackets(searcher) == []


def test_a_rung_between_evaluations_is_found(steps400):
    searcher = {**ASHA, "max_trials": 256}
    assert checks.unevaluated_rungs(searcher, steps400) == [1, 6]
    assert checks.unevaluated_rungs({**ASHA, "max_rungs": 3}, training_args("--max_steps", "400", "--eval_steps",
                                                                             "50")) == [25]


# --- the shipped search -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    experiment = Experiment.load(SEARCH)
    args = parse_input_arguments(experiment.sample_hparams(), experiment.script_args() + ["--use_cpu", "true"])
    return experiment, args


def test_the_shipped_search_has_the_rungs_its_comment_names(shipped):
    experiment, (_, _, args) = shipped
    header = SEARCH.read_text().split("\nname:")[0]
    named = re.search(r"(\d+) rungs at (\d+), (\d+) and (\d+)", " ".join(header.split()))
    assert named, "the header no longer names the rungs"
    assert checks.asha_rungs(experiment.searcher) == [int(n) for n in named.groups()[1:]]
    assert len(checks.asha_rungs(experiment.searcher)) == int(named.group(1))
    assert checks.unevaluated_rungs(experiment.searcher, args) == []
    assert checks.searcher_problems(experiment.searcher, args) == []
    assert checks.asha_brackets(experiment.searcher) == [([25, 100, 400], 12), ([100, 400], 4)]  # as the header says


def test_the_shipped_search_does_not_search_what_the_learning_rate_already_scales(shipped):
    """alpha / r multiplies LoRA's updates like the learning rate: searched together they cannot be told apart."""
    experiment, (model_args, _, _) = shipped
    searched = experiment.config["hyperparameters"]["training_arguments"]
    assert set(searched) == {"learning_rate", "lora_r"}
    assert model_args.lora_alpha == 32


def test_the_shipped_search_evaluates_on_a_bounded_sample(shipped):
    """Evaluation runs 16 times in a full trial: on a fixed, bounded sample in large batches."""
    _, (_, data_args, args) = shipped
    assert data_args.max_eval_samples == 500
    assert args.per_device_eval_batch_size == 8
    assert validate(yaml.safe_load(SEARCH.read_text())) == []


def test_no_searcher_section_no_problems(steps400):
    assert checks.searcher_problems({}, steps400) == []
