"""Host time of the Trainer's bookkeeping around each step, on a model with Swallow-7B's module structure.

The `tiny-32l` shape has 7B's 32 layers and all-linear LoRA adapters (739 parameters, 448 trainable) at tiny width,
so these calls cost what they cost on the 7B model: they walk the modules, not the weights. On a GPU they run after
the Trainer's per-micro-step host syncs (the NaN check of the loss, `.item()` of the token count), while the GPU
waits for the next step's kernels.
    python bench/trainer_overhead.py
"""
import sys
import timeit
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from swallow_ft.trainer import SwallowTrainer  # noqa: E402

from recipes import SHAPES  # noqa: E402


def ms(call, number):
    call()
    return timeit.timeit(call, number=number) / number * 1e3


def main():
    config = LlamaConfig(**SHAPES["tiny-32l"].config_sizes())
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, target_modules="all-linear"))
    ids = torch.randint(3, config.vocab_size, (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in trainable]

    def zero_grad():  # then put the gradients back, so every call clears the same 448
        model.zero_grad()
        for p, g in zip(trainable, grads):
            p.grad = g

    args = TrainingArguments(output_dir="/tmp/trainer-overhead", use_cpu=True, report_to="none")
    inputs = {"input_ids": ids}
    rows = [(f"{cls.__name__}.floating_point_ops (every micro-step)",
             ms(lambda t=cls(model=model, args=args): t.floating_point_ops(inputs), 200))
            for cls in (Trainer, SwallowTrainer)]
    clip = torch.nn.utils.clip_grad_norm_
    rows += [("clip_grad_norm_ over model.parameters() (every step)", ms(lambda: clip(model.parameters(), 1.0), 200)),
             ("  the same over the trainable parameters only", ms(lambda: clip(trainable, 1.0), 200)),
             ("model.zero_grad() (every step)", ms(zero_grad, 200)),
             ("forward + backward of 2 x 64 tokens, for scale",
              ms(lambda: model(input_ids=ids, labels=ids).loss.backward(), 20))]
    print(f"{len(list(model.parameters()))} parameters, {len(trainable)} trainable, {torch.get_num_threads()} threads")
    for name, value in rows:
        print(f"{value:9.3f} ms  {name}")


if __name__ == "__main__":
    main()
