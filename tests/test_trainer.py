"""SwallowTrainer: transformers' Trainer without its per-micro-step FLOP walk, peft's redundant casts and the host's
per-micro-step reads of the token count."""

import json
import logging
import traceback

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch._dynamo.eval_frame import OptimizedModule
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from swallow_ft import flops
from swallow_ft.data import build_collator
from swallow_ft.flops import flops_per_token
from swallow_ft.trainer import SwallowTrainer

ROWS = [list(range(5, 5 + n)) for n in (7, 19, 4, 30, 12, 9)]  # unequal lengths: padded batches vary in width
MICRO_STEPS = 3


class CountingCollator:
    def __init__(self, inner, drop_attention_mask=False):
        self.inner, self.slots, self.drop_attention_mask = inner, 0, drop_attention_mask

    def __call__(self, rows):
        batch = self.inner(rows)
        self.slots += batch["input_ids"].numel()
        if self.drop_attention_mask:  # then the Trainer counts the tokens that are not the pad id
            del batch["attention_mask"]
        return batch


class ActivationCasts(TorchDispatchMode):
    """Counts dtype casts of tensors at least as large as one batch's hidden states (weights are smaller here)."""

    def __init__(self, min_numel):
        super().__init__()
        self.min_numel, self.count = min_numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].numel() >= self.min_numel \
                and kwargs.get("dtype", args[0].dtype) != args[0].dtype:
            self.count += 1
        return func(*args, **kwargs)


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`.item()`, `bool()`): on a GPU each one waits for the device.
    transformers' attention-mask builder reads whether a batch has padding at all; those are counted apart."""

    def __init__(self):
        super().__init__()
        self.count, self.in_mask_builder, self.counting = 0, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and func is torch.ops.aten._local_scalar_dense.default:
            if any(frame.filename.endswith("transformers/masking_utils.py") for frame in traceback.extract_stack()):
                self.in_mask_builder += 1
            else:
                self.count += 1
        return func(*args, **(kwargs or {}))


class CountWithinSteps(TrainerCallback):
    def __init__(self, reads):
        self.reads = reads

    def on_step_begin(self, args, state, control, **kwargs):
        self.reads.counting = True

    def on_step_end(self, args, state, control, **kwargs):
        self.reads.counting = False


def _train(trainer_class, tiny_model, tmp_path, bf16=False, skip_casts=True, mode=None, fuse=False, compile=False,
           init_lora_weights=True, callbacks=(), drop_attention_mask=False, **training_args):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init_lora_weights))
    collator = CountingCollator(build_collator(tokenizer, packing=False), drop_attention_mask)
    args = TrainingArguments(**{**dict(output_dir=str(tmp_path / trainer_class.__name__), use_cpu=True,
                                       report_to="none", per_device_train_batch_size=2, max_steps=MICRO_STEPS,
                                       save_strategy="no", disable_tqdm=True, logging_steps=1, bf16=bf16,
                                       learning_rate=1e-2, torch_compile=compile), **training_args})
    trainer = trainer_class(model=model, args=args, data_collator=collator, processing_class=tokenizer,
                            callbacks=list(callbacks),
                            train_dataset=Dataset.from_dict({"input_ids": ROWS, "labels": ROWS}))
    trainer.skip_lora_input_casts, trainer.fuse_lora = skip_casts, fuse
    with mode or ActivationCasts(float("inf")):
        trainer.train()
    return trainer, model, collator.slots


def test_trainer_counts_total_flos_as_the_mfu_does_walking_the_model_once(tiny_model, tmp_path, monkeypatch):
    walks = []
    monkeypatch.setattr(flops, "flops_per_token", lambda model: walks.append(model) or flops_per_token(model))
    trainer, model, slots = _train(SwallowTrainer, tiny_model, tmp_path)
    assert len(walks) == 1  # once per run, not after every micro-step
    assert trainer.state.total_flos == flops_per_token(model) * slots
    # transformers' own count charges 6 FLOPs to every parameter, frozen or not: more than the frozen base costs.
    theirs, _, their_slots = _train(Trainer, tiny_model, tmp_path)
    assert their_slots == slots
    assert theirs.state.total_flos > 1.3 * trainer.state.total_flos


def test_bf16_training_skips_peft_input_casts_and_trains_the_same_bits(tiny_model, tmp_path):
    """Under autocast, peft's cast of each adapted layer's input to fp32 is undone by autocast before the matmul.
    Skipping it removes four activation copies per adapted layer per micro-step and changes no bit of training."""
    hidden = AutoModelForCausalLM.from_pretrained(tiny_model).config.hidden_size
    runs = {}
    for skip in (True, False):
        casts = ActivationCasts(min_numel=2 * 4 * hidden)  # the shortest padded batch: 2 rows of at least 4 tokens
        trainer, model, _ = _train(SwallowTrainer, tiny_model, tmp_path / str(skip), bf16=True, skip_casts=skip,
                                   mode=casts)
        assert trainer.accelerator.native_amp  # accelerate wraps the forward in autocast: the case this is for
        adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        runs[skip] = casts.count, adapters, losses, model
    (kept_casts, kept, kept_losses, model), (peft_casts, theirs, their_losses, _) = runs[True], runs[False]
    adapted = sum(isinstance(m, LoraLayer) for m in model.modules())
    assert adapted == 14 and len(kept_losses) == MICRO_STEPS
    # peft: input to fp32 and autocast back to bf16 in forward, the gradient back through both casts in backward,
    # except for the first layer's q, k and v, whose input (the frozen embedding's output) needs no gradient.
    assert peft_casts - kept_casts == (4 * adapted - 2 * 3) * MICRO_STEPS
    assert kept_losses == their_losses
    assert all(torch.equal(kept[name], theirs[name]) for name in kept)
    assert kept["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].dtype == torch.float32
    # The casts come back after training, for generation or evaluation without autocast.
    assert all(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("compile", [False, True])
def test_fused_lora_trains_the_adapters_peft_trains(tiny_model, tmp_path, compile):
    """fuse_lora (swallow_ft/fused_lora.py) in fp32: the same losses and adapters as peft's layers, eager and under
    --torch_compile's regional compilation (the fused function is traced into each compiled layer)."""
    runs = {}
    for fuse in (False, True):
        trainer, model, _ = _train(SwallowTrainer, tiny_model, tmp_path / f"{fuse}", fuse=fuse,
                                   compile=compile and fuse, init_lora_weights=False)
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        runs[fuse] = losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert isinstance(trainer.model_wrapped, OptimizedModule) == (compile and fuse)
        assert not any("forward" in vars(m) for m in model.modules())  # peft's forward is back after training
    (losses, adapters), (fused_losses, fused_adapters) = runs[False], runs[True]
    assert fused_losses == pytest.approx(losses, rel=1e-4) and len(losses) == MICRO_STEPS
    for name, weight in adapters.items():
        torch.testing.assert_close(fused_adapters[name], weight, atol=1e-5, rtol=1e-4)


def test_a_checkpoint_at_the_end_of_its_epochs_trains_nothing_more(tiny_model, tmp_path, caplog):
    """--num_train_epochs 1.5 ends mid-epoch; resumed there, the Trainer would train one step past the schedule."""
    trainer, model, _ = _train(SwallowTrainer, tiny_model, tmp_path, max_steps=-1, num_train_epochs=1.5,
                               save_strategy="steps", save_steps=1, lr_scheduler_type="constant")
    last = trainer.state.global_step
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with caplog.at_level(logging.WARNING, logger="swallow_ft.trainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "SwallowTrainer" / f"checkpoint-{last}"))
    assert trainer.state.global_step == last
    assert f"is at step {last}, which is --num_train_epochs 1.5: nothing left to train" in caplog.text
    assert all(torch.equal(p, adapters[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_lora_layers_are_fused_by_default_on_a_gpu_only(tiny_model, tmp_path):
    """Measured on a GPU (bench/RESULTS.md); on a CPU peft's own layers keep the numbers the other tests pin."""
    trainer, _, _ = _train(SwallowTrainer, tiny_model, tmp_path, max_steps=1)
    assert SwallowTrainer.fuse_lora is None and trainer.args.device.type == "cpu"
    trainer.fuse_lora = None
    assert not trainer.fuses_lora
    trainer.fuse_lora = True
    assert trainer.fuses_lora


@pytest.mark.parametrize("drop_attention_mask", [False, True])
def test_tokens_seen_are_the_trainers_count_in_logs_and_checkpoints(tiny_model, tmp_path, drop_attention_mask):
    """SwallowTrainer sums the token count on the device and reads it at logging and saving steps. The logs, the
    checkpoint's trainer_state.json and the final state hold the Trainer's own numbers."""
    runs = {}
    for trainer_class in (Trainer, SwallowTrainer):
        trainer, _, _ = _train(trainer_class, tiny_model, tmp_path, logging_steps=2, save_strategy="steps",
                               save_steps=2, drop_attention_mask=drop_attention_mask,
                               include_num_input_tokens_seen="non_padding")
        saved = json.loads((tmp_path / trainer_class.__name__ / "checkpoint-2" / "trainer_state.json").read_text())
        runs[trainer_class] = ([log.get("num_input_tokens_seen") for log in trainer.state.log_history],
                               saved["num_input_tokens_seen"], trainer.state.num_input_tokens_seen)
    logged, at_checkpoint, final = runs[SwallowTrainer]
    assert runs[SwallowTrainer] == runs[Trainer]
    real_tokens = sum(len(row) for row in ROWS)
    assert 0 < at_checkpoint < final == real_tokens  # 3 steps of 2 rows: every row once, padding not counted
    assert len(logged) == 2 and logged[0] == at_checkpoint


def test_the_host_reads_nothing_back_inside_a_step(tiny_model, tmp_path):
    """Between logging steps the Trainer reads each micro-step's loss (its nan/inf filter) and token count on the
    host; on a GPU each read waits for the micro-step's backward before the optimizer step can be queued.
    SwallowTrainer with this project's flags reads none. (transformers' mask builder still reads, at the start of
    each forward, whether the batch is padded: that one read per row layout is theirs.)"""
    reads = {}
    for trainer_class, nan_filter in ((Trainer, True), (SwallowTrainer, False)):
        counter = HostReads()
        _train(trainer_class, tiny_model, tmp_path, mode=counter, callbacks=[CountWithinSteps(counter)],
               logging_steps=100, logging_nan_inf_filter=nan_filter, include_num_input_tokens_seen="non_padding")
        reads[trainer_class] = counter.count / MICRO_STEPS, counter.in_mask_builder / MICRO_STEPS
    assert reads[Trainer][0] == 3  # isnan, isinf, the token count
    assert reads[SwallowTrainer][0] == 0
    assert reads[SwallowTrainer][1] == reads[Trainer][1] > 0
