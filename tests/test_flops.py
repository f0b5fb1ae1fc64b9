"""Model FLOPs: the count behind the Web UI's and the bench's MFU, the vendor peaks, and the Trainer's total_flos."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from swallow_ft import flops
from swallow_ft.data import build_collator
from swallow_ft.flops import FlopCountingTrainer, flops_per_token, peak_flops
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


class CountingCollator:
    def __init__(self, inner):
        self.inner, self.slots = inner, 0

    def __call__(self, rows):
        batch = self.inner(rows)
        self.slots += batch["input_ids"].numel()
        return batch


def _train(trainer_class, tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear"))
    rows = [list(range(5, 5 + n)) for n in (7, 19, 4, 30, 12, 9)]  # unequal lengths: padded batches vary in width
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    collator = CountingCollator(build_collator(tokenizer, packing=False))
    args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), use_cpu=True, report_to="none",
                             per_device_train_batch_size=2, max_steps=3, save_strategy="no", disable_tqdm=True)
    trainer = trainer_class(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    return trainer, model, collator.slots


def test_trainer_counts_total_flos_as_the_mfu_does_walking_the_model_once(tiny_model, tmp_path, monkeypatch):
    walks = []
    monkeypatch.setattr(flops, "flops_per_token", lambda model: walks.append(model) or flops_per_token(model))
    trainer, model, slots = _train(FlopCountingTrainer, tiny_model, tmp_path)
    assert len(walks) == 1  # once per run, not after every micro-step
    assert trainer.state.total_flos == flops_per_token(model) * slots
    # transformers' own count charges 6 FLOPs to every parameter, frozen or not: more than the frozen base costs.
    theirs, _, their_slots = _train(Trainer, tiny_model, tmp_path)
    assert their_slots == slots
    assert theirs.state.total_flos > 1.3 * trainer.state.total_flos
