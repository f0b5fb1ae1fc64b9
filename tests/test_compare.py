"""compare: both models answer in the run's own prompt format; report files, scores and losses are consistent."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_clm
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from swallow_ft.arguments import DataTrainingArguments
from swallow_ft.compare import Example, SideBySide, compare, default_max_new_tokens, main, prompt_settings
from swallow_ft.data.loading import encode_example, load_raw_datasets
from swallow_ft.data.templates import FORMATS
from swallow_ft.errors import UserError
from swallow_ft.export import export, has_whole_weights, resolve_checkpoint

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
        f"error: --tuned {checkpoint}: {checkpoint} holds no LoRA adapter and no whole model weights (ZeRO-3 saves "
        f"them empty); write them with python -m swallow_ft.export {checkpoint} --out DIR and pass --tuned DIR\n")


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
     "{tmp}/nope.jsonl: data file not found: check the path given to --prompts"),
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
    (["--max_new_tokens", "0"], {}, "--max_new_tokens 0: must be at least 1 (leave it out for the default)"),
    (["--n", "0"], {}, "--n 0: must be at least 1 (leave it out to compare every prompt)"),
    (["--n", "-1"], {}, "--n -1: must be at least 1 (leave it out to compare every prompt)"),
    (["--batch_size", "0"], {}, "--batch_size 0: must be at least 1 (leave it out for 8)"),
    (["--prompts", "{tmp}/empty.jsonl"], {"empty.jsonl": "\n"},
     "{tmp}/empty.jsonl: no rows: add examples to it or point --prompts at another file"),
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
