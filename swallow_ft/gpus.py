"""What the planner and the preflight assume of each GPU model, in one table (CARDS): the memory torch.cuda reports for
each size the card is sold in, the rates the planner ranks settings by, and whether it has bf16. Its names are the
planner's --gpu choices and what a resource pool's name is matched against, and a size a card is sold by (--gpu-mem
80) is read the same way by both (gpu_gib)."""
import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from swallow_ft.errors import UserError


@dataclass(frozen=True)
class Card:
    # {GB in the card's name: GiB as torch.cuda reports it (total_memory; "total capacity" in OOM messages)}, the
    # size a bare name means first. Less than the name and nvidia-smi say (H100 80GB: 81,559 MiB = 79.6 GiB there,
    # 79.11 in torch), and varying a little by driver (A100 40GB: 39.59, 39.50): the lowest reported, rounded down.
    cuda_gib: Dict[int, float]
    tflops: float  # bf16 TFLOP/s (fp16 without bf16) the planner ranks settings by: 35-45% of flops.PEAK_BF16_TFLOPS
    link_gbps: float  # all-gather GB/s per GPU inside one node: NVLink, or PCIe between PCIe cards
    bf16: bool = True  # Volta and Turing only emulate it (torch.cuda.is_bf16_supported() still says yes on a V100)


# L4: an A10's memory (no torch figure). T4: 65 TFLOP/s fp16 peak, PCIe 3.
CARDS = {"h200": Card({141: 139.7}, 360, 300), "h100": Card({80: 79.1}, 350, 300),
         "a100": Card({80: 79.1, 40: 39.4}, 140, 200), "a6000": Card({48: 47.4}, 70, 25),
         "l40": Card({48: 44.4}, 80, 25), "a10": Card({24: 21.9}, 55, 25), "l4": Card({24: 21.9}, 50, 25),
         "v100": Card({32: 31.7}, 50, 100, bf16=False), "t4": Card({16: 14.5}, 29, 12, bf16=False)}


def gpu_memory_for_pool(resource_pool: str) -> Optional[float]:
    """GiB of the card in a resource pool's name (at its start, after a separator or a count, "8xh100"; not in a word,
    "pool4", nor a longer model, "A100" is no A10), or None. Its size is what the name says in GB anywhere in it
    ("A100-SXM4-40GB", "40gb-a100") or a number right after the card ("a100-80"); without one, the card's first listed
    size (A100: 80 GB). A size the table lacks is scaled as the card's listed size is ("v100-16gb": 15.8)."""
    name = resource_pool.upper()
    for card_name, card in CARDS.items():
        found = re.search(rf"(?:^|[^A-Z]|\dX){card_name.upper()}(?!\d)[-_ ]?(\d*)", name)
        if found:
            stated = re.search(r"(?:^|[^\dA-Z]|\dX)(\d+) ?GB?(?![A-Z])", name)  # not A10G's "10G"
            size = int(stated[1]) if stated else int(found[1] or 0)
            listed, gib = next(iter(card.cuda_gib.items()))
            return card.cuda_gib.get(size) or (math.floor(10 * size * gib / listed) / 10 if size else gib)
    return None


def gpu_gib(gpu_mem: Optional[float], gpu: Optional[str] = None) -> Tuple[float, str]:
    """GiB per GPU to plan or check for, and how gpu_mem was read. The GB a card is sold by is more than torch.cuda
    reports: planned at 40, a micro-batch took 35.9 GiB, over 90% of an A100 40GB's 39.5. So such a size is read as
    that card's capacity (without gpu, the least of the cards sold at it), any other number as GiB; without gpu_mem,
    gpu's."""
    sizes = [CARDS[gpu].cuda_gib if gpu in CARDS else {}] if gpu else [card.cuda_gib for card in CARDS.values()]
    if gpu_mem is None:
        if not (gpu and sizes[0]):
            raise UserError("--gpu-mem: missing: pass GiB per GPU as torch.cuda reports it (79.1 for an H100 or A100 "
                            "80GB), or --gpu NAME to plan for that card's")
        return next(iter(sizes[0].values())), ", what torch.cuda reports for it"
    gib = min((card[gpu_mem] for card in sizes if gpu_mem in card), default=gpu_mem)
    return gib, f", what torch.cuda reports for {gpu_mem:g} GB" if gib != gpu_mem else ""
