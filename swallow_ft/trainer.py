"""The project's Trainer: transformers' own loop, without per-step costs that train nothing."""

import logging
import os
from typing import Any, Dict, Optional

import torch
from peft.helpers import disable_input_dtype_casting
from transformers import Trainer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from swallow_ft import flops
from swallow_ft.fused_lora import fused_lora

logger = logging.getLogger(__name__)


class SwallowTrainer(Trainer):
    """transformers.Trainer with four changes that change no number it trains (tests/test_trainer.py), and one fix:
    resumed from a checkpoint that already holds all its steps, it trains nothing (the Trainer trains one step more).

    - FLOPs are counted by `flops.flops_per_token`, once per run. The Trainer's own count walks every parameter
      after every micro-step, right after it has synchronised on the loss, so the GPU waits for the walk: 6.6-8.5 ms
      of host time for a 32-layer LoRA model on the CI machine (bench/RESULTS.md). It also charges 6 FLOPs to every
      parameter, 1.5x too many for a frozen LoRA base. Here `total_flos` (train metrics, trainer_state.json) is the
      MFU's count times the token slots trained, padding included.
    - Under autocast (bf16 or fp16 without DeepSpeed) peft's LoRA layers keep their input's dtype. peft keeps the
      adapters in fp32 for the optimizer and casts each adapted layer's input to fp32 to match; autocast then casts it
      straight back to bf16 for the matmul, and backward does the same to the gradient. That is four copies of an
      activation per adapted layer per micro-step, bit-for-bit round trips: 223 GB of memory traffic per step
      for Swallow-7B at 4 x 2048 (bench/traffic.py). Each adapted layer also kept its own copy of its input for
      backward: 8 GiB at that size beyond what the memory model counts (tests/test_memory.py).
      `skip_lora_input_casts = False` restores them (the bench's `+peftcasts`).
    - The tokens seen (`state.num_input_tokens_seen`, tokens/s in the Web UI) are summed on the device and read when
      they are logged or saved. The Trainer reads each micro-step's count with `.item()` (after an all-gather when
      there are several ranks), so the host waits for the GPU to finish that micro-step before it can queue the next
      work: the optimizer step, the next batch, the next forward. The count is the Trainer's own, to the token.

    On a GPU plain LoRA layers also run as three matmuls with the scale and add inside the GEMM
    (swallow_ft/fused_lora.py): +7% tokens/s on full rows and +20% on length-skewed data for Swallow-7B at 4 x 2048
    (bench/RESULTS.md, H200). `fuse_lora = None` means on a GPU only: on a CPU nothing was measured, and peft's own
    layers keep the numbers the tests pin. True or False forces it (the bench's `+fusedlora` / `+nofusedlora`).
    Not under DeepSpeed, whose ZeRO-3 hooks gather the base weights.
    """

    skip_lora_input_casts = True
    fuse_lora: Optional[bool] = None
    defer_token_count = True  # False: the Trainer's own count, read every micro-step (the bench's `+hostreads`)
    _flops_per_token: Optional[float] = None
    _tokens_pending: Optional[torch.Tensor] = None  # this rank's tokens since the last read, on its device

    def train(self, resume_from_checkpoint: Optional[str] = None, **kwargs):
        # A finished checkpoint returns at once: no callbacks run, and the model keeps the weights it was built with
        # (run_clm.py uses neither after train(); a caller that does should load the checkpoint itself).
        finished = self._finished_state(resume_from_checkpoint)
        if finished is not None:
            self.state = finished
            limit = "--max_steps" if self.args.max_steps > 0 else f"--num_train_epochs {self.args.num_train_epochs:g}"
            logger.warning("%s is at step %d, which is %s: nothing left to train", resume_from_checkpoint,
                           finished.global_step, limit)
            return TrainOutput(finished.global_step, 0.0, {})
        # native_amp is accelerate's own switch for wrapping the forward in autocast (False under DeepSpeed, which
        # casts the whole model, adapters included, to one dtype).
        skip = self.skip_lora_input_casts and self.accelerator.native_amp
        with disable_input_dtype_casting(self.model, active=skip), fused_lora(self.model, active=self.fuses_lora):
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    @property
    def fuses_lora(self) -> bool:
        fuse = self.args.device.type == "cuda" if self.fuse_lora is None else self.fuse_lora
        return fuse and not self.is_deepspeed_enabled

    def _finished_state(self, checkpoint: Optional[str]) -> Optional[TrainerState]:
        """The checkpoint's state if it already holds all the run's steps (--max_steps, or what --num_train_epochs
        comes to). The Trainer would train one more step: it resumes mid-epoch when they are not a whole number of
        epochs and checks the limit only after a step."""
        if checkpoint is True:  # the Trainer's own spelling of "the latest in output_dir"
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if not isinstance(checkpoint, str):
            return None
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        limit = self.args.max_steps
        if limit <= 0:  # the steps --num_train_epochs comes to, counted as the Trainer counts them
            limit = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        return state if state.global_step >= limit else None

    def _track_num_input_tokens(self, inputs: Dict[str, Any]) -> None:
        mode, ids = self.args.include_num_input_tokens_seen, inputs.get(self.model.main_input_name)
        if not self.defer_token_count or mode == "no" or ids is None:
            return super()._track_num_input_tokens(inputs)
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        # new_full fills on the device; torch.tensor(n, device=...) would copy from the host and wait for the GPU.
        if mode != "non_padding":
            count = ids.new_full((), ids.numel())
        elif "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif pad_id is not None:
            count = (ids != pad_id).sum()
        else:  # as the Trainer does, all tokens
            count = ids.new_full((), ids.numel())
        count = count.to(torch.int64)
        self._tokens_pending = count if self._tokens_pending is None else self._tokens_pending + count

    def tokens_seen(self) -> int:
        """`state.num_input_tokens_seen`, brought up to date: one host sync, and an all-gather with several ranks
        (so every rank must call it at the same step, as the Trainer's log and save do)."""
        if self._tokens_pending is not None:
            pending, self._tokens_pending = self._tokens_pending, None
            self.state.num_input_tokens_seen += int(self.accelerator.gather(pending.reshape(1)).sum())
        return self.state.num_input_tokens_seen

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        self.tokens_seen()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        self.tokens_seen()  # trainer_state.json holds the count a resumed run continues from
        super()._save_checkpoint(model, trial)

    def floating_point_ops(self, inputs: Dict[str, Any]) -> float:
        if self._flops_per_token is None:
            self._flops_per_token = flops.flops_per_token(self.model)
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        return 0 if ids is None else self._flops_per_token * ids.numel()
