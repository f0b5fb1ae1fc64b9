"""Kernel choices: --attn_implementation auto, Liger Kernel, and the one-line errors they get before weights load."""

import pytest
import torch
from transformers.integrations import HfDeepSpeedConfig

from conftest import run_clm
from swallow_ft import model as model_module
from swallow_ft.arguments import parse_input_arguments
from swallow_ft.model import choose_attention, load_model

on_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what a machine without a GPU does")


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "flex_attention", "flash_attention_2"])
def test_an_explicit_kernel_is_kept(kernel):
    assert choose_attention(kernel, packing=True) == kernel


@on_cpu
def test_auto_is_sdpa_without_a_gpu():
    assert choose_attention("auto", packing=True) == "sdpa"


def test_auto_picks_flex_for_packed_rows_where_flex_runs(monkeypatch):
    # A GPU with Triton is what flex_attention_available() reports there; this machine has none.
    monkeypatch.setattr(model_module, "flex_attention_available", lambda: True)
    assert choose_attention("auto", packing=True) == "flex_attention"
    assert choose_attention("auto", packing=False) == "sdpa"


@pytest.mark.parametrize("capability, available", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_flex_needs_an_ampere_or_newer_gpu(monkeypatch, capability, available):
    """On V100/T4-class cards flex_attention is far slower than sdpa or does not run: auto keeps sdpa there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(model_module, "triton_compiler", lambda: "gcc")
    monkeypatch.setattr(model_module.importlib.util, "find_spec", lambda name: object())
    assert model_module.flex_attention_available() is available


def test_auto_keeps_sdpa_under_zero3(monkeypatch):
    monkeypatch.setattr(model_module, "flex_attention_available", lambda: True)
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert choose_attention("auto", packing=True) == "sdpa"
    del zero3
    assert choose_attention("auto", packing=True) == "flex_attention"


@on_cpu
def test_load_model_resolves_auto(tiny_model, tmp_path):
    model_args, _, training_args = parse_input_arguments({}, [
        "--model_name_or_path", str(tiny_model), "--train_file", "data/chat_ja.jsonl", "--output_dir", str(tmp_path),
        "--use_cpu", "true", "--use_lora"])
    assert model_args.attn_implementation == "auto" and model_args.lora_dropout == 0.0
    model = load_model(model_args, training_args, packing=True)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is False


@on_cpu
@pytest.mark.parametrize("flags, expected", [
    (["--use_liger_kernel"], "--use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton): drop it"),
    (["--attn_implementation", "flex_attention"], "--attn_implementation flex_attention has no backward pass on CPU"),
    (["--attn_implementation", "flash_attention_2"], "flash_attention_2 needs the flash-attn package"),
])
def test_kernels_this_machine_cannot_run_stop_before_weights_load(tiny_model, tmp_path, flags, expected):
    result = run_clm("--config", "experiments/local_tiny.yaml", "--runs_dir", tmp_path, *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run_clm.py: ") and expected in last, last
    assert "Loading weights" not in result.stderr and not (tmp_path / "local_tiny" / "checkpoints").exists()


def test_triton_kernels_without_a_c_compiler_stop_before_weights_load(tiny_model, tmp_path, monkeypatch):
    # Triton builds a C launcher per kernel on first use; a GPU image without gcc would fail mid-step. The GPU is
    # pretended (this machine has none); the check itself and the compiler lookup are the real ones.
    from swallow_ft.preflight import Findings, check_kernels

    model_args, _, training_args = parse_input_arguments({}, [
        "--model_name_or_path", str(tiny_model), "--train_file", "data/chat_ja.jsonl", "--output_dir", str(tmp_path),
        "--attn_implementation", "flex_attention"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    found = Findings()
    check_kernels(model_args, training_args, {}, found, "run_clm.py", on_this_machine=True)
    assert found.problems == [] or model_module.triton_compiler() is None
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no clang
    assert model_module.triton_compiler() is None and not model_module.flex_attention_available()
    check_kernels(model_args, training_args, {}, found, "run_clm.py", on_this_machine=True)
    assert found.problems == ["run_clm.py: --attn_implementation flex_attention compiles Triton kernels, which needs "
                              "a C compiler, and there is none (CC, gcc, clang): install gcc in the image, or use "
                              "sdpa, no Liger and no --torch_compile"]


@on_cpu
def test_torch_compile_without_a_cpp_compiler_stops_before_weights_load(tiny_model, tmp_path, monkeypatch):
    # On CPU inductor builds C++ kernels; the check and the compiler lookup are real, the missing compiler is not.
    from swallow_ft.arguments import REGIONAL_COMPILATION
    from swallow_ft.preflight import Findings, check_kernels

    monkeypatch.setenv(REGIONAL_COMPILATION, "true")  # parsing --torch_compile sets it; keep it out of later tests
    model_args, _, training_args = parse_input_arguments({}, [
        "--model_name_or_path", str(tiny_model), "--train_file", "data/chat_ja.jsonl", "--output_dir", str(tmp_path),
        "--use_cpu", "true", "--torch_compile"])
    found = Findings()
    check_kernels(model_args, training_args, {}, found, "run_clm.py", on_this_machine=True)
    assert found.problems == [] or model_module.cpp_compiler() is None
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, no clang++
    found = Findings()
    check_kernels(model_args, training_args, {}, found, "run_clm.py", on_this_machine=True)
    assert found.problems == ["run_clm.py: --torch_compile on CPU builds C++ kernels, which needs a C++ compiler, "
                              "and there is none (CXX, g++, clang++): install g++, or drop --torch_compile"]


@pytest.mark.parametrize("flags, deepspeed, expected", [
    (["--use_lora", "--bf16"], None, torch.bfloat16),  # a frozen base: the fp32 adapters are what AdamW updates
    (["--use_lora", "--fp16"], None, torch.float16),
    (["--bf16"], "ds_configs/ds_config_stage_2.json", torch.bfloat16),  # DeepSpeed keeps fp32 master weights
    (["--bf16"], None, torch.float32),  # full fine-tuning, nothing else keeps fp32 weights: autocast computes in bf16
    (["--fp16"], None, torch.float32),  # fp16 weights would also make the GradScaler refuse their gradients
    (["--bf16", "--torch_dtype", "bfloat16"], None, torch.bfloat16),  # asked for: kept, with a warning
    ([], None, torch.float32),
])
def test_base_weights_load_in_16_bits_only_where_fp32_weights_are_kept_elsewhere(flags, deepspeed, expected, caplog):
    model_args, _, training_args = parse_input_arguments({}, ["--model_name_or_path", "m", "--train_file",
                                                               "data/camel_math_ja.jsonl", "--output_dir", "out",
                                                               "--use_cpu", "true", *flags])
    training_args.deepspeed = deepspeed  # the dtype rule reads only whether DeepSpeed is on
    assert model_module.resolve_dtype(model_args, training_args) == expected
    assert ("small updates round away" in caplog.text) == ("--torch_dtype" in flags)


def test_a_lora_on_lm_head_with_liger_is_refused_before_weights_load(tmp_path):
    """Liger's fused loss multiplies by lm_head.weight itself: peft's adapter on lm_head would get no gradient."""
    from swallow_ft.preflight import Findings, check_kernels

    model_args, _, training_args = parse_input_arguments({}, [
        "--model_name_or_path", "m", "--train_file", "data/chat_ja.jsonl", "--output_dir", str(tmp_path),
        "--use_lora", "--lora_target_modules", "q_proj,v_proj,lm_head", "--use_liger_kernel"])
    found = Findings()
    check_kernels(model_args, training_args, {}, found, "exp.yaml", on_this_machine=False)
    assert found.problems == ["exp.yaml: --lora_target_modules lm_head with --use_liger_kernel: Liger's fused loss "
                              "reads lm_head's base weight, so that adapter would never train; drop lm_head or "
                              "--use_liger_kernel"]
