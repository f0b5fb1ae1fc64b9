"""Choose DeepSpeed and batch settings for a model, GPU count and GPU size (DSAT's job; DSAT left Determined 0.38).

    python -m swallow_ft.plan --model tokyotech-llm/Swallow-70b-instruct-v0.1 --gpus 4 --gpu-mem 80 --seq 2048 --lora
    python -m swallow_ft.plan --model ... --gpus 4 --gpu-mem 80 --write swallow_70b_ds3.yaml

Every setting that fits (swallow_ft.memory) is timed with a simple model, and the fastest wins:
- compute per micro-step: FLOPs per token (6N full fine-tuning; 4N with a frozen LoRA base, whose weight gradients are
  never formed; +2N when activations are recomputed) x tokens / the GPU's sustained bf16 rate;
- ZeRO-3 moves every (frozen) weight to every GPU twice per micro-step, forward and backward: about
  2 x weight bytes x (N-1)/N per GPU. DeepSpeed prefetches it during compute, so a micro-step costs
  max(compute, all-gather) plus ZeRO-3's fixed bookkeeping (measured on an H100); the planner grows the
  micro-batch until compute hides the gathers and amortises the rest;
- gradients are all-reduced once per optimizer step (tiny for LoRA); each micro-step also pays a fixed launch
  overhead, so of two equally fast settings the larger micro-batch wins;
- CPU offload is a last resort, considered only when nothing fits without it: offloaded weight shards cross PCIe
  before every forward and backward, optimizer states twice per step, and they hold pinned host memory.
- the global batch (--global-batch) is kept exactly when a fitting setting gives it within EXACT_BATCH_SLACK of the
  fastest (micro-batches are powers of two and the divisors of the batch per GPU); otherwise the plan says what it
  planned instead, and why.
The rates are assumptions (swallow_ft/gpus.py, overridable with --tflops/--interconnect-gbps), so treat the time as a
ranking, and measure with bench/throughput.py.
"""

import argparse
import difflib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from swallow_ft import memory
from swallow_ft.errors import UserError, exit_code_of
from swallow_ft.gpus import CARDS, gpu_gib
from swallow_ft.plan_yaml import rewritten

# Host to GPU GB/s for offload traffic.
PCIE_GBPS = 20
# Kernel launches, the Python loop and the loss per micro-step: why fewer, larger micro-batches win a tie.
MICRO_STEP_OVERHEAD_S = 0.02
# ZeRO-3's own cost per micro-step even with nothing to gather (per-module hooks, partition bookkeeping):
# on one H100, Swallow-7B LoRA at 1 x 2048 ran at 3,624 tokens/s with ZeRO-3 and 11,824 without DeepSpeed
# (research/gpu-baseline-h100.md), about 0.39 s per micro-step for 6.8B parameters.
ZERO3_OVERHEAD_S_PER_BILLION = 0.057
# An exact global batch keeps the learning-rate schedule and the runs comparable to what was asked; the time model is
# not better than this, so a setting this much slower that keeps it beats a faster one that changes it.
EXACT_BATCH_SLACK = 0.10
DS_CONFIGS = {2: "ds_configs/ds_config_stage_2.json", 3: "ds_configs/ds_config_stage_3.json"}
OFFLOAD_CONFIG = "ds_configs/ds_config_stage_3_offload.json"
# DeepSpeed's estimate_zero3_model_states_mem_needs multiplies the host memory of offload by this (its default
# additional_buffer_factor) for the buffers that the model states alone do not count.
HOST_BUFFER_FACTOR = 1.5


@dataclass(frozen=True)
class Setting:
    zero_stage: int
    micro_batch: int
    checkpointing: bool
    offload: bool = False
    bf16: bool = True  # False on GPUs without bf16 (V100): fp16 with loss scaling, the _fp16 DeepSpeed configs


@dataclass
class Plan:
    setting: Setting
    accumulation: int
    global_batch: int  # as planned: micro-batch x GPUs x accumulation
    asked_batch: int
    estimate: memory.MemoryEstimate
    compute_s: float
    gather_s: float
    pcie_s: float
    step_s: float
    tokens_per_second_per_gpu: float
    reasons: List[str]


def _step_time(shape, setting: Setting, gpus: int, seq: int, lora_r: Optional[int], accumulation: int,
               tflops: float, link_gbps: float):
    params = shape.total_params
    flops_per_token = (4 if lora_r else 6) * params + (2 * params if setting.checkpointing else 0)
    compute = flops_per_token * setting.micro_batch * seq / (tflops * 1e12)
    gather = 2 * 2 * params * (gpus - 1) / gpus / (link_gbps * 1e9) if setting.zero_stage == 3 else 0.0
    trainable = shape.lora_params(lora_r, "all-linear") if lora_r else params
    reduce = 2 * 2 * trainable * (gpus - 1) / gpus / (link_gbps * 1e9) if gpus > 1 else 0.0
    # Offloaded weight shards come up from the host before every forward and backward, ahead of their all-gather.
    pcie = 2 * 2 * params / gpus / (PCIE_GBPS * 1e9) if setting.offload else 0.0
    optimizer_pcie = 2 * memory.ADAM_STATE_BYTES * trainable / gpus / (PCIE_GBPS * 1e9) if setting.offload else 0.0
    zero3 = ZERO3_OVERHEAD_S_PER_BILLION * params / 1e9 if setting.zero_stage == 3 else 0.0
    step = accumulation * (max(compute, gather + pcie) + zero3 + MICRO_STEP_OVERHEAD_S) + reduce + optimizer_pcie
    return compute, gather, pcie, step


def plan(shape: memory.ModelShape, gpus: int, gpu_mem: float, seq: int, lora: bool, global_batch: int,
         lora_r: int = 16, tflops: Optional[float] = None, link_gbps: Optional[float] = None, gpu: str = "h100"
         ) -> Plan:
    card = CARDS.get(gpu.lower())
    if card is None:  # another GPU's rates would rank the settings wrongly, and silently
        raise UserError(f"--gpu {gpu}: unknown GPU: use one of {', '.join(CARDS)}")
    tflops, link_gbps = tflops or card.tflops, link_gbps or card.link_gbps
    too_long = memory.context_problem(shape, seq)
    if too_long:
        raise UserError(f"--seq {seq}: {too_long}: use --seq {shape.max_positions} or less")
    per_gpu = max(1, global_batch // gpus)
    # Powers of two, and the divisors of the batch per GPU: those give the global batch with no rounding.
    micro_batches = sorted({1 << k for k in range(per_gpu.bit_length())}
                           | ({m for m in range(1, per_gpu + 1) if per_gpu % m == 0} if global_batch % gpus == 0
                              else set()))
    fitting = []
    for zero_stage in ((0,) if gpus == 1 else (0, 2)) + (3,):
        for offload in (False, True) if zero_stage == 3 else (False,):
            for checkpointing in (False, True):
                for micro in micro_batches:
                    setting = Setting(zero_stage, micro, checkpointing, offload, card.bf16)
                    est = memory.estimate(shape, gpus=gpus, zero_stage=zero_stage, micro_batch=micro, seq_len=seq,
                                          lora_r=lora_r if lora else None, gradient_checkpointing=checkpointing,
                                          offload_optimizer=offload, offload_params=offload,
                                          fused_loss=_liger(setting))
                    if memory.fits(est, gpu_mem):
                        fitting.append((setting, est))
    # Offload only if needed: the time model cannot see its real costs (pinned host memory, the CPU's own work, PCIe
    # shared by 4-8 GPUs), and a micro-batch it enlarges rarely pays them back.
    plans = []
    for setting, est in [f for f in fitting if not f[0].offload] or fitting:
        accumulation = max(1, math.ceil(global_batch / (setting.micro_batch * gpus)))
        compute, gather, pcie, step = _step_time(shape, setting, gpus, seq, lora_r if lora else None, accumulation,
                                                 tflops, link_gbps)
        speed = setting.micro_batch * seq * accumulation / step
        plans.append(Plan(setting, accumulation, setting.micro_batch * gpus * accumulation, global_batch, est,
                          compute, gather, pcie, step, speed, []))
    if not plans:
        raise UserError(f"nothing fits {gpus} x {gpu_mem:g} GiB for {shape.total_params / 1e9:.1f}B parameters at "
                        f"{seq} tokens, even micro-batch 1 with ZeRO-3, offload and recomputation: add GPUs")

    def rank(p: Plan):  # the fastest wins; recomputation must earn its complexity by a percent
        return p.tokens_per_second_per_gpu * (0.99 if p.setting.checkpointing else 1.0), -p.setting.zero_stage

    fastest = max(plans, key=rank)
    exact = max((p for p in plans if p.global_batch == global_batch), key=rank, default=None)
    chosen = exact if exact is not None and rank(exact)[0] >= (1 - EXACT_BATCH_SLACK) * rank(fastest)[0] else fastest
    chosen.reasons = _reasons(shape, chosen, gpus, gpu_mem, lora_r if lora else None, exact)
    return chosen


def _liger(setting: Setting) -> bool:
    """Liger Kernel goes on where it was measured to help and can run: bf16, not under ZeRO-3, whose sharded lm_head
    weight its fused loss cannot read."""
    return setting.zero_stage < 3 and setting.bf16


def _batch_reason(chosen: Plan, gpus: int, exact: Optional[Plan]) -> str:
    s, asked = chosen.setting, chosen.asked_batch
    how = f"micro-batch {s.micro_batch} x {gpus} GPU(s) x accumulation {chosen.accumulation}"
    if chosen.global_batch == asked:
        return f"gradient accumulation {chosen.accumulation} for a global batch of {asked} sequences ({how})"
    if exact is None:  # every GPU takes the same whole number of sequences per micro-step
        why = f"{asked} is not a multiple of the {gpus} GPUs; ask for a multiple of {gpus} to get it exactly"
    else:
        slower = 1 - exact.tokens_per_second_per_gpu / chosen.tokens_per_second_per_gpu
        why = (f"the fastest setting that gives {asked} (micro-batch {exact.setting.micro_batch}, accumulation "
               f"{exact.accumulation}) is {100 * slower:.0f}% slower by the time model; set those flags to keep "
               f"{asked}")
    return f"global batch {chosen.global_batch}, not the {asked} asked ({how}): {why}"


def offloaded_bytes(shape, setting: Setting, gpus: int, lora_r: Optional[int]) -> tuple:
    """(16-bit weights, optimizer state with its fp32 gradients): the bytes that offload keeps in host memory, for
    all GPUs together. By the memory model the plan fits with: what offloading takes off the GPUs."""
    on_gpu, offloaded = (memory.estimate(shape, gpus=gpus, zero_stage=setting.zero_stage, micro_batch=1, seq_len=1,
                                         lora_r=lora_r, gradient_checkpointing=False, offload_optimizer=off,
                                         offload_params=off) for off in (False, True))
    return (gpus * (on_gpu.weights - offloaded.weights),
            gpus * (on_gpu.gradients + on_gpu.optimizer - offloaded.gradients - offloaded.optimizer))


def _reasons(shape, chosen: Plan, gpus: int, gpu_mem: float, lora_r: Optional[int], exact: Optional[Plan]
             ) -> List[str]:
    s = chosen.setting
    weights_gib = 2 * shape.total_params / memory.GiB
    reasons = []
    if s.zero_stage == 3 and gpus == 1:  # nothing to shard on one GPU: ZeRO-3 is what offloads parameters
        reasons.append(f"ZeRO-3 on one GPU: the 16-bit weights ({weights_gib:.0f} GiB) do not fit beside the rest on "
                       f"the {gpu_mem:g} GiB GPU, and ZeRO-3 lets offload move parameters to the CPU")
    elif s.zero_stage == 3:
        reasons.append(f"ZeRO-3: the 16-bit weights ({weights_gib:.0f} GiB) do not fit beside the rest on one "
                       f"{gpu_mem:g} GiB GPU, so they are sharded {gpus} ways")
        reasons.append(f"micro-batch {s.micro_batch}: compute {chosen.compute_s * 1e3:.0f} ms per micro-step vs "
                       f"{chosen.gather_s * 1e3:.0f} ms to all-gather the weights twice "
                       f"({2 * weights_gib * (gpus - 1) / gpus:.0f} GiB per GPU); "
                       + ("compute hides it" if chosen.compute_s >= chosen.gather_s else "the gathers still dominate"))
    else:
        reasons.append(f"no ZeRO-3: the 16-bit weights ({weights_gib:.0f} GiB) fit each GPU, and sharding frozen "
                       "weights would only add an all-gather to every forward and backward")
    if s.zero_stage == 2:
        reasons.append("ZeRO-2: sharding optimizer state and gradients is what makes full fine-tuning fit")
    if s.checkpointing:
        reasons.append("activation checkpointing: without it the activations of this micro-batch do not fit")
    if s.offload:
        sharded = gpus > 1  # one GPU has no shards to gather
        moved, gathers = ("weight shards", f", then {chosen.gather_s * 1e3:.0f} ms of all-gather") if sharded \
            else ("weights", "")
        verdict = ("compute hides them" if chosen.gather_s + chosen.pcie_s <= chosen.compute_s
                   else "PCIe and the gathers dominate" if sharded else "PCIe dominates")
        reasons.append(f"CPU offload: nothing fits the GPU{'s' * sharded} without it. The {moved} cross PCIe before "
                       f"every forward and backward ({chosen.pcie_s * 1e3:.0f} ms per micro-step{gathers}, vs "
                       f"{chosen.compute_s * 1e3:.0f} ms of compute: {verdict})")
        weights, optimizer = (b / memory.GiB for b in offloaded_bytes(shape, s, gpus, lora_r))
        per_gpu = f", {(weights + optimizer) / gpus:.0f} GiB per GPU" if gpus > 1 else ""
        reasons.append(f"host RAM: offload keeps {weights + optimizer:.0f} GiB in pinned CPU memory{per_gpu} (16-bit "
                       f"weights {weights:.0f} GiB, optimizer state and fp32 gradients {optimizer:.1f} GiB); "
                       f"DeepSpeed's estimate_zero3_model_states_mem_needs multiplies that by {HOST_BUFFER_FACTOR:g} "
                       f"for buffers: give the host {HOST_BUFFER_FACTOR * (weights + optimizer):.0f} GiB free")
    reasons.append(_batch_reason(chosen, gpus, exact))
    reasons.append("packing on: padding-free rows of --block_size, no cross-example attention")
    if not s.bf16:
        reasons.append("fp16 with dynamic loss scaling (the _fp16 DeepSpeed configs): this GPU has no bf16, which "
                       "torch only emulates there; Liger Kernel off, as it was measured only in bf16")
    if _liger(s):
        reasons.append("Liger Kernel on (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE): with flex attention and "
                       "LoRA dropout 0 it measured +33% tokens/s and 11 GiB less than sdpa without them on an H100 "
                       "(bench/RESULTS.md); never under ZeRO-3, which shards the lm_head weight the fused loss reads")
    return reasons


def ds_config_for(setting: Setting) -> Optional[str]:
    if not setting.zero_stage:
        return None
    config = OFFLOAD_CONFIG if setting.offload else DS_CONFIGS[setting.zero_stage]
    return config if setting.bf16 else config.replace(".json", "_fp16.json")


def flags_for(chosen: Plan, seq: int) -> List[str]:
    s = chosen.setting
    flags = ["--per_device_train_batch_size", str(s.micro_batch), "--gradient_accumulation_steps",
             str(chosen.accumulation), "--block_size", str(seq), "--packing", "--bf16" if s.bf16 else "--fp16"]
    if s.checkpointing:
        flags.append("--activation_checkpointing")
    if _liger(s):
        flags.append("--use_liger_kernel")
    if s.zero_stage:
        flags += ["--deepspeed", ds_config_for(s)]
    return flags


def resolve_shape(name: str, cache_dir: Optional[str] = None) -> Optional[memory.ModelShape]:
    """A short name (KNOWN_SHAPES), else memory.shape_for: a local dir, a cached config or a known Swallow Hub id."""
    # The short names first: shape_for takes "swallow-70b" for a mistyped hub id.
    if name in memory.KNOWN_SHAPES:
        return memory.KNOWN_SHAPES[name]
    try:
        return memory.shape_for(name, cache_dir)
    except UserError:
        # shape_for's advice (a Hub id close to it, `hf download NAME`) fits ORG/NAME ids and directories only.
        if "/" in name or Path(name).expanduser().exists():
            raise
        raise UserError(f"{name} is not a known short name or Swallow Hub id ({_short_names_hint(name)})") from None


def _short_names_hint(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), memory.KNOWN_SHAPES, n=3, cutoff=0.6)
    known = f"short names: {', '.join(memory.KNOWN_SHAPES)}"
    return f"did you mean {' or '.join(close)}? {known}" if close else known


def check_same_model(path: Path, model: str, shape: memory.ModelShape) -> None:
    """Refuse to write a plan into an experiment that trains another model: its batch sizes would not fit, or would
    waste the GPUs. The names may differ (swallow-70b, tokyotech-llm/Swallow-70b-instruct-v0.1); the shapes may not."""
    from swallow_ft.arguments import flag_value
    from swallow_ft.experiment import Experiment

    args = Experiment.load(path).script_args()
    trains = flag_value(args, "--model_name_or_path")
    if trains is None:  # nothing to contradict; the preflight reports the missing flag
        return
    fix = f"pass --model {trains}, or edit --model_name_or_path in {path}"
    try:
        theirs = resolve_shape(trains, flag_value(args, "--cache_dir"))
    except UserError as exc:
        raise UserError(f"--write {path}: its --model_name_or_path {exc}") from None
    if theirs is None:
        raise UserError(f"--write {path}: the YAML trains {trains}, whose config is not available offline, and the "
                        f"plan is for {model}: {fix} (a local dir or a cached config)")
    if theirs != shape:
        raise UserError(f"--write {path}: the YAML trains {trains}, the plan is for {model} (another shape): {fix}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swallow_ft.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hub id, local dir, or a known Swallow name")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-mem", type=float, help="GiB per GPU as torch.cuda reports it (79.1 for an H100 or A100 "
                        "80GB, 39.4 for an A100 40GB); the GB a card is sold by (80, 40, 141) is read as that; "
                        "default: --gpu's")
    parser.add_argument("--gpu", type=str.lower, choices=list(CARDS),
                        help="for the speed model (its bf16 rate and all-gather bandwidth, and whether it has bf16; "
                             "default h100) and the GPU memory")
    parser.add_argument("--seq", type=int, default=2048)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--lora", action="store_true", default=True)
    kind.add_argument("--full", action="store_true")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--global-batch", type=int, default=64, help="sequences per optimizer step")
    parser.add_argument("--tflops", type=float, help="sustained bf16 TFLOP/s per GPU")
    parser.add_argument("--interconnect-gbps", type=float, help="all-gather GB/s per GPU")
    parser.add_argument("--write", type=Path, help="experiment YAML whose entrypoint gets the chosen flags")
    args = parser.parse_args(argv)

    def run():
        try:
            shape = resolve_shape(args.model)
        except UserError as exc:
            raise UserError(f"--model {exc}") from None
        if shape is None:
            cache = f"cache its config (hf download {args.model} config.json), " if args.model.count("/") == 1 \
                and not args.model.startswith((".", "/", "~")) else ""
            raise UserError(f"--model {args.model}: no config available offline; {cache}use a local dir or a short "
                            f"name ({_short_names_hint(args.model)})")
        if args.write:  # before anything is printed or planned: a plan for another model is no use
            check_same_model(args.write, args.model, shape)
        gib, read_as = gpu_gib(args.gpu_mem, args.gpu)
        chosen = plan(shape, args.gpus, gib, args.seq, not args.full, args.global_batch, args.lora_r, args.tflops,
                      args.interconnect_gbps, args.gpu or "h100")
        flags = flags_for(chosen, args.seq)
        text = rewritten(args.write, flags, args.gpus) if args.write else None  # refused before anything is printed
        s = chosen.setting
        print(f"plan for {args.model} ({shape.total_params / 1e9:.2f}B, {'full' if args.full else 'LoRA'}) on "
              f"{args.gpus} x {gib:g} GiB ({args.gpu or 'h100'}{read_as}):")
        print(f"  ZeRO-{s.zero_stage}{' + offload' if s.offload else ''}, micro-batch {s.micro_batch} x {args.seq}, "
              f"accumulation {chosen.accumulation}, activation checkpointing {'on' if s.checkpointing else 'off'}")
        print(f"  memory: {chosen.estimate}")
        print(f"  time model: {chosen.step_s:.2f} s per optimizer step, "
              f"~{chosen.tokens_per_second_per_gpu:,.0f} tokens/s per GPU (an estimate; measure with bench/)")
        for reason in chosen.reasons:
            print(f"  - {reason}")
        print("  flags: " + " ".join(flags))
        if args.write and text == args.write.read_text():  # a rewrite would only touch its modification time
            print(f"  {args.write} already has them (unchanged)")
        elif args.write:
            args.write.write_text(text)
            print(f"  wrote them into {args.write}")

    return exit_code_of(run)


if __name__ == "__main__":
    sys.exit(main())
