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
