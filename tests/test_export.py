"""Exporting checkpoints of real short runs as standalone models (python -m swallow_ft.export).

Merged LoRA must compute what base + adapter computes, for a single process and for 2 ZeRO-3 ranks; an
adapter saved empty by ZeRO-3 is rebuilt from the shards, or refused with the fix when there are none.
The exported chat template must prompt the model with the very token ids it was trained on.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_clm
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_compare import FakeCluster
from transformers import AutoModelForCausalLM, AutoTokenizer

from swallow_ft.checkpoint_files import locate_checkpoint, prompt_settings, resolve_checkpoint
from swallow_ft.compare import load_examples
from swallow_ft.data.templates import LLAMA3_SPECIALS, SWALLOW_SYSTEM_PROMPT
from swallow_ft.errors import UserError
from swallow_ft.export import export, load_adapter, main, merge

SHORT = ["--max_steps", 10, "--save_steps", 10, "--eval_steps", 10]
PROMPT = "<s>[INST] 81 と 70 の和を求めなさい。 [/INST]"
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
EMPTY_ADAPTER_ERROR = (r"{dir}/adapter_model\.safetensors: tensor base_model\.model\.\S+\.lora_[AB]\.weight has size 0 "
                       r"\(saved under ZeRO-3 without stage3_gather_16bit_weights_on_model_save and no ZeRO shards "
                       r"to rebuild it from\); re-save with ds_configs/ds_config_stage_3\.json")


def train(config, runs_dir, *flags):
    result = run_clm("--config", config, "--runs_dir", runs_dir, *SHORT, *flags)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    train("experiments/local_tiny.yaml", runs_dir)
    return runs_dir / "local_tiny"


@pytest.fixture(scope="module")
def zero3_run(tiny_model, tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs_ds3")
    train("experiments/local_tiny_ds3.yaml", runs_dir)
    return runs_dir / "local_tiny_ds3"


@pytest.fixture(scope="module")
def bf16_full_run(tiny_model, tmp_path_factory):
    """(run dir, base): full fine-tuning without DeepSpeed of a bfloat16 base, which trains and saves fp32 weights."""
    base = tmp_path_factory.mktemp("bf16-base")
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    runs_dir = tmp_path_factory.mktemp("runs_full")
    train("experiments/local_tiny.yaml", runs_dir, "--use_lora", "false", "--model_name_or_path", base)
    return runs_dir / "local_tiny", base


@pytest.fixture(scope="module")
def zero3_full_run(tiny_model, tmp_path_factory):
    """Full fine-tuning under 2 ZeRO-3 ranks: gathered bf16 weights in model.safetensors, plus the shards."""
    runs_dir = tmp_path_factory.mktemp("runs_ds3_full")
    train("experiments/local_tiny_ds3.yaml", runs_dir, "--use_lora", "false")
    return runs_dir / "local_tiny_ds3"


def forward_and_generate(model, tokenizer):
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    return logits, generated[0, ids.shape[1]:].tolist()


def base_plus_adapter(tiny_model, adapter_dir):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir)


def emptied_copy(ckpt, dest, keep_shards):
    """The checkpoint as ZeRO-3 saves it without gathering: every adapter tensor of size 0."""
    ignore = None if keep_shards else shutil.ignore_patterns("global_step*", "latest")
    shutil.copytree(ckpt, dest, ignore=ignore)
    saved = load_file(dest / "adapter_model.safetensors")
    save_file({k: torch.empty(0, dtype=v.dtype) for k, v in saved.items()}, dest / "adapter_model.safetensors")
    return dest


@pytest.mark.parametrize("run", ["lora_run", "zero3_run"])
def test_merged_model_computes_base_plus_adapter(run, request, tiny_model, tmp_path):
    run_dir = request.getfixturevalue(run)
    ckpt = resolve_checkpoint(str(run_dir))
    out = export(run_dir, tmp_path / "merged", dtype="float32")

    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json"} | TOKENIZER_FILES <= files
    assert not any(name.endswith(".bin") or name.startswith("adapter_") for name in files)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32 and not any("lora" in k for k in merged.state_dict())
    # The run's replies end with </s>, the base's only end of sequence: nothing is added to its generation config.
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id == 2

    reference = base_plus_adapter(tiny_model, ckpt)
    merged_logits, merged_ids = forward_and_generate(merged, tokenizer)
    reference_logits, reference_ids = forward_and_generate(reference, tokenizer)
    torch.testing.assert_close(merged_logits, reference_logits, atol=1e-4, rtol=0)
    assert merged_ids == reference_ids
    with reference.disable_adapter():  # the adapter really changes the model: the test is not vacuous
        base_logits, _ = forward_and_generate(reference, tokenizer)
    assert (base_logits - reference_logits).abs().max() > 1e-2


def test_adapter_only_writes_the_adapter_and_the_tokenizer(lora_run, tiny_model, tmp_path):
    ckpt = resolve_checkpoint(str(lora_run))
    out = export(lora_run, tmp_path / "adapter", adapter_only=True)
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                               "user_data.json"} | TOKENIZER_FILES
    assert AutoTokenizer.from_pretrained(out).pad_token_id == 0
    # The run's prompt settings travel with the export, so compare prompts an exported model as it was trained.
    assert (out / "user_data.json").read_text() == (ckpt / "user_data.json").read_text()
    assert prompt_settings(out)[0] == "swallow-instruct-v0.1"
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    exported, _ = forward_and_generate(base_plus_adapter(tiny_model, out), tokenizer)
    original, _ = forward_and_generate(base_plus_adapter(tiny_model, ckpt), tokenizer)
    assert torch.equal(exported, original)


def test_adapter_only_records_a_local_base_by_its_absolute_path_and_hub_ids_as_they_are(lora_run, tiny_model,
                                                                                        tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    ckpt = resolve_checkpoint(str(lora_run))
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == ".cache/tiny-swallow"
    monkeypatch.chdir(REPO)
    out = export(lora_run, tmp_path / "adapter", adapter_only=True)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(Path(tiny_model).resolve())
    monkeypatch.chdir(tmp_path)  # from anywhere, the adapter finds its base by its own config alone
    loaded, _ = forward_and_generate(AutoPeftModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out))
    original, _ = forward_and_generate(base_plus_adapter(tiny_model, ckpt), AutoTokenizer.from_pretrained(ckpt))
    assert torch.equal(loaded, original)

    hub = export(lora_run, tmp_path / "hub", base="tokyotech-llm/Swallow-7b-instruct-v0.1", adapter_only=True)
    assert json.loads((hub / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "tokyotech-llm/Swallow-7b-instruct-v0.1"


def test_every_kind_of_local_source_names_the_same_checkpoint(lora_run, monkeypatch):
    ckpt = resolve_checkpoint(str(lora_run))  # the run directory: its latest registered checkpoint
    uuid_dir = ckpt.parent
    assert re.fullmatch(r"checkpoint-10", ckpt.name) and (uuid_dir / "metadata.json").is_file()
    assert resolve_checkpoint(str(uuid_dir)) == ckpt  # a Determined checkpoint directory
    assert resolve_checkpoint(str(ckpt)) == ckpt
    assert resolve_checkpoint(uuid_dir.name, storage=str(lora_run / "checkpoints")) == ckpt

    for name in ("DET_MASTER", "DET_MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for source in (uuid_dir.name, "best:42"):
        with pytest.raises(UserError, match=r"no Determined master is configured; pass --storage DIR .*DET_MASTER"):
            resolve_checkpoint(source)


def test_empty_adapter_without_shards_is_refused_and_nothing_is_written(zero3_run, tmp_path):
    empty = emptied_copy(resolve_checkpoint(str(zero3_run)), tmp_path / "checkpoint-10", keep_shards=False)
    with pytest.raises(UserError) as caught:
        load_adapter(empty)
    assert re.fullmatch(EMPTY_ADAPTER_ERROR.format(dir=re.escape(str(empty))), str(caught.value)), caught.value

    with pytest.raises(UserError, match="has size 0"):
        export(empty, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]  # no model, no staging leftovers


def test_empty_adapter_with_zero3_shards_is_rebuilt_from_them(zero3_run, tiny_model, tmp_path, capsys):
    good = resolve_checkpoint(str(zero3_run))
    empty = emptied_copy(good, tmp_path / "checkpoint-10", keep_shards=True)
    with safe_open(str(empty / "adapter_model.safetensors"), framework="pt") as f:
        assert all(f.get_slice(k).get_shape() == [0] for k in f.keys())

    config, rebuilt, how = load_adapter(empty)
    good_config, saved, _ = load_adapter(good)
    assert config == good_config and rebuilt.keys() == saved.keys() and how.startswith(" rebuilt from ZeRO-3 shards")
    assert all(rebuilt[k].dtype == saved[k].dtype and torch.equal(rebuilt[k], saved[k]) for k in saved)

    out = export(empty, tmp_path / "merged", dtype="float32")
    assert "merged adapter of r=16, alpha=32 rebuilt from ZeRO-3 shards" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(out)
    rebuilt_logits, _ = forward_and_generate(AutoModelForCausalLM.from_pretrained(out), tokenizer)
    good_logits, _ = forward_and_generate(merge(str(tiny_model), good_config, saved, "float32"), tokenizer)
    torch.testing.assert_close(rebuilt_logits, good_logits, atol=1e-4, rtol=0)


def test_full_fine_tuning_without_saved_weights_is_consolidated_from_zero3_shards(zero3_full_run, tmp_path, capsys):
    ckpt = resolve_checkpoint(str(zero3_full_run))
    assert not (ckpt / "adapter_config.json").exists()
    # What the Trainer leaves without stage3_gather_16bit_weights_on_model_save: no model.safetensors at all.
    shutil.copytree(ckpt, tmp_path / "checkpoint-10", ignore=shutil.ignore_patterns("model.safetensors"))
    from_saved = export(ckpt, tmp_path / "from_saved", dtype="bfloat16")
    from_shards = export(tmp_path / "checkpoint-10", tmp_path / "from_shards", dtype="bfloat16")
    printed = capsys.readouterr().out
    assert "fully fine-tuned model from saved weights, bfloat16 (--dtype)" in printed
    assert "fully fine-tuned model from consolidated ZeRO-3 shards (global_step10, 2 ranks), bfloat16 (--dtype)" \
        in printed

    saved, rebuilt = (load_file(d / "model.safetensors") for d in (from_saved, from_shards))
    # The fp32 master weights rounded to bf16 are exactly the bf16 weights the ranks trained with.
    assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)
    assert AutoModelForCausalLM.from_pretrained(from_shards).dtype == torch.bfloat16


def config_dtype(model_dir):
    return json.loads((Path(model_dir) / "config.json").read_text())["dtype"]


def test_full_fine_tuning_exports_in_the_base_dtype_not_the_fp32_it_trained_in(bf16_full_run, tmp_path, capsys):
    run_dir, base = bf16_full_run
    ckpt = resolve_checkpoint(str(run_dir))
    assert (config_dtype(base), config_dtype(ckpt)) == ("bfloat16", "float32")  # what the checkpoint records
    out = export(run_dir, tmp_path / "model")
    assert "fully fine-tuned model from saved weights, bfloat16 (the base's own, from its config.json; --dtype to " \
           "change)" in capsys.readouterr().out
    assert config_dtype(out) == "bfloat16" and AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    trained, written = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert trained.keys() == written.keys() and all(torch.equal(written[k], trained[k].bfloat16()) for k in trained)
    export(run_dir, tmp_path / "fp32", dtype="float32")
    assert config_dtype(tmp_path / "fp32") == "float32"

    # A base that is gone, or whose config cannot be read: one line naming the fix, nothing written.
    moved = shutil.copytree(ckpt, tmp_path / "checkpoint-10", ignore=shutil.ignore_patterns("*.safetensors"))
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    for finetuned_from, message in ((tmp_path / "gone", "base model directory not found; pass --base MODEL"),
                                    (no_config, "cannot read the base's config.json for the dtype to export in")):
        (moved / "user_data.json").write_text(json.dumps({"finetuned_from": str(finetuned_from)}))
        with pytest.raises(UserError) as caught:
            export(moved, tmp_path / "refused")
        assert str(caught.value).startswith(f"{finetuned_from}: {message}") and "\n" not in str(caught.value)
        assert str(caught.value).endswith(("pass --base MODEL, the base the checkpoint was trained from",
                                           "; pass --dtype"))
    assert not (tmp_path / "refused").exists()


NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def no_weights(*args, **kwargs):
    raise AssertionError("weights loaded before the inputs were checked")


# Generation prompts: single- and multi-turn, with and without a system message of their own, one with whitespace.
CHATS = [
    [{"role": "user", "content": "81 と 70 の和を求めなさい。"}],
    [{"role": "user", "content": " 富士山の高さは？\n"}],
    [{"role": "user", "content": "1 と 2 の和は？"}, {"role": "assistant", "content": "3 です。"},
     {"role": "user", "content": "2 倍すると？"}],
    [{"role": "system", "content": "簡潔に答えてください。"}, {"role": "user", "content": "こんにちは"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "元気？"}],
]
REPLY = {"role": "assistant", "content": "151 です。"}


def as_recorded(ckpt, dest, prompt_format, system_prompt, tokenizer="run"):
    """A copy of CKPT whose user_data.json records other prompt settings and, for "llama3", a tokenizer with Llama-3's
    special tokens, or for "legacy", one marked legacy (a word boundary after every special token, as transformers 4
    tokenised Llama-2 vocabularies by default): all that export reads to write the chat template."""
    shutil.copytree(ckpt, dest, ignore=shutil.ignore_patterns("optimizer.pt"))
    (dest / "user_data.json").write_text(json.dumps({"prompt_format": prompt_format, "system_prompt": system_prompt}))
    if tokenizer == "llama3":
        tok = AutoTokenizer.from_pretrained(dest)
        tok.add_special_tokens({"additional_special_tokens": list(LLAMA3_SPECIALS)})
        tok.save_pretrained(dest)
    if tokenizer == "legacy":
        config = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
    return dest


@pytest.mark.parametrize("prompt_format, system_prompt, tokenizer", [
    (None, None, "run"),  # as the run recorded it: swallow-instruct-v0.1 and Swallow's system prompt
    ("swallow-instruct-v0.1", 'Answer "briefly".\n{{ not Jinja }} %}', "run"),
    ("swallow-instruct-v0.1", "", "run"),  # --system_prompt "": no system block unless the messages bring one
    ("swallow-instruct-v0.1", SWALLOW_SYSTEM_PROMPT, "legacy"),
    ("llama3", None, "llama3"),
    ("llama3", "常に敬語で答えてください。", "llama3"),
    ("swallow-instruct-v0", None, "run"),
    ("chat_template", "常に敬語で答えてください。", "run"),
])
def test_exported_chat_template_gives_the_token_ids_of_training_and_compare(prompt_format, system_prompt, tokenizer,
                                                                           lora_run, tmp_path, capsys):
    source = resolve_checkpoint(str(lora_run))
    if prompt_format:
        source = as_recorded(source, tmp_path / "checkpoint-10", prompt_format, system_prompt, tokenizer)
    out = export(source, tmp_path / "model", adapter_only=True)
    fmt, system = prompt_settings(out)  # what compare renders with
    assert f"chat template: the run's {fmt} format with " in capsys.readouterr().out

    exported = AutoTokenizer.from_pretrained(out)
    chats = CHATS[:2] if fmt == "swallow-instruct-v0" else CHATS  # Alpaca-JA: single-turn, no system message
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": chat + [REPLY]}, ensure_ascii=False) + "\n" for chat in chats))
    examples = load_examples(str(prompts), AutoTokenizer.from_pretrained(source), str(source), fmt, system)
    for chat, example in zip(chats, examples, strict=True):
        served = exported.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert exported.convert_ids_to_tokens(served) == exported.convert_ids_to_tokens(example.prompt_ids)
        assert exported.apply_chat_template(chat + [REPLY], tokenize=True)["input_ids"] == example.input_ids


def test_export_says_in_one_line_when_the_chat_template_cannot_give_the_training_ids(lora_run, tmp_path, capsys):
    # Trained in the tokenizer's own template with a legacy tokenizer: training tokenised "<s>[INST]" as
    # <s> ▁[ INST, but transformers 5 saves LlamaTokenizer without `legacy`, and the saved one reads <s> [ INST;
    # no template text can change how the tokenizer splits text that the template itself contains.
    source = as_recorded(resolve_checkpoint(str(lora_run)), tmp_path / "checkpoint-10", "chat_template", None,
                         "legacy")
    out = export(source, tmp_path / "model", adapter_only=True)
    assert [line for line in capsys.readouterr().out.splitlines() if "chat template" in line] == [
        "warning: chat template: apply_chat_template does not give the token ids the run trained on (sample 1, "
        "add_generation_prompt=True: token 1 is '[' where training has '▁['); prompt this model with ids rendered "
        "by swallow_ft.data.templates, as compare does"]
    assert (out / "tokenizer_config.json").is_file()


def test_a_template_without_a_system_role_is_checked_on_the_samples_it_renders(lora_run, tmp_path, capsys):
    # Mistral- and Gemma-style templates raise on a system message; the run trained in this one without a system
    # prompt. Export checks the samples the template renders instead of failing with a traceback after the merge.
    source = as_recorded(resolve_checkpoint(str(lora_run)), tmp_path / "checkpoint-10", "chat_template", None)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    tokenizer.save_pretrained(source)
    out = export(source, tmp_path / "model", dtype="float32")
    assert "chat template: the run's chat_template format with no default system prompt; apply_chat_template " \
           "gives training's token ids (checked on 6 sample prompts)" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(out).chat_template == NO_SYSTEM_TEMPLATE


def test_the_tokenizer_is_checked_before_any_weights_load(bf16_full_run, tmp_path, monkeypatch):
    run_dir, _ = bf16_full_run
    checkpoint = shutil.copytree(resolve_checkpoint(str(run_dir)), tmp_path / "checkpoint-10",
                                 ignore=shutil.ignore_patterns("tokenizer*", "chat_template.jinja", "optimizer.pt"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(UserError, match=f"^{re.escape(str(checkpoint))}: no tokenizer saved in the checkpoint; "
                                        "pass --base MODEL to take it from$"):
        export(checkpoint, tmp_path / "model", dtype="bfloat16")


def test_generation_stops_at_the_token_that_ends_the_runs_replies(lora_run, tmp_path, capsys):
    # A Llama-3 vocabulary trained in the llama3 format: replies end with <|eot_id|>, which the base's
    # generation_config.json (eos_token_id </s>, as Llama-3's lists only <|end_of_text|>) does not list.
    source = as_recorded(resolve_checkpoint(str(lora_run)), tmp_path / "checkpoint-10", "llama3", None, "llama3")
    out = export(source, tmp_path / "model", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(out)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot not in (tokenizer.unk_token_id, None)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [tokenizer.eos_token_id, eot]
    assert f"generation config: eos_token_id [2, {eot}], with <|eot_id|> added, so that servers stop where the " \
           "run's replies end" in capsys.readouterr().out


def test_cli_exports_a_run_directory_in_the_base_dtype(lora_run, tiny_model, tmp_path):
    out = tmp_path / "model"
    result = subprocess.run([sys.executable, "-m", "swallow_ft.export", str(lora_run), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Not bfloat16 for a float32 base: rounding the merged weights cost the adapter's char F1.
    assert config_dtype(tiny_model) == config_dtype(out) == "float32"
    assert f"wrote {out}: merged adapter of r=16, alpha=32 into .cache/tiny-swallow, float32 (the base's own, from " \
           "its config.json; --dtype to change)" in result.stdout
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32
    # The served prompt is the trained one: the run's system prompt, and SentencePiece's word boundary after <s>.
    assert "chat template: the run's swallow-instruct-v0.1 format with the run's system prompt when the messages " \
           "bring none; apply_chat_template gives training's token ids (checked on 8 sample prompts)" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(out)
    question = [{"role": "user", "content": "81 と 70 の和を求めなさい。"}]
    assert tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False) == \
        f"<s> [INST] <<SYS>>\n{SWALLOW_SYSTEM_PROMPT}\n<</SYS>>\n\n81 と 70 の和を求めなさい。 [/INST]"
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:4] == ["<s>", "▁[", "INST", "]"]
    # As training encodes it: the text without <s>, which the tokenizer adds.
    assert ids == tokenizer(f"[INST] <<SYS>>\n{SWALLOW_SYSTEM_PROMPT}\n<</SYS>>\n\n81 と 70 の和を求めなさい。 [/INST]")[
        "input_ids"]


def test_dtype_overrides_the_base_dtype_and_bfloat16_is_only_the_fallback(lora_run, tiny_model, tmp_path, capsys):
    export(lora_run, tmp_path / "bf16", dtype="bfloat16")
    assert config_dtype(tmp_path / "bf16") == "bfloat16"
    assert ", bfloat16 (--dtype) (checkpoint" in capsys.readouterr().out
    untyped = shutil.copytree(tiny_model, tmp_path / "untyped-base")
    config = json.loads((untyped / "config.json").read_text())
    del config["dtype"]
    (untyped / "config.json").write_text(json.dumps(config))
    export(lora_run, tmp_path / "fallback", base=str(untyped))
    assert config_dtype(tmp_path / "fallback") == "bfloat16"
    assert ", bfloat16 (the base's config.json names no dtype; --dtype to change)" in capsys.readouterr().out


def test_cli_missing_source_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "runs" / "nope"
    assert main([str(missing), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {missing}: no such checkpoint directory") and err.count("\n") == 1
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("files", [["flags.json"], ["flags.json", "metrics.jsonl", "checkpoints.jsonl"]])
def test_cli_says_a_run_without_a_checkpoint_has_none_yet(tmp_path, capsys, files):
    """A run that failed before saving leaves flags.json (and maybe metrics): it is a run directory, not a wrong path,
    so `not a checkpoint ...; pass ... a run directory such as runs/local_tiny` sent the user in a circle."""
    run_dir = tmp_path / "runs" / "local_tiny"
    run_dir.mkdir(parents=True)
    for name in files:
        (run_dir / name).write_text("{}\n" if name == "flags.json" else "")
    assert main([str(run_dir), "--out", str(tmp_path / "model")]) == 2
    assert capsys.readouterr().err == (f"error: {run_dir}: the run has no finished checkpoint yet; train until it "
                                       "saves one, or pass a checkpoint-N directory\n")
    assert not (tmp_path / "model").exists()


TRAINING_STATE = re.compile(r"global_step\d+/|optimizer\.pt$|scheduler\.pt$|rng_state[^/]*\.pth$")
WEIGHTS_ONLY = "all but the optimizer and ZeRO state (global_step*/), which only resuming training reads"


def files_under(directory):
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def mib(size):
    return f"{size / 2**20:,.1f} MiB"


def test_a_cluster_checkpoint_is_downloaded_without_the_training_state_export_never_reads(lora_run, tmp_path,
                                                                                        monkeypatch, capsys):
    """Checkpoint.download fetched all of it: for a 70B full fine-tuning, ~1 TB of ZeRO optimizer shards beside
    ~140 GB of weights, into the notebook's container."""
    cluster = FakeCluster(monkeypatch, resolve_checkpoint(str(lora_run)).parent, tmp_path / "storage")
    shard = cluster.files / "checkpoint-10" / "global_step10" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.parent.mkdir()
    shard.write_bytes(bytes(3 * 2**20))
    stored = files_under(cluster.files)
    ref = locate_checkpoint("best:42", download_dir=tmp_path / "downloads")
    downloaded = files_under(tmp_path / "downloads" / cluster.uuid)
    assert downloaded == {path: size for path, size in stored.items() if not TRAINING_STATE.search(path)}
    assert {"checkpoint-10/optimizer.pt", "checkpoint-10/global_step10/" + shard.name} <= set(stored)
    assert cluster.checkpoint.whole_downloads == 0 and (ref.uuid, ref.trial_id) == (cluster.uuid, 2)
    assert capsys.readouterr().out == (f"checkpoint {cluster.uuid}: downloading {mib(sum(downloaded.values()))} of its "
                                       f"{mib(sum(stored.values()))}: {WEIGHTS_ONLY}\n")
    # Export from the cluster: what it wrote names the checkpoint by UUID, its download being gone.
    out = export("best:42", tmp_path / "model", dtype="float32")
    assert f"(checkpoint UUID {cluster.uuid}, trial 2, checkpoint-10)" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


def test_zero3_shards_are_downloaded_only_for_weights_saved_empty(zero3_run, tmp_path, monkeypatch, capsys):
    gathered = resolve_checkpoint(str(zero3_run))
    cluster = FakeCluster(monkeypatch, gathered.parent, tmp_path / "storage")
    ref = locate_checkpoint(cluster.uuid, download_dir=tmp_path / "gathered")
    assert not list(ref.path.glob("global_step*")) and load_adapter(ref.path)[2] == ""
    # The same checkpoint saved by ZeRO-3 without gathering: only the shards hold the adapter, so they follow.
    emptied = tmp_path / "emptied" / cluster.uuid
    emptied_copy(gathered, emptied / gathered.name, keep_shards=True)
    shutil.copy2(gathered.parent / "metadata.json", emptied)
    cluster = FakeCluster(monkeypatch, emptied, tmp_path / "storage-emptied")
    capsys.readouterr()
    ref = locate_checkpoint(cluster.uuid, download_dir=tmp_path / "downloads")
    stored = files_under(cluster.files)
    shards = {path: size for path, size in stored.items() if path.startswith("checkpoint-10/global_step10/")}
    assert files_under(ref.path.parent) == {path: size for path, size in stored.items()
                                            if path in shards or not TRAINING_STATE.search(path)}
    total = sum(stored.values())
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"checkpoint {cluster.uuid}: downloading {mib(sum(shards.values()))} of its {mib(total)}: its ZeRO shards, to "
        "rebuild the weights ZeRO-3 saved empty")
    assert load_adapter(ref.path)[2].startswith(" rebuilt from ZeRO-3 shards (global_step10)")


@pytest.mark.parametrize("storage, reason", [
    ({"type": "shared_fs", "host_path": "{tmp}/storage"}, "the Core API takes no shared_fs storage"),
    ({"type": "directory", "container_path": "{tmp}/not-mounted"},
     "the partial download failed: CheckpointNotFound"),
], ids=["shared_fs", "not-mounted"])
def test_what_the_core_api_cannot_fetch_in_part_is_downloaded_whole_after_a_warning(storage, reason, lora_run,
                                                                                    tmp_path, monkeypatch, capsys):
    config = {key: value.format(tmp=tmp_path) for key, value in storage.items()}
    cluster = FakeCluster(monkeypatch, resolve_checkpoint(str(lora_run)).parent, tmp_path / "storage", config)
    ref = locate_checkpoint(cluster.uuid, download_dir=tmp_path / "downloads")
    stored = files_under(cluster.files)
    assert cluster.checkpoint.whole_downloads == 1 and files_under(ref.path.parent) == stored
    wanted = sum(size for path, size in stored.items() if not TRAINING_STATE.search(path))
    assert capsys.readouterr().err == (
        f"warning: checkpoint {cluster.uuid}: downloading all of it, {mib(sum(stored.values()))}, into "
        f"{tmp_path / 'downloads' / f'.{cluster.uuid}.partial'} ({reason}), where {mib(wanted)} would do "
        f"({WEIGHTS_ONLY}); make room, or mount the checkpoint storage and pass --storage DIR with the UUID\n")


def test_export_warns_of_a_base_other_than_the_one_the_run_trained_from(lora_run, tiny_model, tmp_path, capsys):
    other = shutil.copytree(tiny_model, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    export(lora_run, tmp_path / "adapter", base=str(other), adapter_only=True)
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --base {other} is not the base the checkpoint was trained from (.cache/tiny-swallow, in its "
        f"adapter_config.json's base_model_name_or_path); pass that model unless {other} is a copy of it"]
    copy = shutil.copytree(tiny_model, tmp_path / "base-copy")
    export(lora_run, tmp_path / "copy", base=str(copy), adapter_only=True)
    assert "warning" not in capsys.readouterr().err
