"""Model FLOPs: the count behind the Web UI's and the bench's MFU, and the vendor peaks."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from swallow_ft.flops import flops_per_token, peak_flops
from swallow_ft.memory import KNOWN_SHAPES


def test_flops_per_token_counts_matmul_weights_once_per_pass(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    embedding = model.get_input_embeddings().weight
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    n = sum(p.numel() for p in model.parameters()) - embedding.numel() - norms  # every linear, lm_head included
    assert flops_per_token(model) == 6 * n  # full fine-tuning: forward, activation and weight gradients
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    n_lora = lora.get_nb_trainable_parameters()[0]
    assert flops_per_token(lora) == 4 * n + 6 * n_lora  # a frozen base gets no weight gradients


def test_flops_per_token_of_swallow_7b_lora_is_the_closed_form():
    """The Web UI's MFU and the bench's count the same FLOPs: 4N for the frozen 7B base + 6N for the adapters."""
    shape = KNOWN_SHAPES["swallow-7b"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                             intermediate_size=11008, vocab_size=43176))
        lora = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    norms = shape.hidden_size * (2 * shape.num_layers + 1)
    base = shape.total_params - shape.vocab_size * shape.hidden_size - norms
    assert flops_per_token(lora) == 4 * base + 6 * shape.lora_params(16)
    assert 4 * base == pytest.approx(4 * 6.6e9, rel=0.02)


@pytest.mark.parametrize("device_name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                                 ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
                                                 ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L40S", 362),
                                                 ("NVIDIA L40", 181), ("NVIDIA GH200 480GB", 989),
                                                 ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_tells_variants_of_a_card_apart(device_name, tflops):
    assert peak_flops(device_name) == (tflops * 1e12 if tflops else None)

