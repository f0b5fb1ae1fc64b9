"""Where one training step's GPU time can go, op by op, without a GPU: FLOPs and memory traffic of every kernel.

Runs one forward and backward of a named shape with the project's LoRA adapters (`swallow_ft.model.add_lora`), in
bf16 under autocast as the Trainer runs it, on fake tensors: every aten op executes for its shapes and dtypes only,
so Swallow-7B at 4 x 2048 takes seconds and no memory. Each op is one eager kernel. Its time can be no less than its
FLOPs at the matmul ceiling or its bytes (inputs read, outputs written) at the memory bandwidth, whichever is larger.
The sum is a floor under the GPU time of an eager step (launch gaps, host time and kernel inefficiency come on top).
    python bench/traffic.py --shape swallow-7b --micro-batch 4 --seq 2048
    python bench/traffic.py --shape swallow-7b --micro-batch 4 --seq 2048 --peft-casts   # peft's own input casts
    python bench/traffic.py --shape swallow-7b --micro-batch 4 --seq 2048 --fused-lora   # swallow_ft/fused_lora.py

    python bench/traffic.py --shape swallow-7b --micro-batch 4 --seq 2048 --liger   # Liger's kernels, modelled

Liger's kernels are Triton, so they cannot run here: `--liger` counts each as one kernel that reads its inputs and
writes its outputs once (what it must move at least). Not modelled: flex attention, the optimizer step (the
adapters' AdamW, about 1 GB of traffic), and data loading. Attention is sdpa (causal rows, no padding mask).
"""
import argparse
import contextlib
import math
import sys
from collections import defaultdict
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
        self.add(kind_of(name, args, outputs[0]), nbytes, flops)
        return out

    def add(self, kind, nbytes, flops):
        row = self.rows[kind]
        row["kernels"] += 1
        row["bytes"] += nbytes
        row["flops"] += flops
        row["seconds"] += max(flops / self.flops_per_s, nbytes / self.bytes_per_s)

    def fused(self, name, reads, writes):
        """A kernel this mode cannot see run (FusedKernel): its bytes read and written."""
        self.add("fused (Liger, modelled)", sum(stored_bytes(t) for t in reads + writes), 0)


class FusedKernel(torch.autograd.Function):
    """One Liger kernel, as the traffic it costs: it reads `reads` and writes outputs shaped like `writes` once, in
    one launch, forward and backward alike. Liger's kernels are Triton and cannot run on fake CPU tensors; each is
    modelled by what it must move at least (its FLOPs are elementwise and do not bound it)."""

    @staticmethod
    def forward(ctx, traffic, name, writes, backward_reads, backward_writes, *reads):
        ctx.traffic, ctx.name, ctx.backward = traffic, name, (backward_reads, backward_writes)
        ctx.save_for_backward(*reads)
        outputs = [torch.empty_like(t) for t in writes]
        traffic.fused(name, list(reads), outputs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        saved, (reads, writes) = ctx.saved_tensors, ctx.backward
        grads_in = [torch.empty_like(saved[i]) for i in writes]
        ctx.traffic.fused(ctx.name + " backward", [g for g in grads if g is not None] + [saved[i] for i in reads],
                          grads_in)
        out = [None] * len(saved)
        for i, grad in zip(writes, grads_in):
            out[i] = grad if ctx.needs_input_grad[5 + i] else None
        return (None,) * 5 + tuple(out)


@contextlib.contextmanager
def liger_modelled(model, traffic):
    """What `--use_liger_kernel` (transformers' default Liger config for Llama) swaps in, as FusedKernel traffic:
    RMSNorm, SwiGLU and RoPE as one kernel each way, and the fused linear cross-entropy, which computes the logits
    and their gradient chunk by chunk in the forward and never keeps them (its two matmuls run as matmuls here)."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, x):  # reads x and the weight, writes y and one fp32 rstd per row; backward: dx
        rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
        y, _ = FusedKernel.apply(traffic, "RMSNorm", [x, rstd], [0, 1], [0], x, self.weight)
        return y

    def swiglu(self, x):  # silu(gate) * up in one kernel; backward recomputes silu and writes both gradients
        gate, up = self.gate_proj(x), self.up_proj(x)
        product, = FusedKernel.apply(traffic, "SwiGLU", [gate], [0, 1], [0, 1], gate, up)
        return self.down_proj(product)

    def rope(q, k, cos, sin, unsqueeze_dim=1):  # rotates q and k in place, as Liger does; backward the same
        return FusedKernel.apply(traffic, "RoPE", [q, k], [2, 3], [0, 1], q, k, cos, sin)

    patches = [mock.patch.object(modeling_llama, "apply_rotary_pos_emb", rope)]
    for module in model.modules():
        if isinstance(module, modeling_llama.LlamaRMSNorm):
            patches.append(mock.patch.object(module, "forward", rms_norm.__get__(module)))
        elif isinstance(module, modeling_llama.LlamaMLP):
            patches.append(mock.patch.object(module, "forward", swiglu.__get__(module)))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def fused_linear_cross_entropy(hidden, weight, labels, traffic):
    """Liger's fused linear cross-entropy, for a frozen lm_head: per chunk of tokens the logits matmul, one kernel
    that turns the bf16 logits into their gradient in place (read and write), and the matmul back to the hidden
    size. The input's gradient is written in the forward; backward scales it by 1, which Liger skips."""

    class FusedLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden):
            flat = hidden.reshape(-1, hidden.shape[-1])
            logits = flat @ weight.t()
            loss = logits.new_empty((), dtype=torch.float32)
            traffic.fused("cross-entropy", [logits, labels], [logits, loss])
            ctx.grad = (logits @ weight).view_as(hidden)
            return loss

        @staticmethod
        def backward(ctx, grad):
            return ctx.grad

    return FusedLoss.apply(hidden)


def lora_model(shape_name, lora_r, targets, dropout, fake_mode=None):
    """The shape's model in bf16 with the project's LoRA adapters, built on the meta device (peft's own init and
    dtype handling run), then given fake CPU tensors, or real uninitialised ones without `fake_mode`."""
    config = LlamaConfig(**SHAPES[shape_name].config_sizes(), attn_implementation="sdpa",
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
                 fake_mode=None, liger=False):
    """{kind: {kernels, bytes, flops, seconds}} of one forward and backward, run as SwallowTrainer runs it: under
    autocast, with peft's input casts skipped unless asked for, LoRA layers fused and Liger's kernels modelled if
    asked for."""
    traffic = Traffic(peak_tflops * 1e12, hbm_tbs * 1e12)
    # transformers reads position_ids to find packed sequences; fake ones cannot be read, and it would build an
    # explicit mask where a real full row runs sdpa's causal kernel. Each row here is one sequence.
    one_sequence_per_row = mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    causal_lm = model.get_base_model()
    with fake_mode or contextlib.nullcontext(), one_sequence_per_row:
        ids = torch.zeros(micro_batch, seq, dtype=torch.long)
        with disable_input_dtype_casting(model, active=not peft_casts), fused_lora(model, active=fuse), \
                liger_modelled(model, traffic) if liger else contextlib.nullcontext(), traffic:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if liger:
                    hidden = causal_lm.model(input_ids=ids).last_hidden_state
                    loss = fused_linear_cross_entropy(hidden, causal_lm.lm_head.weight, ids, traffic)
                else:
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
    p.add_argument("--liger", action="store_true", help="Liger's RMSNorm, SwiGLU, RoPE and fused linear "
                   "cross-entropy, modelled by the bytes each kernel must move (--use_liger_kernel)")
    p.add_argument("--peak-tflops", type=float, default=800.0, help="matmul ceiling (H100 measured: 793-802)")
    p.add_argument("--hbm-tbs", type=float, default=3.0, help="memory bandwidth, TB/s (H100 SXM: 3.35 peak)")
    args = p.parse_args(argv)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = lora_model(args.shape, args.lora_r, args.targets, args.dropout, fake_mode)
    rows = step_traffic(model, args.micro_batch, args.seq, args.peft_casts, args.fused_lora, args.peak_tflops,
                        args.hbm_tbs, fake_mode, args.liger)
    print(f"{args.shape}, {args.micro_batch} x {args.seq}, LoRA r{args.lora_r} on {args.targets}, dropout "
          f"{args.dropout}, peft input casts {'kept' if args.peft_casts else 'skipped'}, "
          f"LoRA layers {'fused' if args.fused_lora else 'as peft runs them'}, "
          f"{'Liger (modelled)' if args.liger else 'no Liger'}; "
          f"{args.peak_tflops:g} TFLOP/s, {args.hbm_tbs:g} TB/s")
    print(report(rows, args.micro_batch * args.seq))


if __name__ == "__main__":
    main()
