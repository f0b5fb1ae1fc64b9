"""Model FLOPs: per trained token and per GPU (vendor peak), for the MFU and the Trainer's `total_flos`."""

from typing import Optional

import torch

# Dense bf16 peak TFLOP/s by GPU name, for the MFU estimate (vendor numbers, no sparsity). The first key contained in
# the device name wins, so variants come before their family: "H100 PCIe" before "H100", "L40S" before "L40".
PEAK_BF16_TFLOPS = {"H200": 989, "H100 PCIE": 756, "H100 NVL": 835, "H100": 989, "A100": 312, "L40S": 362,
                    "L40": 181, "A6000": 155, "A10": 125, "L4": 121, "V100": 125}


def flops_per_token(model) -> float:
    """Model FLOPs per trained token, PaLM's MFU count for the weights: forward 2N plus activation gradients 2N
    over every matmul weight, plus weight gradients 2N over the trainable ones. So 6N for full fine-tuning and
    4N + 6N_lora on a frozen LoRA base. N counts `nn.Linear` weights (lm_head included, the embedding lookup not;
    ZeRO-3-partitioned weights whole). Attention scores (which PaLM adds), activation-checkpointing recompute and
    padding are not counted, so the same run reads the same with and without checkpointing. The bench and
    SwallowTrainer use it too."""
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

