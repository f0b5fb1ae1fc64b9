"""What bench/throughput.py measures: named recipes, +modifiers, and how "auto" settings resolve per shape and device.

A recipe name is a RECIPES entry followed by any +modifiers, applied in order: default+flex+mb4.
"""
import math
import os
import re
import sys
from importlib.util import find_spec

import torch

from swallow_ft import memory, plan

# tiny-32l: Swallow-7B's 32 layers at tiny width. Its compute is negligible, so on CPU its step time is the host's
# own work per step (Python, dispatch) for the 7B LoRA structure.
SHAPES = {"tiny": memory.ModelShape(64, 2, 4, 2, 176, 1200), "tiny-32l": memory.ModelShape(64, 32, 4, 2, 176, 1200),
          **memory.KNOWN_SHAPES}
SMALL = ("tiny", "tiny-32l")  # run on CPU, in fp32, without a disk check
CUDA = torch.cuda.is_available()
SEED_DS_CONFIG = "bench/ds_config_seed.json"
# name -> settings; "auto" is decided per shape and device in resolve(). Add a recipe by adding an entry, or
# combine one with MODIFIERS on the command line: --recipes default,default+flex+liger,padded.
RECIPES = {
    # The reference's experiment: ZeRO-3 fp16, micro-batch 1 x 1024, LoRA r8 on q/v, no packing. Its DeepSpeed config
    # (bench/ds_config_seed.json) is the reference's: explicit ZeRO-3 buckets, DeepSpeed's AdamW and WarmupLR.
    "seed": dict(precision="fp16", deepspeed=SEED_DS_CONFIG, micro_batch=1, seq=1024,
                 lora_r=8, lora_targets="q_proj,v_proj", lora_dropout=0.05, packing=False, checkpointing=False,
                 attn="sdpa", liger=False, compile=False, peft_casts=False, fused_lora=False, host_reads=False, env={}),
    # This project's defaults: bf16, packing, LoRA r16 on all linears without dropout, --attn_implementation auto;
    # ZeRO stage, micro-batch, activation checkpointing and Liger are the planner's choice for one GPU of this size.
    "default": dict(precision="bf16", deepspeed="auto", micro_batch="auto", seq=2048, cpu_seq=256, lora_r=16,
                    lora_targets="all-linear", lora_dropout=0.0, packing=True, checkpointing="auto", attn="auto",
                    liger="auto", compile=False, peft_casts=False, fused_lora="auto", host_reads=False, env={}),
}
RECIPES["padded"] = {**RECIPES["default"], "packing": False}
MODIFIERS = {
    "flex": dict(attn="flex_attention"),  # block-sparse kernels that skip the masked-out blocks of packed rows
    "sdpa": dict(attn="sdpa"),
    "liger": dict(liger=True),  # Liger Kernel: fused linear cross-entropy, RMSNorm, SwiGLU, RoPE (Triton, GPU only)
    "noliger": dict(liger=False),
    "nodrop": dict(lora_dropout=0.0),  # peft skips the dropout copy of each adapted layer's input
    "dropout": dict(lora_dropout=0.05),  # this project's default before bench/RESULTS.md
    "qv": dict(lora_targets="q_proj,v_proj"),  # the reference's LoRA targets: 64 adapted layers instead of 224
    "padded": dict(packing=False),
    "ckpt": dict(checkpointing=True),
    "nockpt": dict(checkpointing=False),  # when the memory model is too cautious (it does not know Liger's savings)
    # --torch_compile: each decoder layer compiled once and reused (regional): fewer, fused kernels and less Python
    # per step, after a compile in the warm-up steps. compilefull: the whole model as one graph instead.
    "compile": dict(compile=True),
    "compilefull": dict(compile=True, env={"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "false"}),
    # PYTORCH_CUDA_ALLOC_CONF: less allocator churn on new shapes
    "expseg": dict(env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    # peft's casts of each adapted layer's input to the adapters' fp32 and back, which SwallowTrainer skips
    "peftcasts": dict(peft_casts=True),
    # each plain LoRA layer as three matmuls, its scale and add inside the GEMM (swallow_ft/fused_lora.py): on a GPU
    # by default (SwallowTrainer.fuse_lora); fusedlora forces it on CPU too, nofusedlora runs peft's own layers
    "fusedlora": dict(fused_lora=True),
    "nofusedlora": dict(fused_lora=False),
    # the Trainer's reads of each micro-step's loss (nan/inf filter) and token count, which the host waits for
    "hostreads": dict(host_reads=True),
}
SIZED_MODIFIER = re.compile(r"(mb|seq|r)(\d+)$")  # mb4: micro-batch 4, seq4096: tokens per row, r8: LoRA rank
# fp16-only configs and their bf16 twins for CPU; bench/ds_config_seed.json has an "auto" bf16 section and needs none
CPU_DS_CONFIG = {"ds_configs/ds_config_stage_3_fp16.json": "ds_configs/ds_config_stage_3.json"}


def recipe(name):
    """Settings of a recipe name: a RECIPES entry, then any +modifiers in order."""
    base, *mods = name.split("+")
    if base not in RECIPES:
        raise ValueError(f"unknown recipe {base!r}; known: {', '.join(RECIPES)}")
    r = dict(RECIPES[base])
    for mod in mods:
        sized = SIZED_MODIFIER.match(mod)
        if sized:
            r[{"mb": "micro_batch", "seq": "seq", "r": "lora_r"}[sized[1]]] = int(sized[2])
            r.pop("cpu_seq", None) if sized[1] == "seq" else None
        elif mod in MODIFIERS:
            r.update({**MODIFIERS[mod], "env": {**r["env"], **MODIFIERS[mod].get("env", {})}})
        else:
            raise ValueError(f"unknown modifier {mod!r} in {name!r}; known: {', '.join(MODIFIERS)}, mbN, seqN, rN")
    return r


def planning_gib():
    """The GPU memory recipes are planned for: this GPU's, or $PLAN_GPU_GIB. RESULTS.md's H200 runs set 79.6, an 80 GB
    card's 81,559 MiB as nvidia-smi counts it; torch.cuda reports 79.1 for an H100 80GB, and the 7B recipes plan the
    same at either (micro-batch 4, no checkpointing, no DeepSpeed)."""
    if os.environ.get("PLAN_GPU_GIB"):
        return float(os.environ["PLAN_GPU_GIB"])
    return torch.cuda.get_device_properties(0).total_memory / memory.GiB if CUDA else math.inf


def fused_adam_available():
    """Whether DeepSpeed's FusedAdam (what its AdamW is on a GPU) is prebuilt or can be JIT-built (nvcc and ninja)."""
    try:
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    except Exception:  # noqa: BLE001  (no DeepSpeed: the recipe fails later with its own message)
        return True
    if installed_ops.get("fused_adam"):
        return True
    return bool(CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) and is_ninja_available())


def resolve(name, shape_name, quiet=False):
    """Fill a recipe's "auto" settings for this shape and device."""
    r = dict(recipe(name), note="")
    if not CUDA and r["precision"] == "fp16":
        r["note"] = f"fp16 is refused on CPU: bf16 and {CPU_DS_CONFIG.get(r['deepspeed'], r['deepspeed'])} instead"
        if not quiet:
            print(f"[bench] {name}: {r['note']}", file=sys.stderr, flush=True)
        r["precision"], r["deepspeed"] = "bf16", CPU_DS_CONFIG.get(r["deepspeed"], r["deepspeed"])
    if CUDA and r["deepspeed"] == SEED_DS_CONFIG and not fused_adam_available():
        # The optimizer steps 4M LoRA parameters: torch's AdamW instead changes nothing measurable in a 7B step.
        r["note"] = "no nvcc/ninja to build DeepSpeed's FusedAdam: its AdamW with torch_adam instead"
        r["deepspeed"] = SEED_DS_CONFIG.replace(".json", "_torchadam.json")
        if not quiet:
            print(f"[bench] {name}: {r['note']}", file=sys.stderr, flush=True)
    if not CUDA and "cpu_seq" in r:
        r["seq"] = r["cpu_seq"]
    if not CUDA and r["micro_batch"] == "auto":
        r["micro_batch"] = 4
    if not CUDA and r["liger"] is True:
        raise ValueError("liger needs a GPU (Triton kernels)")
    if r["micro_batch"] == "auto":  # the planner's choice for one GPU of this size
        chosen = plan.plan(SHAPES[shape_name], gpus=1, gpu_mem=planning_gib(), seq=r["seq"], lora=bool(r["lora_r"]),
                           global_batch=64, lora_r=r["lora_r"] or 16).setting
        r["micro_batch"] = chosen.micro_batch
        r["checkpointing"] = chosen.checkpointing if r["checkpointing"] == "auto" else r["checkpointing"]
        if r["deepspeed"] == "auto":
            r["deepspeed"] = plan.ds_config_for(chosen)
    gpu_gib = planning_gib()

    def fits(ckpt):  # one GPU, no ZeRO, by the preflight's memory model
        return memory.fits(memory.estimate(SHAPES[shape_name], gpus=1, zero_stage=0, micro_batch=r["micro_batch"],
                                           seq_len=r["seq"], lora_r=r["lora_r"], lora_targets=r["lora_targets"],
                                           lora_dropout=r["lora_dropout"],
                                           gradient_checkpointing=ckpt), gpu_gib)
    if r["checkpointing"] == "auto":
        r["checkpointing"] = not fits(False)
    if r["deepspeed"] == "auto":
        r["deepspeed"] = None if fits(r["checkpointing"]) else "ds_configs/ds_config_stage_3.json"
    if r["fused_lora"] == "auto":  # as SwallowTrainer: on a GPU
        r["fused_lora"] = CUDA
    if r["liger"] == "auto":  # as the planner: on a GPU, not under ZeRO-3, when liger-kernel is installed
        r["liger"] = bool(CUDA and "stage_3" not in (r["deepspeed"] or "") and find_spec("liger_kernel"))
    return r
