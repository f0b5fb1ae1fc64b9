"""The project's Trainer: transformers' own loop, without per-step costs that train nothing."""

import logging
import os
from typing import Any, Dict, Optional

import torch
from peft.helpers import disable_input_dtype_casting
from transformers import Trainer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput

from swallow_ft import flops
from swallow_ft.fused_lora import fused_lora

logger = logging.getLogger("swallow_ft.trainer")


class SwallowTrainer(Trainer):
    """transformers.Trainer with three changes that change no number it trains (tests/test_trainer.py), and one fix:
    resumed from a checkpoint that already holds all --max_steps, it trains nothing (the Trainer trains one step more).

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

    `fuse_lora = True` also runs plain LoRA layers as three matmuls with the scale and add inside the GEMM
    (swallow_ft/fused_lora.py; the bench's `+fusedlora`). Off until `bench/gpu.sh` has measured it on a GPU. Not under
    DeepSpeed, whose ZeRO-3 hooks gather the base weights.
    """

    skip_lora_input_casts = True
    fuse_lora = False
    defer_token_count = True  # False: the Trainer's own count, read every micro-step (the bench's `+hostreads`)
    _flops_per_token: Optional[float] = None
    _tokens_pending: Optional[torch.Tensor] = None  # this rank's tokens since the last read, on its device

    def train(self, resume_from_checkpoint: Optional[str] = None, **kwargs):
        finished = self._finished_state(resume_from_checkpoint)
        if finished is not None:
            self.state = finished
            logger.warning("%s is at step %d, which is --max_steps: nothing left to train", resume_from_checkpoint,
                           finished.global_step)
            return TrainOutput(finished.global_step, 0.0, {})
        # native_amp is accelerate's own switch for wrapping the forward in autocast (False under DeepSpeed, which
        # casts the whole model, adapters included, to one dtype).
        skip = self.skip_lora_input_casts and self.accelerator.native_amp
        fuse = self.fuse_lora and not self.is_deepspeed_enabled
        with disable_input_dtype_casting(self.model, active=skip), fused_lora(self.model, active=fuse):
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _finished_state(self, checkpoint: Optional[str]) -> Optional[TrainerState]:
        """The checkpoint's state if it already holds all --max_steps. The Trainer would train one more step: it
        resumes mid-epoch when --max_steps is not a whole number of epochs and checks the limit only after a step."""
        if not isinstance(checkpoint, str) or self.args.max_steps <= 0:
            return None
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        return state if state.global_step >= self.args.max_steps else None

    def _track_num_input_tokens(self, inputs: Dict[str, Any]) -> None:
        mode, ids = self.args.include_num_input_tokens_seen, inputs.get(self.model.main_input_name)
        if not self.defer_token_count or mode == "no" or ids is None:
            return super()._track_num_input_tokens(inputs)
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        if mode != "non_padding":
            count = torch.tensor(ids.numel(), device=ids.device)
        elif "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif pad_id is not None:
            count = (ids != pad_id).sum()
        else:  # as the Trainer does, all tokens
            count = torch.tensor(ids.numel(), device=ids.device)
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
