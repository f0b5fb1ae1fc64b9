"""--torch_compile: accelerate's regional compilation (one compiled decoder layer, reused by every layer), trained
end to end on CPU, where inductor builds C++ kernels instead of the GPU's Triton ones."""

import re

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.eval_frame import OptimizedModule
from transformers import Trainer

from conftest import checkpoint_steps, read_metrics, run_clm
from swallow_ft.arguments import REGIONAL_COMPILATION, parse_input_arguments
from swallow_ft.model import load_model

CONFIG = "experiments/local_tiny.yaml"


@pytest.mark.parametrize("user_setting, regional", [(None, True), ("false", False)])
def test_torch_compile_compiles_each_decoder_layer_unless_told_otherwise(tiny_model, tmp_path, monkeypatch,
                                                                         user_setting, regional):
    monkeypatch.setenv(REGIONAL_COMPILATION, "")  # so that monkeypatch restores the variable's absence afterwards
    monkeypatch.delenv(REGIONAL_COMPILATION)
    if user_setting:
        monkeypatch.setenv(REGIONAL_COMPILATION, user_setting)
    model_args, _, training_args = parse_input_arguments({}, [
        "--model_name_or_path", str(tiny_model), "--train_file", "data/chat_ja.jsonl", "--output_dir", str(tmp_path),
        "--use_cpu", "true", "--use_lora", "--torch_compile"])
    model = load_model(model_args, training_args, packing=True)
    trainer = Trainer(model=model, args=training_args)
    assert trainer.accelerator.state.dynamo_plugin.use_regional_compilation is regional

    prepared = trainer.accelerator.prepare_model(model)  # what the training loop runs; compiles on first call
    assert isinstance(prepared, OptimizedModule) is not regional
    if regional:
        layers = prepared.base_model.model.model.layers
        assert len(layers) == model.config.num_hidden_layers
        assert all(isinstance(layer, OptimizedModule) for layer in layers)
        # The compiled layers share the original parameters: the optimizer and the saved adapter see one model.
        assert layers[0]._orig_mod is model.base_model.model.model.layers[0]


def _training_losses(run_dir):
    return {r["steps_completed"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["group"] == "training"}


def _adapter(run_dir, step):
    (storage_id,) = [sid for sid, s in checkpoint_steps(run_dir / "checkpoints").items() if s == step]
    return load_file(run_dir / "checkpoints" / storage_id / f"checkpoint-{step}" / "adapter_model.safetensors")


def test_compiled_training_matches_eager_saves_the_same_adapter_and_resumes(tiny_model, tmp_path):
    common = ["--config", CONFIG, "--max_steps", 20, "--logging_steps", 1, "--save_steps", 10,
              "--eval_strategy", "no", "--save_total_limit", 5]
    eager = run_clm(*common, "--runs_dir", tmp_path / "eager")
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = run_clm(*common, "--runs_dir", tmp_path / "compiled", "--torch_compile",
                       env={"TORCH_LOGS": "recompiles"})
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    # Packed batches are padded to block_size under compile: no recompile for a new sequence length. (Two remain:
    # the first layer's input needs no grad, and two leaf modules share one wrapper's code.)
    assert "Recompiling function" in compiled.stderr and "size mismatch" not in compiled.stderr

    eager_dir, compiled_dir = tmp_path / "eager" / "local_tiny", tmp_path / "compiled" / "local_tiny"
    eager_losses, compiled_losses = _training_losses(eager_dir), _training_losses(compiled_dir)
    assert list(compiled_losses) == list(range(1, 21))
    # The same function on the same batches from the same seeded adapters: fp32 on CPU, where only the order of
    # fused float operations differs.
    for step, loss in eager_losses.items():
        assert compiled_losses[step] == pytest.approx(loss, rel=1e-4), step
    assert compiled_losses[20] < 0.7 * compiled_losses[1]

    # The adapter is saved from the original modules: the same keys as eager (no _orig_mod. prefixes), so peft and
    # swallow_ft.export load it as any other.
    eager_adapter, compiled_adapter = _adapter(eager_dir, 20), _adapter(compiled_dir, 20)
    assert sorted(compiled_adapter) == sorted(eager_adapter) and not any("_orig_mod" in k for k in compiled_adapter)
    for key, tensor in eager_adapter.items():
        torch.testing.assert_close(compiled_adapter[key], tensor, rtol=0, atol=1e-5, msg=key)

    resumed = run_clm(*common, "--runs_dir", tmp_path / "compiled", "--torch_compile", "--max_steps", 30)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resuming from checkpoint \S+ \(.*checkpoint-20\)", resumed.stderr), resumed.stderr[-3000:]
    assert "Finished at step 30" in resumed.stdout
    assert list(_training_losses(compiled_dir)) == list(range(1, 31))


def test_under_compile_liger_supplies_only_its_fused_loss(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv(REGIONAL_COMPILATION, "true")
    base = ["--model_name_or_path", str(tiny_model), "--train_file", "data/chat_ja.jsonl", "--output_dir",
            str(tmp_path), "--use_liger_kernel"]
    assert parse_input_arguments({}, base)[2].liger_kernel_config is None  # eager: all of Liger's kernels
    config = parse_input_arguments({}, base + ["--torch_compile"])[2].liger_kernel_config
    assert config == {"fused_linear_cross_entropy": True, "cross_entropy": False, "rms_norm": False,
                      "swiglu": False, "rope": False}


def test_compiled_flex_attention_sees_packed_rows_and_compiles_once(tiny_model):
    # On a GPU, --attn_implementation auto picks flex_attention for packed rows, and its block mask (a new one per
    # batch) reaches the compiled layers as an input. Checked here forward-only: flex has no backward on CPU.
    from accelerate.utils import compile_regions
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    models = {}
    for attn in ("sdpa", "flex_attention"):
        models[attn] = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()
        models[attn].config.use_cache = False
    compiled = compile_regions(models["flex_attention"])
    generator = torch.Generator().manual_seed(0)
    graphs = []  # compiled graphs so far, after each batch
    for lengths in ([[100, 156], [30, 200, 26]], [[256], [1, 255]], [[64] * 4, [128, 100, 28]]):
        ids = torch.randint(3, 1000, (2, 256), generator=generator)
        position_ids = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
        with torch.no_grad():
            expected = models["sdpa"](input_ids=ids, position_ids=position_ids).logits
            got = compiled(input_ids=ids, position_ids=position_ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:] == graphs[:1] * 2  # new packings, no new graphs
