"""swallow_ft/fused_lora.py: LoRA layers as three matmuls, against peft's own forward and backward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting
from transformers import LlamaConfig, LlamaForCausalLM

from swallow_ft.fused_lora import fused_lora

CONFIG = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=176, vocab_size=1200)
IDS = torch.randint(0, 1200, (4, 64), generator=torch.Generator().manual_seed(0))


def lora_model(dtype=torch.float32, **lora):
    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(CONFIG, dtype=dtype)
    # init_lora_weights=False: B is not zero, so the adapters' path contributes to every output and gradient.
    config = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False) | lora
    return get_peft_model(base, LoraConfig(**config))


def step(model, fuse, autocast=False):
    """Loss, logits and the adapters' gradients of one forward and backward."""
    model.zero_grad()
    with fused_lora(model, active=fuse) as fused, disable_input_dtype_casting(model, active=autocast), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad}
    return fused, out.loss.item(), out.logits.detach().float(), grads


def relative_errors(grads, reference):
    return torch.stack([(grads[k] - reference[k]).norm() / reference[k].norm() for k in reference])


def test_fused_layers_compute_what_peft_computes():
    model = lora_model()
    _, loss, logits, grads = step(model, fuse=False)
    fused, fused_loss, fused_logits, fused_grads = step(model, fuse=True)
    assert fused == 14  # 7 linear layers in each of 2 decoder layers
    assert fused_loss == pytest.approx(loss, abs=1e-6)
    torch.testing.assert_close(fused_logits, logits, atol=1e-5, rtol=1e-5)
    assert relative_errors(fused_grads, grads).max() < 1e-5
    assert set(fused_grads) == set(grads) and all(g.dtype == torch.float32 for g in fused_grads.values())
    assert not any("forward" in vars(m) for m in model.modules())  # peft's forward is back after the block


def test_under_bf16_autocast_fused_layers_are_as_close_to_fp32_as_peft():
    """bf16 rounds differently in the fused GEMM (once, after accumulating) than in peft's three kernels. Both are
    compared with the same model computed in fp32."""
    model, reference = lora_model(torch.bfloat16), lora_model()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # the bf16-rounded base
    _, ref_loss, _, ref_grads = step(reference, fuse=False)
    _, peft_loss, _, peft_grads = step(model, fuse=False, autocast=True)
    fused, fused_loss, _, fused_grads = step(model, fuse=True, autocast=True)
    assert fused == 14
    assert abs(fused_loss - ref_loss) <= 2 * abs(peft_loss - ref_loss) + 1e-4
    peft_error, fused_error = relative_errors(peft_grads, ref_grads), relative_errors(fused_grads, ref_grads)
    assert fused_error.median() <= 1.25 * peft_error.median() and fused_error.max() < 0.05


@pytest.mark.parametrize("lora, fused", [(dict(lora_dropout=0.1), 0), (dict(use_dora=True), 0),
                                         (dict(target_modules=["q_proj", "v_proj"]), 4)])
def test_only_plain_lora_layers_are_fused(lora, fused):
    model = lora_model(**lora)
    with fused_lora(model) as count:
        assert count == fused


def test_merged_or_hooked_layers_keep_peft_forward():
    model = lora_model()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    handle = q_proj.base_layer.register_forward_hook(lambda module, args, out: None)
    with fused_lora(model) as count:
        assert count == 13 and "forward" not in vars(q_proj)
    handle.remove()
    model.merge_adapter()
    with fused_lora(model) as count:
        assert count == 0
