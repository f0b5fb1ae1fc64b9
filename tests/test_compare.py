"""compare: both models answer in the run's own prompt format; report files, scores and losses are consistent."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_clm
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from swallow_ft.arguments import DataTrainingArguments
from swallow_ft.checkpoint_files import (has_whole_weights, metric_history, prompt_settings, resolve_checkpoint,
                                         same_model)
from swallow_ft.compare import Example, SideBySide, compare, default_max_new_tokens, main
from swallow_ft.data.loading import encode_example, load_raw_datasets
from swallow_ft.data.templates import FORMATS
from swallow_ft.errors import UserError
from swallow_ft.export import export

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


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory):
    """(run dir, base): full fine-tuning (no LoRA, no DeepSpeed) of a bfloat16 base, as Swallow's are: the checkpoint
    holds the whole model, in the fp32 it trained in."""
    base = tmp_path_factory.mktemp("bf16-base")
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    runs = tmp_path_factory.mktemp("runs_full")
    result = run_clm("--config", "experiments/local_tiny.yaml", "--runs_dir", runs, "--max_steps", 10,
                     "--eval_steps", 10, "--save_steps", 10, "--use_lora", "false", "--model_name_or_path", base)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / "local_tiny", base


def no_weights(*args, **kwargs):
    raise AssertionError("weights loaded before the inputs were checked")


class FakeCheckpoint:
    """determined.experimental.client's Checkpoint for a checkpoint in STORAGE: what the master reports of it (UUID,
    the trial that saved it, the experiment's checkpoint_storage, every file's size), and download(), which fetches
    it whole, as the SDK's does."""

    def __init__(self, files: Path, trial_id: int, storage_config: dict):
        self.uuid, self.files, self.whole_downloads = files.name, files, 0
        self.training = SimpleNamespace(trial_id=trial_id, experiment_id=42,
                                        experiment_config={"checkpoint_storage": storage_config})

    @property
    def metadata(self):
        return json.loads((self.files / "metadata.json").read_text())

    @property
    def resources(self):
        return {str(p.relative_to(self.files)) + "/" * p.is_dir(): 0 if p.is_dir() else p.stat().st_size
                for p in self.files.rglob("*")}

    def download(self, path=None, mode=None):
        self.whole_downloads += 1
        shutil.copytree(self.files, path, dirs_exist_ok=True)
        return path

    def write_metadata_file(self, path):
        Path(path).write_text(json.dumps(self.metadata))


class FakeCluster:
    """A Determined master, through determined.experimental.client, with experiment 42: a search of two trials whose
    best checkpoint is the one in CHECKPOINT_DIR (a Determined checkpoint directory), saved by trial 2 into STORAGE.
    Storage of type `directory` is read by Determined's own storage manager; the client is faked."""

    def __init__(self, monkeypatch, checkpoint_dir: Path, storage: Path, storage_config: dict = None):
        from determined.experimental import client

        self.files = shutil.copytree(checkpoint_dir, storage / checkpoint_dir.name)
        self.uuid = self.files.name
        # As DetCallback records it on a cluster.
        (self.files / "metadata.json").write_text(json.dumps({**json.loads((self.files / "metadata.json").read_text()),
                                                              "trial_id": 2}))
        config = storage_config or {"type": "directory", "container_path": str(storage)}
        self.checkpoint = FakeCheckpoint(self.files, 2, config)
        trials = {i: SimpleNamespace(trial_id=i, iter_metrics=lambda group, i=i: [SimpleNamespace(
            steps_completed=40, metrics={"loss" if group == "training" else "eval_loss": float(i)})]) for i in (1, 2)}
        experiment = SimpleNamespace(list_trials=lambda: list(trials.values()),
                                     list_checkpoints=lambda **kwargs: [self.checkpoint])
        monkeypatch.setenv("DET_MASTER", "http://master.invalid:8080")
        monkeypatch.setattr(client, "get_experiment", {42: experiment}.__getitem__)
        monkeypatch.setattr(client, "get_checkpoint", {self.uuid: self.checkpoint}.__getitem__)
        monkeypatch.setattr(client, "get_trial", trials.__getitem__)


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
    ids, labels = encode_example(row, "row 0", "camel-math", FORMATS[FORMAT], models.tokenizer, SYSTEM)
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
    summary = compare(str(tiny_model), str(trained_run), PROMPTS, tmp_path, limit=6)
    rows = [json.loads(line) for line in (tmp_path / "comparison.jsonl").read_text().splitlines()]
    assert len(rows) == summary["n"] == 6
    assert set(rows[0]) == {"index", "prompt", "reference", "base", "tuned", "cut", "scores"}
    assert rows[0]["reference"] == "53 + 50 = 103 です。答え: 103"
    # Fine-tuning on the answers lowers the loss on held-out references.
    assert summary["tuned"]["loss"] < summary["base"]["loss"]
    assert summary["tuned"]["perplexity"] < summary["base"]["perplexity"]
    # The default limit leaves room for answers twice as long as the longest reference: the tuned model's end.
    examples = SideBySide(str(tiny_model), str(trained_run)).examples(PROMPTS, limit=6)
    assert summary["max_new_tokens"] == default_max_new_tokens(examples)
    assert summary["tuned"]["cut"] == 0 and not any(r["cut"]["tuned"] for r in rows)
    report = (tmp_path / "comparison.md").read_text()
    assert (f"| model | char F1 | ROUGE-L (chars) | final-number match | cut at {summary['max_new_tokens']} tokens "
            "| loss | perplexity |") in report
    assert "53 と 50 の和を求めなさい。" in report and f"prompt format: `{FORMAT}`" in report


def test_the_default_max_new_tokens_is_the_whole_files_whatever_n_is(trained_run, tiny_model, tmp_path):
    models = SideBySide(str(tiny_model), str(trained_run))
    every, first = (default_max_new_tokens(models.examples(PROMPTS, limit)) for limit in (None, 2))
    assert (every, first) == (74, 64)  # the file's longest references come after its first two
    summary = compare(str(tiny_model), str(trained_run), PROMPTS, tmp_path, limit=2, models=models)
    assert summary["n"] == 2 and summary["max_new_tokens"] == every


def test_answers_cut_at_max_new_tokens_are_marked_and_never_a_number_match(trained_run, tiny_model, tmp_path):
    uncut = SideBySide(str(tiny_model), str(trained_run))
    full = uncut.answers(uncut.examples(PROMPTS, limit=4), max_new_tokens=64)[1]
    assert not any(a.cut for a in full) and all(len(a.text) > 8 for a in full)
    summary = compare(str(tiny_model), str(trained_run), PROMPTS, tmp_path, max_new_tokens=3, limit=4, models=uncut)
    rows = [json.loads(line) for line in (tmp_path / "comparison.jsonl").read_text().splitlines()]
    # The tuned model stops its answers after more than 3 tokens: each is cut, a prefix of its full answer.
    assert [r["cut"]["tuned"] for r in rows] == [True] * 4 and summary["tuned"]["cut"] == 4
    assert all(a.text.startswith(r["tuned"]) for a, r in zip(full, rows))
    assert [r["scores"]["tuned"]["number_match"] for r in rows] == [0.0] * 4
    report = (tmp_path / "comparison.md").read_text()
    assert "| tuned |" in report and "| 4/4 |" in report
    assert report.split("| # |")[1].count(" [cut] |") >= 4  # each tuned cell, and any cut base one


def test_default_max_new_tokens_follows_the_longest_reference():
    def example(reference_tokens):
        return Example(0, "q", "a", [1], [1] * (reference_tokens + 1), [-100] + [5] * reference_tokens)

    assert default_max_new_tokens([example(10), example(20)]) == 64  # short answers keep 64
    assert default_max_new_tokens([example(10), example(300)]) == 600  # camel-ai/math's long solutions
    assert default_max_new_tokens([example(3000)]) == 1024  # bounded, for a model that never stops


def test_generation_stops_at_every_eos_id_of_the_models_generation_config(trained_run, tiny_model, tmp_path):
    """Llama-3.1-style models end a turn with any of several ids that generation_config.json lists."""
    models = SideBySide(str(tiny_model), str(trained_run))
    example = models.examples(PROMPTS, limit=1)
    prompt = example[0].prompt_ids
    generated = models.load().tuned_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8,
                                                   do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert models.tokenizer.eos_token_id not in generated[:3]
    # The same base, but its generation config lists the tuned model's third token as another end of sequence.
    base = shutil.copytree(tiny_model, tmp_path / "base")
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, generated[2]]}))
    _, tuned = SideBySide(str(base), str(trained_run)).answers(example, max_new_tokens=8)
    assert str(tuned[0]) == models.tokenizer.decode(generated[:2], skip_special_tokens=True).strip()
    assert tuned[0].cut is False


TWO_TURNS = {"messages": [{"role": "user", "content": "32 と 13 を足すといくつですか。"},
                          {"role": "assistant", "content": "32 + 13 = 45 です。"},
                          {"role": "user", "content": "その答えを 4 倍にしてください。"},
                          {"role": "assistant", "content": "45 × 4 = 180 です。"}]}


@pytest.mark.parametrize("prompt_format", ["swallow-instruct-v0.1", "chat_template"])
def test_the_reference_loss_is_on_the_last_reply_of_a_conversation(prompt_format, trained_run, tiny_model, tmp_path):
    prompts = tmp_path / "two_turns.jsonl"
    prompts.write_text(json.dumps(TWO_TURNS, ensure_ascii=False) + "\n", encoding="utf-8")
    models = SideBySide(str(tiny_model), str(trained_run), prompt_format=prompt_format)
    example, = models.examples(str(prompts))
    assert (example.question, example.reference) == ("その答えを 4 倍にしてください。", "45 × 4 = 180 です。")
    scored = [label for label in example.labels if label != -100]
    # The reply the report shows and its end-of-turn token, not the earlier reply the prompt holds.
    assert models.tokenizer.decode(scored[:-1]).strip() == example.reference
    assert scored[-1] == models.tokenizer.eos_token_id
    single = {"message_1": "その答えを 4 倍にしてください。", "message_2": "45 × 4 = 180 です。"}
    (tmp_path / "single.jsonl").write_text(json.dumps(single, ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(scored) == sum(label != -100 for label in models.examples(str(tmp_path / "single.jsonl"))[0].labels)


def test_a_full_fine_tuning_run_is_compared_as_a_second_model_in_the_base_dtype(full_run, tmp_path):
    run_dir, base = full_run
    summary = compare(str(base), str(run_dir), PROMPTS, tmp_path, max_new_tokens=8, limit=2)
    assert summary["n"] == 2 and summary["tuned"]["loss"] < summary["base"]["loss"]
    # The checkpoint holds fp32 weights; under --dtype auto the tuned model loads as the base does, in bf16 (as
    # export writes it), not in twice the memory and another precision. An explicit --dtype applies to both.
    assert json.loads((resolve_checkpoint(str(run_dir)) / "config.json").read_text())["dtype"] == "float32"
    models = SideBySide(str(base), str(run_dir)).load()
    assert models.base_model.dtype == models.tuned_model.dtype == torch.bfloat16
    models = SideBySide(str(base), str(run_dir), dtype="float32").load()
    assert models.base_model.dtype == models.tuned_model.dtype == torch.float32


def test_whole_weights_are_told_from_empty_ones_and_from_an_adapter(full_run, trained_run, tmp_path):
    checkpoint = shutil.copytree(resolve_checkpoint(str(full_run[0])), tmp_path / "checkpoint-10")
    assert has_whole_weights(checkpoint) and not has_whole_weights(resolve_checkpoint(str(trained_run)))
    # An adapter's weights beside a model's config.json are not a model.
    adapter = shutil.copytree(resolve_checkpoint(str(trained_run)), tmp_path / "adapter")
    shutil.copy2(checkpoint / "config.json", adapter / "config.json")
    assert not has_whole_weights(adapter)
    saved = load_file(checkpoint / "model.safetensors")
    save_file({k: torch.empty(0, dtype=v.dtype) for k, v in saved.items()}, checkpoint / "model.safetensors")
    assert not has_whole_weights(checkpoint)


def test_a_full_checkpoint_that_zero3_saved_empty_names_export(full_run, tiny_model, tmp_path, capsys, monkeypatch):
    checkpoint = shutil.copytree(resolve_checkpoint(str(full_run[0])), tmp_path / "checkpoint-10")
    saved = load_file(checkpoint / "model.safetensors")
    save_file({k: torch.empty(0, dtype=v.dtype) for k, v in saved.items()}, checkpoint / "model.safetensors")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    assert main(["--base", str(full_run[1]), "--tuned", str(checkpoint), "--prompts", PROMPTS]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: --tuned / CHECKPOINT {checkpoint}: {checkpoint} holds no LoRA adapter and no whole model weights "
        f"(ZeRO-3 saves them empty); write them with python -m swallow_ft.export {checkpoint} --out DIR and pass that "
        "DIR\n")


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
    (["--prompts", "{tmp}/nope.jsonl"], {},
     "{tmp}/nope.jsonl: data file not found: check the path given to --prompts / PROMPTS"),
    (["--prompts", "{tmp}/text.jsonl"], {"text.jsonl": TEXT_ROWS},
     "{tmp}/text.jsonl: compare needs prompts with reference answers, not `text` rows"),
    (["--prompts", "{tmp}/bad.jsonl"], {"bad.jsonl": BAD_ROW},
     "{tmp}/bad.jsonl line 1: message_2 must be a string, got int; convert it to text"),
    (["--prompt_format", "llama-3"], {}, "--prompt_format 'llama-3' is not one of auto, swallow-instruct-v0.1, "
     "swallow-instruct-v0, llama3, chat_template, none"),
    (["--base", ".cache/tiny-swalow"], {},
     "--base / BASE_MODEL .cache/tiny-swalow: no such directory; pass the base model's directory or its Hub id"),
    (["--tuned", "{tmp}/local_tny"], {}, "--tuned / CHECKPOINT {tmp}/local_tny: no such checkpoint directory; pass a "
     "checkpoint-N directory, a Determined checkpoint directory, a run directory such as runs/local_tiny, or a UUID "
     "with --storage DIR"),
    (["--storage", "{tmp}"], {}, "{tmp}/{uuid}: no such checkpoint in --storage {tmp} (its subdirectories are UUIDs)"),
    (["--max_new_tokens", "0"], {},
     "--max_new_tokens / MAX_NEW_TOKENS 0: must be at least 1 (leave it out, or None, for the default)"),
    (["--n", "0"], {}, "--n / N_PROMPTS 0: must be at least 1 (leave it out, or None, for all)"),
    (["--n", "-1"], {}, "--n / N_PROMPTS -1: must be at least 1 (leave it out, or None, for all)"),
    (["--batch_size", "0"], {}, "--batch_size 0: must be at least 1 (leave it out for 8)"),
    (["--prompts", "{tmp}/empty.jsonl"], {"empty.jsonl": "\n"},
     "{tmp}/empty.jsonl: no rows: add examples to it or point --prompts / PROMPTS at another file"),
], ids=["missing-prompts", "text-rows", "bad-row", "unknown-format", "base-typo", "tuned-typo", "wrong-storage",
        "no-new-tokens", "no-prompts", "negative-prompts", "no-batch", "empty-prompts"])
def test_bad_inputs_fail_in_one_line_before_any_weights_load(flags, files, error, trained_run, tiny_model, tmp_path,
                                                               capsys, monkeypatch):
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


def test_a_run_that_failed_before_its_first_checkpoint_is_named_as_such(tiny_model, tmp_path, capsys, monkeypatch):
    """Its run directory holds only flags.json; compare said `not a checkpoint (...); pass a checkpoint-N directory or
    a run directory such as runs/local_tiny`, which it is."""
    run_dir = tmp_path / "local_tiny"
    run_dir.mkdir()
    (run_dir / "flags.json").write_text("{}\n")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    assert main(["--base", str(tiny_model), "--tuned", str(run_dir), "--prompts", PROMPTS]) == 2
    assert capsys.readouterr().err == (f"error: {run_dir}: the run has no finished checkpoint yet; train until it "
                                       "saves one, or pass a checkpoint-N directory\n")


def test_a_broken_user_data_json_is_one_line_naming_the_fix_in_compare_and_export(trained_run, tiny_model, tmp_path,
                                                                                 capsys, monkeypatch):
    checkpoint = shutil.copytree(resolve_checkpoint(str(trained_run)), tmp_path / "checkpoint-80")
    (checkpoint / "user_data.json").write_text('{"prompt_format": "chat_template",', encoding="utf-8")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    assert main(["--base", str(tiny_model), "--tuned", str(checkpoint), "--prompts", PROMPTS]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(str(checkpoint))}/user_data\.json: not valid JSON \(.+\); restore it, "
                        r"e\.g\. from another checkpoint of the same run: it records the base model and the prompt "
                        r"format the run trained with", error), error
    # export says the same, and before it merges any weights (a LoRA export needs no --dtype).
    with pytest.raises(UserError) as caught:
        export(checkpoint, tmp_path / "model")
    assert f"error: {caught.value}" == error


def test_best_of_a_search_is_its_best_trials_checkpoint_and_loss_curves(trained_run, tiny_model, tmp_path,
                                                                        monkeypatch):
    """best:<id> is the best checkpoint across every trial of a search; the loss curves were the first trial's."""
    cluster = FakeCluster(monkeypatch, resolve_checkpoint(str(trained_run)).parent, tmp_path / "storage")
    trial_2 = {"training": [{"steps_completed": 40, "loss": 2.0}],
               "validation": [{"steps_completed": 40, "eval_loss": 2.0}]}
    assert metric_history(experiment_id=42) == trial_2
    monkeypatch.chdir(tmp_path)  # compare downloads into checkpoints/
    models = SideBySide(str(tiny_model), "best:42")
    assert models.checkpoint.path == Path("checkpoints", cluster.uuid, "checkpoint-80")
    assert (models.checkpoint.uuid, models.checkpoint.trial_id) == (cluster.uuid, 2)
    assert metric_history(trial_id=models.checkpoint.trial_id) == trial_2  # as the notebook plots them
    # The report says which checkpoint best:42 was when it ran.
    summary = compare(str(tiny_model), "best:42", PROMPTS, tmp_path / "report", limit=1, max_new_tokens=4,
                      models=models)
    assert (summary["tuned_uuid"], summary["tuned_trial_id"]) == (cluster.uuid, 2)
    assert (f"tuned: `best:42` → checkpoints/{cluster.uuid}/checkpoint-80 (UUID {cluster.uuid}, trial 2)  \n"
            in (tmp_path / "report" / "comparison.md").read_text())


def test_the_report_records_the_checkpoint_it_compared(trained_run, tiny_model, tmp_path):
    """A run directory names its latest checkpoint, another one as the run goes on: the report says which it was."""
    checkpoint = resolve_checkpoint(str(trained_run))
    summary = compare(str(tiny_model), str(trained_run), PROMPTS, tmp_path, limit=1, max_new_tokens=4)
    recorded = json.loads((tmp_path / "summary.json").read_text())
    assert recorded["tuned_checkpoint"] == summary["tuned_checkpoint"] == str(checkpoint)
    assert recorded["tuned_uuid"] == checkpoint.parent.name and recorded["tuned_trial_id"] is None  # not on a cluster
    assert (f"tuned: `{trained_run}` → {checkpoint} (UUID {checkpoint.parent.name})  \n"
            in (tmp_path / "comparison.md").read_text())


def test_a_base_other_than_the_one_the_checkpoint_records_is_warned_of(trained_run, tiny_model, tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)  # before any weights load
    # The run recorded .cache/tiny-swallow: the same model by its absolute path, or a copy under another name.
    for same in (str(tiny_model), str(shutil.copytree(tiny_model, tmp_path / "copy"))):
        SideBySide(same, str(trained_run))
    assert "warning" not in capsys.readouterr().err
    other = shutil.copytree(tiny_model, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    SideBySide(str(other), str(trained_run))
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --base / BASE_MODEL {other} is not the base the checkpoint was trained from (.cache/tiny-swallow, "
        f"in its adapter_config.json's base_model_name_or_path); pass that model unless {other} is a copy of it"]
    # A Hub id and a local copy of it: in a directory of the same name, or in the Hugging Face cache.
    hub = "tokyotech-llm/Swallow-70b-instruct-v0.1"
    assert same_model(hub, "/models/Swallow-70b-instruct-v0.1/")
    assert same_model(hub, "/hf/hub/models--tokyotech-llm--Swallow-70b-instruct-v0.1/snapshots/0123abcd")
    assert not same_model(hub, "tokyotech-llm/Swallow-7b-instruct-v0.1")


@pytest.mark.parametrize("kwargs, error", [
    ({"dtype": "bf17"}, "--dtype / DTYPE 'bf17': not one of auto, bfloat16, float16, float32 (or bf16, fp16, fp32); "
     "bfloat16 for Swallow-70B"),
    ({"device_map": "cuda"}, "--device_map / DEVICE_MAP 'cuda': no such device here (0 CUDA GPUs visible); use None "
     'to load on the CPU, or "auto" where there are GPUs (notebook.yaml)'),
    ({"device_map": "gpu"}, "--device_map / DEVICE_MAP 'gpu': not one of auto, balanced, balanced_low_0, sequential, "
     'cpu, cuda, cuda:N; "auto" spreads the model over the GPUs, None loads it on the CPU'),
], ids=["dtype", "cuda-without-gpu", "no-such-device"])
def test_a_bad_dtype_or_device_map_fails_in_one_line_before_anything_loads(kwargs, error, trained_run, tiny_model,
                                                                         monkeypatch):
    """They failed only at the weights: `module 'torch' has no attribute 'bf17'`, a bare AssertionError for cuda."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a notebook without GPUs
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(UserError) as caught:
        SideBySide(str(tiny_model), str(trained_run), **kwargs)
    assert str(caught.value) == error


def test_dtype_takes_the_short_names_too(trained_run, tiny_model):
    models = SideBySide(str(tiny_model), str(trained_run), dtype="bf16").load()
    assert models.base_model.dtype == torch.bfloat16


@pytest.fixture
def full_gpus(tmp_path, monkeypatch):
    """from_pretrained as on GPUs without room for the model: accelerate's own placement puts it on disk."""
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: load(
        *args, max_memory={"cpu": 200_000}, offload_folder=str(tmp_path / "offload"), **kwargs))


def test_a_model_that_auto_placement_puts_on_disk_is_warned_of(full_run, full_gpus, capsys):
    run_dir, base = full_run
    SideBySide(str(base), str(run_dir), device_map="auto").load()
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        f"warning: --device_map / DEVICE_MAP auto: parts of the {which} model are on disk (GPU memory full, or no "
        "GPU), so generation will be very slow; Swallow-70B in bf16 needs 4 x 80 GB GPUs (~129 GiB of weights, see "
        "notebook.yaml)" for which in ("base", "tuned")]


def test_an_adapter_is_not_loaded_onto_a_base_on_disk(trained_run, tiny_model, full_gpus, tmp_path):
    """peft's loader rewrote the safetensors files that disk offloading reads: the base model's own."""
    base = shutil.copytree(tiny_model, tmp_path / "base")
    weights = (base / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"^--device_map / DEVICE_MAP auto: part of the base model went to disk, where "
                                        r"loading the adapter would rewrite the base's weight files; give it more GPU"):
        SideBySide(str(base), str(trained_run), device_map="auto").load()
    assert (base / "model.safetensors").read_bytes() == weights
