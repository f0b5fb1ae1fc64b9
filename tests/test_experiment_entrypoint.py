"""A string entrypoint is split as the cluster's `sh -c` splits it (Determined's launch runs a string that way), and
what sh alone could run is refused with one line; slots_per_trial takes what the master takes."""

import shutil
import subprocess

import pytest

from swallow_ft.arguments import parse_input_arguments
from swallow_ft.errors import UserError
from swallow_ft.experiment import Experiment, shell_words

LAUNCH = ["python", "-m", "determined.launch.deepspeed", "python", "run_clm.py"]

# (entrypoint as the YAML's value, the words the cluster's sh passes on); HF_CACHE_TEST=/data/hf, DATA_TEST=d
GOLDEN = {
    "a | block with line continuations": (
        "python -m determined.launch.deepspeed \\\n  python run_clm.py \\\n  --model_name_or_path m \\\n"
        "  --do_train\n",
        LAUNCH + ["--model_name_or_path", "m", "--do_train"]),
    "continuation without a blank joins the words": ("python run_clm.py --output_\\\ndir o", [
        "python", "run_clm.py", "--output_dir", "o"]),
    "$VAR and ${VAR}": ("python run_clm.py --cache_dir $HF_CACHE_TEST/x --train_file ${DATA_TEST}.jsonl", [
        "python", "run_clm.py", "--cache_dir", "/data/hf/x", "--train_file", "d.jsonl"]),
    "double quotes expand, single quotes and backslashes do not": (
        "python run_clm.py --a \"$DATA_TEST x\" --b '$DATA_TEST' --c \\$DATA_TEST --d=\"$DATA_TEST\"'$DATA_TEST'", [
            "python", "run_clm.py", "--a", "d x", "--b", "$DATA_TEST", "--c", "$DATA_TEST", "--d=d$DATA_TEST"]),
    "an unset variable stays as written": ("python run_clm.py --x $UNSET_IN_THIS_TEST", [
        "python", "run_clm.py", "--x", "$UNSET_IN_THIS_TEST"]),
    "quotes, escapes and empty words": (
        "python run_clm.py --system_prompt 'あなたは 誠実' --s \"a \\\"b\\\" \\\\ \\z\" --e \"\" --f a\\ b", [
            "python", "run_clm.py", "--system_prompt", "あなたは 誠実", "--s", "a \"b\" \\ \\z", "--e", "",
            "--f", "a b"]),
    "comments and blank lines": ("python run_clm.py --a 1 # trailing\n\n# done\n", [
        "python", "run_clm.py", "--a", "1"]),
    "comment lines before the command": ("\n# the 70B job\n\npython run_clm.py --a 1", [
        "python", "run_clm.py", "--a", "1"]),
    "# inside a word is text": ("python run_clm.py --a b#c", ["python", "run_clm.py", "--a", "b#c"]),
    "quoted operators are text": ("python run_clm.py --run_name 'a && b' --x \"c;d|e>f\" --y \\&", [
        "python", "run_clm.py", "--run_name", "a && b", "--x", "c;d|e>f", "--y", "&"]),
}


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("HF_CACHE_TEST", "/data/hf")
    monkeypatch.setenv("DATA_TEST", "d")
    monkeypatch.delenv("UNSET_IN_THIS_TEST", raising=False)


@pytest.mark.parametrize("text, words", GOLDEN.values(), ids=GOLDEN.keys())
def test_string_entrypoints_split_into_the_words_sh_gives(env, text, words):
    assert shell_words(text, "exp.yaml: entrypoint") == words


# sh empties an unset variable, a local run keeps it as written; printf must come first on the first line
SH_COMPARABLE = [name for name, (text, _) in GOLDEN.items() if "unset" not in name and not text.startswith("\n")]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh on this machine to compare with")
@pytest.mark.parametrize("name", SH_COMPARABLE)
def test_the_golden_words_are_what_sh_itself_gives(env, name):
    """The golden lists are sh's own: printf prints each word that sh passes on."""
    text, words = GOLDEN[name]
    printed = subprocess.run(["sh", "-c", 'printf "%s\\0" ' + text], capture_output=True, text=True, check=True)
    assert printed.stdout.split("\0")[:-1] == words


def _experiment(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return Experiment.load(path)


def test_a_literal_block_with_continuations_runs_locally_with_expanded_paths(tmp_path, env):
    """The reviewed failure: a YAML `|` entrypoint with `\\` continuations was `unknown run_clm.py flag(s): \\n`,
    and --cache_dir $HOME/... made a directory literally named `$HOME`."""
    experiment = _experiment(tmp_path, (
        "entrypoint: |\n"
        "  python -m determined.launch.deepspeed \\\n"
        "    python run_clm.py \\\n"
        "    --model_name_or_path m --train_file data/chat_ja.jsonl \\\n"
        "    --cache_dir $HF_CACHE_TEST/hub \\\n"
        "    --output_dir ${DATA_TEST}/out\n"))
    assert experiment.uses_deepspeed_launcher()
    flags = experiment.flags([])
    assert flags == ["--model_name_or_path", "m", "--train_file", "data/chat_ja.jsonl", "--cache_dir",
                     "/data/hf/hub", "--output_dir", "d/out"]
    model_args, _, training_args = parse_input_arguments({}, flags + ["--use_cpu", "true"])
    assert model_args.cache_dir == "/data/hf/hub" and training_args.output_dir == "d/out"


def test_a_list_entrypoint_is_passed_as_it_is(tmp_path, env):
    """The cluster runs a list without a shell: nothing expands there, so nothing expands here."""
    experiment = _experiment(tmp_path, "entrypoint: [python, run_clm.py, --cache_dir, $HF_CACHE_TEST, '&&']\n")
    assert experiment.script_args() == ["--cache_dir", "$HF_CACHE_TEST", "&&"]


REFUSED = {
    "&&": ("pip install x && python run_clm.py --do_train", "'&&'"),
    ";": ("python run_clm.py --do_train; echo done", "';'"),
    "|": ("python run_clm.py --do_train | tee log", "'|'"),
    ">": ("python run_clm.py --do_train > log", "'>'"),
    "2>&1": ("python run_clm.py --do_train 2>&1", "'>&'"),
    "&": ("python run_clm.py --do_train &", "'&'"),
    "$(...)": ("python run_clm.py --output_dir $(mktemp -d)", "'$('"),
    "backticks in double quotes": ('python run_clm.py --run_name "`date`"', "'`'"),
    "a second line": ("python -m determined.launch.deepspeed\npython run_clm.py --do_train\n", "a second line"),
}


@pytest.mark.parametrize("text, token", REFUSED.values(), ids=REFUSED.keys())
def test_shell_syntax_is_refused_in_one_line_naming_the_file_and_the_token(tmp_path, text, token):
    experiment = _experiment(tmp_path, "name: exp\n")
    experiment.config["entrypoint"] = text
    with pytest.raises(UserError) as raised:
        experiment.script_args()
    message = str(raised.value)
    assert message.startswith(f"{experiment.path}: entrypoint: {token}")
    assert "locally the entrypoint must be one command (python3 -m determined.launch.… python3 run_clm.py …)" in message
    assert "\n" not in message


def test_a_folded_block_with_a_more_indented_line_is_two_commands_to_sh(tmp_path):
    """YAML keeps the line break before a more-indented line of a `>-` block; sh would run that line on its own."""
    experiment = _experiment(tmp_path, "entrypoint: >-\n  python run_clm.py\n    --do_train\n")
    with pytest.raises(UserError, match=r"exp.yaml: entrypoint: a second line is a second command to sh"):
        experiment.script_args()


@pytest.mark.parametrize("quote", ["'", '"'])
def test_an_unclosed_quote_is_named(tmp_path, quote):
    experiment = _experiment(tmp_path, "name: exp\n")
    experiment.config["entrypoint"] = f"python run_clm.py --system_prompt {quote}x"
    with pytest.raises(UserError, match=f"exp.yaml: entrypoint: unmatched {quote}: close the quote"):
        experiment.script_args()


@pytest.mark.parametrize("resources, slots", [
    ("resources: {slots_per_trial: 0}\n", 1),  # a CPU-only trial on the cluster: one process here
    ("resources: {slots_per_trial: null}\n", 1),  # the master's default
    ("resources: {}\n", 1),
    ("name: exp\n", 1),
    ("resources: {slots_per_trial: 2}\n", 2),
])
def test_slots_per_trial_takes_what_the_master_takes(tmp_path, resources, slots):
    assert _experiment(tmp_path, resources).slots_per_trial == slots


@pytest.mark.parametrize("value", ["-1", "two", "true", "1.5"])
def test_bad_slots_per_trial_is_named(tmp_path, value):
    experiment = _experiment(tmp_path, f"resources: {{slots_per_trial: {value}}}\n")
    with pytest.raises(UserError, match=r"exp.yaml: resources.slots_per_trial must be an integer >= 0"):
        _ = experiment.slots_per_trial


def test_preview_takes_a_search_experiment_without_pinning_its_searched_values():
    """preview trains nothing, so the searched learning rate and LoRA rank need no value on its command line: they
    do not change the tokens. Before, it refused with `a local run trains one trial: pass --learning_rate ...`."""
    from swallow_ft.data.__main__ import parse

    _, model_args, data_args = parse(["preview", "--config", "experiments/swallow_7b_search.yaml"])
    assert model_args.model_name_or_path == "tokyotech-llm/Swallow-7b-instruct-v0.1"
    assert (data_args.dataset_name, data_args.block_size, data_args.packing) == ("camel-ai/math", 2048, True)
    assert model_args.lora_r == 8  # one trial's value; a flag still wins
    _, model_args, _ = parse(["preview", "--config", "experiments/swallow_7b_search.yaml", "--lora_r", "32"])
    assert model_args.lora_r == 32


@pytest.mark.parametrize("flags, says", [
    (["--lerning_rate", "1e-4"], "--lerning_rate (did you mean --learning_rate or --logging_strategy?)"),
    (["--promt_format=llama3"], "--promt_format (did you mean --prompt_format?)"),
    # an abbreviation: argparse took it for --train_file
    (["--train_fil", "x.jsonl"], "--train_fil (did you mean --train_file"),
])
def test_preview_refuses_an_unknown_flag_as_run_clm_does(flags, says):
    from swallow_ft.data.__main__ import parse

    with pytest.raises(UserError) as raised:
        parse(["preview", "--config", "experiments/local_tiny.yaml", *flags])
    assert str(raised.value).startswith(f"unknown run_clm.py flag(s): {says}")


@pytest.mark.parametrize("override", [["--learning-rate", "1e-4"], ["--learning_rate=1e-4"]])
def test_a_searched_value_is_pinned_by_its_flag_in_any_spelling(tmp_path, override):
    path = tmp_path / "exp.yaml"
    path.write_text("hyperparameters:\n  training_arguments:\n"
                    "    learning_rate: {type: log, base: 10, minval: -5, maxval: -3}\n"
                    "entrypoint: python run_clm.py --model_name_or_path m\n")
    assert Experiment.load(path).hparams_for_local_run(override) == {"training_arguments": {}}


@pytest.mark.parametrize("text, error", [
    ("name: exp\nresources:\n\tslots_per_trial: 1\n",
     "line 3, column 1: not valid YAML: a tab character, which YAML does not allow here: indent with spaces, not tabs"),
    ("name: exp\nresources:\n  slots_per_trial: 1\n   resource_pool: A100\n",
     "line 4, column 17: not valid YAML: a `key:` where no key can start (a wrong indent, or ': ' inside a value): "
     "indent it like the keys beside it, or quote the value"),
    ("resources:\n    slots_per_trial: 1\n  resource_pool: A100\n",
     "line 3, column 3: not valid YAML: a line that does not fit the block above it (an indent that lines up with no "
     "key, or a key among - items): line it up with the keys or - items it belongs with"),
    ("name: exp\nentrypoint: \"python3 run_clm.py\n",
     "line 3, column 1: not valid YAML: the quote opened at line 2, column 13 never closes: close it"),
    ("searcher: {name: single\n", "line 2, column 1: not valid YAML: the { mapping opened at line 1, column 11 lacks a "
     "',' between items or its closing }: add it"),
], ids=["tab", "indent", "dedent", "unclosed-quote", "unclosed-flow"])
def test_invalid_yaml_is_one_line_with_its_place_and_the_fix(tmp_path, text, error):
    """PyYAML's own text was passed through: `not valid YAML: while scanning for the next token found character '\\t'
    that cannot start any token in "<unicode string>", line 8, column 1: slots_per_trial: 1 ^`."""
    with pytest.raises(UserError) as caught:
        _experiment(tmp_path, text)
    assert str(caught.value) == f"{tmp_path / 'exp.yaml'} {error}"
