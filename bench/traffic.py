"""Where one training step's GPU time can go, op by op, without a GPU: FLOPs and memory traffic of every kernel.

Runs one forward and backward of a named shape with the project's LoRA adapters (`swallow_ft.model.add_lora`), in
bf16 under autocast as the Trainer runs it, on fake tensors: every aten op executes for its shapes and dtypes only,
so Swallow-7B at 4 x 2048 takes seconds and no memory. Each op is one eager kernel. Its time can be no less than its
FLOPs at the matmul ceiling or its bytes (inputs read, outputs written) at the memory bandwidth, whichever is larger.
The sum is a floor under the GPU time of an eager step (launch gaps, host time and kernel inefficiency come on top).
    python bench/traffic.py --shape swallow-7b --micro-batch 4 --seq 2048
    python bench/traffic.py --shape swallow-7b --micro-batch 4 --seq 2048 --peft-casts   # peft's own input casts
    python bench/traffic.py --shape swallow-7b --micro-batch 4 --seq 2048 --fused-lora   # swallow_ft/fused_lora.py

Not modelled: Liger's fused kernels and flex attention (Triton, GPU only), the optimizer step (the adapters'
AdamW, about 1 GB of traffic), and data loading. Attention is sdpa (causal rows, no padding mask).
"""
import argparse
import contextlib
import math
import sys
from collections import defaultdict
from dataclasses import astuple
from pathlib import Path
from unittest import mock

import torch
from peft.helpers import disable_input_dtype_casting
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry
from transformers import LlamaConfig, LlamaForCausalLM, masking_utils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from swallow_ft import memory  # noqa: E402
from swallow_ft.arguments import ModelArguments  # noqa: E402
from swallow_ft.fused_lora import fused_lora  # noqa: E402
from swallow_ft.model import add_lora  # noqa: E402

from recipes import SHAPES  # noqa: E402

MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "detach", "lift_fresh"}
# the CPU flash-attention ops and their matmuls per pass
CPU_FLASH = {"_scaled_dot_product_flash_attention_for_cpu": 2,
             "_scaled_dot_product_flash_attention_for_cpu_backward": 4}


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for this argument: a broadcast (stride-0) dimension is read once, not per element."""
    return math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0) * t.element_size()


def attention_flops(func, args, kwargs):
    """Matmul FLOPs of the CPU flash-attention ops (torch's FLOP counter knows only the GPU ones): QK^T and PV
    forward, four matmuls backward; a causal kernel skips the masked half."""
    schema = func._schema.arguments
    bound = {**{a.name: a.default_value for a in schema if a.has_default_value()},
             **dict(zip((a.name for a in schema), args)), **kwargs}
    query, key = bound["query"], bound["key"]
    batch, heads, seq_q, head_dim = query.shape
    full = 2 * batch * heads * seq_q * key.shape[2] * head_dim * CPU_FLASH[func.overloadpacket.__name__]
    return full / 2 if bound["is_causal"] else full


def kind_of(name, args, out):
    if name in MATMULS:
        return "matmul"
    if name in CPU_FLASH:
        return "attention"
    if name == "_to_copy" and out.dtype != args[0].dtype:
        return "dtype cast " + {torch.float32: "to fp32", torch.bfloat16: "to bf16"}.get(out.dtype, str(out.dtype))
    if name in {"clone", "copy_", "_to_copy", "cat", "slice_backward", "select_backward", "embedding_dense_backward"}:
        return "copy"
    return "elementwise and reductions"


class Traffic(TorchDispatchMode):
    """Per kind of op: kernels, bytes read and written, FLOPs, and the roofline time of each kernel summed."""

    def __init__(self, flops_per_s, bytes_per_s):
        super().__init__()
        self.flops_per_s, self.bytes_per_s = flops_per_s, bytes_per_s
        self.rows = defaultdict(lambda: {"kernels": 0, "bytes": 0, "flops": 0, "seconds": 0.0})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__.rstrip("_")  # addmm_ is an addmm that writes into its input
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        aliases = not func._schema.is_mutable and any(r.alias_info for r in func._schema.returns)
        if not outputs or aliases or name in FREE:  # views and metadata launch no kernel
            return out
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)] + outputs
        nbytes = sum(stored_bytes(t) for t in tensors)
        counter = flop_registry.get(getattr(torch.ops.aten, name, None))
        if name in CPU_FLASH:
            flops = attention_flops(func, args, kwargs)
        else:
            flops = counter(*args, **kwargs, out_val=out) if counter else 0
        row = self.rows[kind_of(name, args, outputs[0])]
        row["kernels"] += 1
        row["bytes"] += nbytes
        row["flops"] += flops
        row["seconds"] += max(flops / self.flops_per_s, nbytes / self.bytes_per_s)
        return out


def lora_model(shape_name, lora_r, targets, dropout, fake_mode=None):
    """The shape's model in bf16 with the project's LoRA adapters, built on the meta device (peft's own init and
    dtype handling run), then given fake CPU tensors, or real uninitialised ones without `fake_mode`."""
    config = LlamaConfig(**dict(zip(memory._CONFIG_KEYS, astuple(SHAPES[shape_name]))), attn_implementation="sdpa",
                         use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        model = add_lora(model, ModelArguments(model_name_or_path=shape_name, lora_r=lora_r, lora_alpha=2 * lora_r,
                                               lora_dropout=dropout, lora_target_modules=targets))
    if fake_mode is None:
        return model.to_empty(device="cpu").train()
    with fake_mode:  # Module.to_empty would swap tensors, which fake tensors do not allow
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    module._parameters[key] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                                 requires_grad=p.requires_grad)
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = torch.empty(b.shape, dtype=b.dtype)
    return model.train()


def step_traffic(model, micro_batch, seq, peft_casts=False, fuse=False, peak_tflops=800.0, hbm_tbs=3.0,
                 fake_mode=None):
    """{kind: {kernels, bytes, flops, seconds}} of one forward and backward, run as SwallowTrainer runs it: under
    autocast, with peft's input casts skipped unless asked for, and LoRA layers fused if asked for."""
    traffic = Traffic(peak_tflops * 1e12, hbm_tbs * 1e12)
    # transformers reads position_ids to find packed sequences; fake ones cannot be read, and it would build an
    # explicit mask where a real full row runs sdpa's causal kernel. Each row here is one sequence.
    one_sequence_per_row = mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with fake_mode or contextlib.nullcontext(), one_sequence_per_row:
        ids = torch.zeros(micro_batch, seq, dtype=torch.long)
        with disable_input_dtype_casting(model, active=not peft_casts), fused_lora(model, active=fuse), traffic:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    return dict(traffic.rows)


def report(rows, tokens):
    total = {k: sum(r[k] for r in rows.values()) for k in ("kernels", "bytes", "flops", "seconds")}
    lines = [f"{'kind':28s} {'kernels':>8s} {'GB':>9s} {'TFLOP':>8s} {'floor ms':>9s}"]
    for kind, r in sorted(rows.items(), key=lambda kv: -kv[1]["seconds"]) + [("total", total)]:
        lines.append(f"{kind:28s} {r['kernels']:8d} {r['bytes'] / 1e9:9.1f} {r['flops'] / 1e12:8.1f} "
                     f"{r['seconds'] * 1e3:9.1f}")
    lines.append(f"floor: {tokens / total['seconds']:,.0f} tokens/s for {tokens:,} tokens per step")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--peft-casts", action="store_true", help="keep peft's casts of adapted layers' inputs to fp32")
    p.add_argument("--fused-lora", action="store_true", help="LoRA layers as swallow_ft/fused_lora.py runs them")
    p.add_argument("--peak-tflops", type=float, default=800.0, help="matmul ceiling (H100 measured: 793-802)")
    p.add_argument("--hbm-tbs", type=float, default=3.0, help="memory bandwidth, TB/s (H100 SXM: 3.35 peak)")
    args = p.parse_args(argv)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = lora_model(args.shape, args.lora_r, args.targets, args.dropout, fake_mode)
    rows = step_traffic(model, args.micro_batch, args.seq, args.peft_casts, args.fused_lora, args.peak_tflops,
                        args.hbm_tbs, fake_mode)
    print(f"{args.shape}, {args.micro_batch} x {args.seq}, LoRA r{args.lora_r} on {args.targets}, dropout "
          f"{args.dropout}, peft input casts {'kept' if args.peft_casts else 'skipped'}, "
          f"LoRA layers {'fused' if args.fused_lora else 'as peft runs them'}; "
          f"{args.peak_tflops:g} TFLOP/s, {args.hbm_tbs:g} TB/s")
    print(report(rows, args.micro_batch * args.seq))


if __name__ == "__main__":
    main()
