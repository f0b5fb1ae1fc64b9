"""Model FLOPs: per trained token, per GPU (vendor peak), and the Trainer's `total_flos` counted the same way."""

from typing import Any, Dict, Optional

import torch
from transformers import Trainer

# Dense bf16 peak TFLOP/s by GPU name, for the MFU estimate (vendor numbers, no sparsity). The first key contained in
# the device name wins, so variants come before their family: "H100 PCIe" before "H100", "L40S" before "L40".
PEAK_BF16_TFLOPS = {"H200": 989, "H100 PCIE": 756, "H100 NVL": 835, "H100": 989, "A100": 312, "L40S": 362,
                    "L40": 181, "A6000": 155, "A10": 125, "L4": 121, "V100": 125}


def flops_per_token(model) -> float:
    """Model FLOPs per trained token, as PaLM's MFU counts them: forward 2N plus activation gradients 2N over every
    matmul weight, plus weight gradients 2N over the trainable ones. So 6N for full fine-tuning and 4N + 6N_lora on a
    frozen LoRA base. N counts `nn.Linear` weights (lm_head included, the embedding lookup not; ZeRO-3-partitioned
    weights whole). Attention scores, activation-checkpointing recompute and padding are not counted, so the same
    run reads the same with and without checkpointing. The bench and FlopCountingTrainer use it too."""
    total = trainable = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n = getattr(module.weight, "ds_numel", module.weight.numel())
            total += n
            trainable += n if module.weight.requires_grad else 0
    return 4 * total + 2 * trainable


def peak_flops(device_name: Optional[str] = None) -> Optional[float]:
    """Dense bf16 FLOP/s of this GPU (or of the named one) from PEAK_BF16_TFLOPS; None on CPU or an unlisted card."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name(0)
    name = device_name.upper()
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


class FlopCountingTrainer(Trainer):
    """transformers.Trainer with one change: FLOPs counted by `flops_per_token`, once per run.

    The Trainer's own count walks every parameter after every micro-step, right after it has synchronised on the
    loss, so the GPU waits for the walk: 6.6-8.5 ms of host time for a 32-layer LoRA model on the CI machine
    (bench/RESULTS.md). It also charges 6 FLOPs to every parameter, 1.5x too many for a frozen LoRA base. Here
    `total_flos` (train metrics, trainer_state.json) is the MFU's count times the token slots trained, padding included.
    """

    _flops_per_token: Optional[float] = None

    def floating_point_ops(self, inputs: Dict[str, Any]) -> float:
        if self._flops_per_token is None:
            self._flops_per_token = flops_per_token(self.model)
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        return 0 if ids is None else self._flops_per_token * ids.numel()

