"""Flags and experiment files: what the seed's YAML needs on transformers 5, and clear errors."""

import pytest
from conftest import REPO, run_clm

from swallow_ft.arguments import dict2args, parse_input_arguments
from swallow_ft.errors import UserError
from swallow_ft.experiment import Experiment

BASE = ["--model_name_or_path", "m", "--train_file", "data/camel_math_ja.jsonl", "--output_dir", "out",
        "--use_cpu", "true"]


def test_dict2args_is_the_seeds_helper():
    assert dict2args({"learning_rate": 1e-5, "lora_r": 8}) == ["--learning_rate", "1e-05", "--lora_r", "8"]


def test_hparams_training_arguments_are_appended_and_win():
    model_args, data_args, training_args = parse_input_arguments(
        {"training_arguments": {"learning_rate": 3e-4, "lora_alpha": 64}}, BASE + ["--learning_rate", "1"])
    assert training_args.learning_rate == 3e-4
    assert model_args.lora_alpha == 64 and model_args.trust_remote_code is False
    assert data_args.train_file == "data/camel_math_ja.jsonl"
    assert training_args.include_num_input_tokens_seen == "non_padding"
    assert training_args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert training_args.logging_nan_inf_filter is False  # the filter reads every micro-step's loss on the host
    _, _, asked = parse_input_arguments({}, BASE + ["--logging_nan_inf_filter", "true"])
    assert asked.logging_nan_inf_filter is True


def test_evaluation_strategy_is_an_alias_of_eval_strategy():
    _, _, training_args = parse_input_arguments({}, BASE + ["--evaluation_strategy", "steps", "--eval_steps", "7"])
    assert training_args.eval_strategy == "steps" and training_args.eval_steps == 7


@pytest.mark.parametrize("flags, message", [
    (["--lerning_rate", "1e-4"], r"unknown run_clm.py flag\(s\): --lerning_rate \(did you mean --learning_rate"),
    (["--hub_token", "hf_SECRET"], r"^--hub_token is refused: remove it \(set HF_TOKEN in the environment instead; "
                                   r"tokens never belong in flags or hyperparameters\)$"),
    (["--hub-token=hf_SECRET"], "^--hub-token is refused: remove it"),
    (["--hub_tok", "hf_SECRET"], r"unknown run_clm.py flag\(s\): --hub_tok \(did you mean --hub_strategy"),
    (["--overwrite_output_dir"], "--overwrite_output_dir no longer exists in transformers 5: remove it"),
    (["--token", "hf_abc"], "tokens never belong in flags"),
    (["--torch_dtype", "float8"], r"argument --torch_dtype/--torch-dtype: invalid choice: 'float8' \(choose from 'auto'"),
    (["--max_steps", "many"], "argument --max_steps/--max-steps: invalid int value: 'many'"),
])
def test_bad_flags_get_one_line_errors(flags, message):
    with pytest.raises(UserError, match=message):
        parse_input_arguments({}, BASE + flags)


@pytest.mark.parametrize("flags, message", [
    (["--prompt_format", "llama-3"], "--prompt_format/--prompt-format: invalid choice: 'llama-3' (choose from 'auto', "
     "'swallow-instruct-v0.1', 'swallow-instruct-v0', 'llama3', 'chat_template', 'none'); did you mean llama3?"),
    # a TrainingArguments enum, from transformers
    (["--eval_strategy", "step"], "--eval_strategy/--eval-strategy: invalid choice: 'step' (choose from 'no', "
     "'steps', 'epoch'); did you mean steps?"),
    (["--torch_dtype", "xyzzy"], "--torch_dtype/--torch-dtype: invalid choice: 'xyzzy' (choose from 'auto', "
     "'bfloat16', 'float16', 'float32')"),  # nothing close: no guess
])
def test_an_invalid_choice_names_the_closest_valid_one(flags, message):
    with pytest.raises(UserError) as raised:
        parse_input_arguments({}, BASE + flags)
    assert str(raised.value) == f"run_clm.py: argument {message}"

    with pytest.raises(UserError, match="^--hub_token is refused: remove it"):
        parse_input_arguments({"training_arguments": {"hub_token": "hf_SECRET"}}, BASE)


@pytest.mark.parametrize("flag, message", [
    ("--lerning_rate", "--lerning_rate (did you mean --learning_rate or --logging_strategy?)"),
    ("--lerning-rate", "--lerning-rate (did you mean --learning_rate or --logging_strategy?)"),
    # an abbreviation, which argparse would otherwise take silently
    ("--learning_rat", "--learning_rat (did you mean --learning_rate or --logging_strategy?)"),
])
def test_unknown_flags_get_each_suggestion_once_in_the_underscore_spelling(flag, message):
    with pytest.raises(UserError) as raised:
        parse_input_arguments({}, BASE + [flag, "1"])
    assert str(raised.value) == f"unknown run_clm.py flag(s): {message}; `python run_clm.py --help` lists them"


def test_a_hub_token_on_the_command_line_is_refused_before_anything_is_written(tmp_path):
    result = run_clm("--config", "experiments/local_tiny.yaml", "--runs_dir", tmp_path, "--hub_token", "hf_SECRET")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "hf_SECRET" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --hub_token is refused: remove it (set HF_TOKEN in the environment instead; tokens never belong in "
        "flags or hyperparameters)")
    assert not any("hf_SECRET" in f.read_text() for f in tmp_path.rglob("*") if f.is_file())


def test_missing_data_is_an_error():
    with pytest.raises(UserError, match="pass --dataset_name"):
        parse_input_arguments({}, ["--model_name_or_path", "m", "--output_dir", "o", "--use_cpu", "true"])


def test_unknown_flag_from_the_command_line_exits_2_with_one_line(tiny_model, tmp_path):
    result = run_clm("--config", "experiments/local_tiny.yaml", "--runs_dir", tmp_path, "--lora_rank", "8")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown run_clm.py flag(s): --lora_rank (did you mean --local_rank or --lora_r?); "
        "`python run_clm.py --help` lists them")
    assert not (tmp_path / "local_tiny" / "checkpoints").exists()


def _experiment(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return Experiment.load(path)


SEARCH_YAML = """
name: search
hyperparameters:
  deepspeed_config: ds_configs/ds_config_stage_3.json
  training_arguments:
    learning_rate: {type: log, base: 10, minval: -5, maxval: -3}
    lora_r: {type: const, val: 8}
entrypoint: >-
  python -m determined.launch.deepspeed
  python run_clm.py --model_name_or_path m --do_train
"""


def test_searched_hyperparameter_without_override_names_the_flag(tmp_path):
    experiment = _experiment(tmp_path, SEARCH_YAML)
    with pytest.raises(UserError, match=r"exp.yaml: hyperparameters.training_arguments.learning_rate is searched "
                                        r"\(type: log\).*pass --learning_rate VALUE"):
        experiment.hparams_for_local_run([])
    hparams = experiment.hparams_for_local_run(["--learning_rate", "1e-4"])
    assert hparams["training_arguments"] == {"lora_r": 8}  # the override is appended later and wins
    assert experiment.script_args() == ["--model_name_or_path", "m", "--do_train"]
    assert experiment.uses_deepspeed_launcher()


def test_experiment_file_errors(tmp_path):
    with pytest.raises(UserError, match="experiment file not found"):
        Experiment.load(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="entrypoint does not run run_clm.py"):
        _experiment(tmp_path, "name: x\nentrypoint: python train.py --lr 1\n").script_args()
    with pytest.raises(UserError, match="slots_per_trial must be an integer >= 0"):
        _ = _experiment(tmp_path, "resources: {slots_per_trial: -1}\n").slots_per_trial
    with pytest.raises(UserError, match="not valid YAML"):
        _experiment(tmp_path, "name: [unclosed\n")


def test_local_storage_follows_the_yaml_when_it_is_a_local_path(tmp_path):
    shared = _experiment(tmp_path, "name: e\ncheckpoint_storage: {type: shared_fs, host_path: /mnt/ckpt, "
                                   "storage_path: swallow}\n")
    assert str(shared.local_checkpoint_dir(tmp_path)) == "/mnt/ckpt/swallow"
    s3 = _experiment(tmp_path, "name: e\ncheckpoint_storage: {type: s3, bucket: b}\n")
    assert s3.local_checkpoint_dir(tmp_path) == tmp_path / "e" / "checkpoints"
    assert s3.cluster_only_storage() == "s3"


def test_shipped_local_experiments_parse(tmp_path):
    for name in ("local_tiny.yaml", "local_tiny_ds3.yaml"):
        experiment = Experiment.load(REPO / "experiments" / name)
        assert "--use_lora" in experiment.script_args()
    assert Experiment.load(REPO / "experiments/local_tiny_ds3.yaml").slots_per_trial == 2


def test_the_70b_experiment_parses_and_its_searcher_matches_max_steps():
    import json

    from swallow_ft.searcher import check_searcher_length
    from swallow_ft.runtime import without_deepspeed

    experiment = Experiment.load(REPO / "swallow_70b_ds3.yaml")
    assert experiment.uses_deepspeed_launcher() and experiment.slots_per_trial == 4
    args = experiment.script_args()
    ds_config = json.loads((REPO / args[args.index("--deepspeed") + 1]).read_text())
    assert ds_config["zero_optimization"]["stage"] == 3
    assert ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # The cluster hands the trial these hparams; DeepSpeed itself needs the GPUs' process group.
    hparams = experiment.hparams_for_local_run([])
    model_args, data_args, training_args = parse_input_arguments(
        hparams, without_deepspeed(args) + ["--use_cpu", "true"])
    assert model_args.use_lora and training_args.bf16 and training_args.eval_strategy == "steps"
    assert data_args.dataset_name == "camel-ai/math"
    assert check_searcher_length(experiment.searcher, training_args) is None


def test_missing_local_model_dir_is_a_clear_error(tmp_path):
    result = run_clm("--config", "experiments/local_tiny.yaml", "--runs_dir", tmp_path,
                     "--model_name_or_path", ".cache/tiny-swallow-missing")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --model_name_or_path .cache/tiny-swallow-missing: no such directory (run `make tiny` to build it)")


def test_no_arguments_says_how_to_start():
    result = run_clm()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: nothing to run: try python run_clm.py --config experiments/local_tiny.yaml "
        "(or pass run_clm.py's flags; --help lists them)")
    assert "--config EXPERIMENT.yaml" in run_clm("--help").stdout


def test_flags_given_as_name_equals_value_count_as_given(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    model_args, _, training_args = parse_input_arguments({}, BASE[2:] + [
        "--model_name_or_path=~/models/swallow", "--include_num_input_tokens_seen=no", "--logging_nan_inf_filter=true"])
    assert training_args.include_num_input_tokens_seen == "no" and training_args.logging_nan_inf_filter is True
    # No shell expands ~ in a YAML value or after =; transformers would take it for a Hub id.
    assert model_args.model_name_or_path == "/home/someone/models/swallow"


def test_lora_tells_ddp_every_parameter_gets_a_gradient_unless_a_flag_says_otherwise():
    assert parse_input_arguments({}, BASE + ["--use_lora"])[2].ddp_find_unused_parameters is False
    assert parse_input_arguments({}, BASE)[2].ddp_find_unused_parameters is None  # full: the Trainer decides
    assert parse_input_arguments({}, BASE + ["--use_lora", "--ddp_find_unused_parameters=true"])[
        2].ddp_find_unused_parameters is True


@pytest.mark.parametrize("flags, field, value", [
    (["--logging-nan-inf-filter", "true"], "logging_nan_inf_filter", True),
    (["--include-num-input-tokens-seen", "no"], "include_num_input_tokens_seen", "no"),
    (["--use_lora", "--ddp-find-unused-parameters", "true"], "ddp_find_unused_parameters", True),
])
def test_a_flag_in_its_dashed_spelling_is_not_overwritten_by_the_projects_default(flags, field, value):
    """argparse takes --x-y for --x_y; the defaults checked only --x_y and overwrote what the user asked for."""
    assert getattr(parse_input_arguments({}, BASE + flags)[2], field) == value


def test_the_old_eval_flag_is_renamed_in_its_dashed_spelling_too():
    _, _, training_args = parse_input_arguments({}, BASE + ["--evaluation-strategy", "steps", "--eval_steps", "7"])
    assert training_args.eval_strategy == "steps"


@pytest.mark.parametrize("args, expected", [
    (["--deepspeed=a.json"], "a.json"),
    (["--deepspeed", "a.json", "--bf16", "--deepspeed", "b.json"], "b.json"),  # the last wins, as in argparse
    (["--model_name_or_path", "m", "--cache-dir", "/c"], "/c"),
    (["--bf16"], None),
])
def test_flag_value_reads_every_spelling_and_the_last_occurrence(args, expected):
    from swallow_ft.arguments import flag_value

    flag = "--cache_dir" if "--cache-dir" in args else "--deepspeed"
    assert flag_value(args, flag) == expected


def test_flag_value_does_not_take_the_flag_after_a_negated_switch():
    from swallow_ft.arguments import flag_value

    args = ["--logging_nan_inf_filter", "true", "--no_logging_nan_inf_filter", "--bf16"]
    assert flag_value(args, "--logging_nan_inf_filter") == "true"


def test_without_deepspeed_drops_it_in_either_form():
    from swallow_ft.arguments import without_deepspeed

    assert without_deepspeed(["--deepspeed", "a.json", "--bf16", "--deepspeed=b.json", "--seed=3"]) == [
        "--bf16", "--seed", "3"]


def test_lora_targets_are_read_once_for_peft_and_the_memory_model():
    from swallow_ft.memory import KNOWN_SHAPES

    model_args = parse_input_arguments({}, BASE + ["--lora_target_modules", " q_proj, v_proj,"])[0]
    assert model_args.lora_targets == ["q_proj", "v_proj"]
    assert parse_input_arguments({}, BASE)[0].lora_targets == "all-linear"
    shape = KNOWN_SHAPES["swallow-7b"]
    assert shape.lora_params(8, " q_proj, v_proj,") == shape.lora_params(8, ["q_proj", "v_proj"])
