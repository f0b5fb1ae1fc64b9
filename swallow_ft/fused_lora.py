"""A LoRA-adapted linear layer as three matmuls, with LoRA's scale and add done inside the last one.

peft computes `base(x) + lora_B(lora_A(x)) * scaling` as five kernels forward. Two of them, the scale and the add,
each read and write a whole output-sized tensor, and their gradients cost the same again backward. Here the adapter's
product is accumulated into the base output by the GEMM itself (`addmm_`, beta 1, alpha = scaling), and backward
accumulates the adapter's input gradient the same way. Same parameters, same saved tensors, so peft's save, load and
merge are untouched. For Swallow-7B at 4 x 2048 that is about 170 GB less memory traffic per step
(`bench/traffic.py --fused-lora`). Eager PyTorch only: no Triton, nothing to compile.

Used by SwallowTrainer on a GPU unless `fuse_lora` is False (the bench's `+nofusedlora`); plain LoRA layers only (one
adapter, no dropout, no DoRA or other variants, a plain nn.Linear base without hooks), everything else keeps peft's
forward.
"""

import contextlib
import types

import torch
from peft.tuners.lora import Linear as LoraLinear


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scaling * (x A^T) B^T, in the autocast dtype when autocast is on, else in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        # Every operand is cast to `dtype` here (as autocast would), so autocast has nothing left to do inside.
        rows, weight, lora_a, lora_b = (t if t.dtype == dtype else t.to(dtype)
                                        for t in (x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b))
        hidden = torch.mm(rows, lora_a.t())
        out = torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias.to(dtype), rows, weight.t())
        out.addmm_(hidden, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, hidden, weight, lora_a, lora_b)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        rows, hidden, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb, _ = ctx.needs_input_grad
        grads = [None] * 6
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad = grad if grad.dtype == rows.dtype else grad.to(rows.dtype)
        grad_hidden = torch.mm(grad, lora_b).mul_(ctx.scaling)  # rows x r: small
        if need_x:
            grads[0] = torch.mm(grad, weight).addmm_(grad_hidden, lora_a).view(ctx.x_shape)
        if need_w:
            grads[1] = torch.mm(grad.t(), rows)
        if need_b:
            grads[2] = grad.sum(0)
        if need_a:
            grads[3] = torch.mm(grad_hidden.t(), rows)
        if need_lb:
            grads[4] = torch.mm(grad.t(), hidden).mul_(ctx.scaling)
        return tuple(grads)  # autograd casts each to its input's dtype (the adapters' fp32)


def _fused_forward(self, x, *args, **kwargs):
    adapter = self.active_adapters[0]
    return LoraLinearFunction.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[adapter].weight,
                                    self.lora_B[adapter].weight, self.scaling[adapter])


def _has_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def fusable(module) -> bool:
    """A plain LoRA linear layer whose forward is exactly `base(x) + lora_B(lora_A(x)) * scaling`."""
    if type(module) is not LoraLinear or len(module.active_adapters) != 1 or module.merged:
        return False
    adapter = module.active_adapters[0]
    if adapter not in module.lora_A:
        return False
    parts = (module.base_layer, module.lora_A[adapter], module.lora_B[adapter])
    return (not module.disable_adapters and adapter not in module.lora_variant and not module.fan_in_fan_out
            and all(type(p) is torch.nn.Linear and not _has_hooks(p) for p in parts)
            and isinstance(module.lora_dropout[adapter], torch.nn.Identity) and parts[2].bias is None
            and not hasattr(module.base_layer.weight, "ds_id"))  # ZeRO-3 gathers weights in the base's hooks


@contextlib.contextmanager
def fused_lora(model, active=True):
    """Within the block, every fusable LoRA layer of `model` runs LoraLinearFunction; yields how many do."""
    layers = [m for m in model.modules() if fusable(m)] if active else []
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward
