"""bench/traffic.py: FLOPs and memory traffic of one training step, counted op by op on fake tensors."""

import subprocess
import sys

import torch
from peft.tuners.lora import LoraLayer
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import traffic  # noqa: E402

from swallow_ft.flops import flops_per_token  # noqa: E402


def _count(peft_casts, fake=True, fuse=False, liger=False):
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    model = traffic.lora_model("tiny", 16, "all-linear", 0.0, fake_mode)
    return traffic.step_traffic(model, 2, 64, peft_casts, fuse, fake_mode=fake_mode, liger=liger), model


def test_fake_tensors_run_the_kernels_real_ones_do():
    """The 7B figures come from fake tensors; on the tiny shape the same step on real tensors counts the same."""
    fake, _ = _count(peft_casts=False)
    real, _ = _count(peft_casts=False, fake=False)
    assert fake == real
    assert {"matmul", "attention", "dtype cast to fp32", "elementwise and reductions"} <= set(fake)


def test_matmul_flops_are_the_mfu_count_less_the_first_layers_unneeded_input_gradients():
    rows, model = _count(peft_casts=False)
    tokens = 2 * 64
    first = [model.base_model.model.model.layers[0].self_attn.get_submodule(name) for name in ("q_proj", "k_proj",
                                                                                              "v_proj")]
    weights = sum(m.base_layer.weight.numel() + m.lora_A.default.weight.numel() for m in first)
    # The embedding is frozen, so nothing needs the gradient of the first layer's q, k and v inputs: neither through
    # the base weights nor through the adapters' A.
    assert rows["matmul"]["flops"] == flops_per_token(model) * tokens - 2 * weights * tokens
    assert 0 < rows["attention"]["flops"] < rows["matmul"]["flops"]


def test_peft_input_casts_cost_four_activation_copies_per_adapted_layer():
    skipped, model = _count(peft_casts=False)
    kept, _ = _count(peft_casts=True)
    adapted = [m for m in model.modules() if isinstance(m, LoraLayer)]
    extra = sum(kept[k]["kernels"] - skipped[k]["kernels"] for k in ("dtype cast to fp32", "dtype cast to bf16"))
    assert len(adapted) == 14 and extra == 4 * len(adapted) - 2 * 3  # as tests/test_trainer.py counts in training
    assert kept["matmul"] == skipped["matmul"]
    assert sum(r["seconds"] for r in kept.values()) > sum(r["seconds"] for r in skipped.values())


def test_fused_lora_moves_the_scale_and_add_into_the_matmuls():
    plain, model = _count(peft_casts=False)
    fused, _ = _count(peft_casts=False, fuse=True)
    adapted = sum(isinstance(m, LoraLayer) for m in model.modules())
    assert fused["matmul"]["flops"] == plain["matmul"]["flops"]
    assert fused["matmul"]["kernels"] == plain["matmul"]["kernels"]  # addmm_ accumulates where peft's matmul wrote
    # Per adapted layer: forward loses the scale and the add, backward the scale of the gradient and the sum of two
    # input gradients, and gains two scales of rank-sized tensors. The first layer's q, k and v had no input sum.
    removed = plain["elementwise and reductions"]["kernels"] - fused["elementwise and reductions"]["kernels"]
    assert removed == 2 * adapted - 3
    assert sum(r["bytes"] for r in fused.values()) < 0.95 * sum(r["bytes"] for r in plain.values())


def test_liger_is_modelled_as_one_kernel_per_norm_swiglu_rope_and_loss():
    eager, model = _count(peft_casts=False)
    liger, _ = _count(peft_casts=False, liger=True)
    assert liger == _count(peft_casts=False, fake=False, liger=True)[0]  # real tensors count the same
    layers = model.config.num_hidden_layers
    # Per layer two RMSNorms, SwiGLU and RoPE, each forward and backward, less the first norm's backward (its input,
    # the frozen embedding's output, needs no gradient); the final norm both ways; the loss in one forward kernel.
    assert liger["fused (Liger, modelled)"]["kernels"] == 8 * layers - 1 + 2 + 1
    # The same matmuls (the fused loss's two run as matmuls), fewer bytes elsewhere: no fp32 logits, no RMSNorm in fp32.
    assert liger["matmul"]["flops"] == eager["matmul"]["flops"]
    assert liger["dtype cast to fp32"]["bytes"] < 0.5 * eager["dtype cast to fp32"]["bytes"]
    assert sum(r["bytes"] for r in liger.values()) < sum(r["bytes"] for r in eager.values())


def test_script_reports_the_7b_step_in_seconds():
    result = subprocess.run([sys.executable, "bench/traffic.py", "--shape", "swallow-7b", "--micro-batch", "1",
                             "--seq", "512"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "matmul" in result.stdout and "floor:" in result.stdout and "tokens/s for 512 tokens" in result.stdout
    assert torch.get_num_threads() > 0
