"""A fused LoRA linear for training: one autograd node per adapted layer.

What it saves for backward is x itself (the very tensor the layer was given, so
layers fed the same tensor — q/k/v, gate/up — share one saved copy), the small
h = dropout(x)·Aᵀ (tokens × r), and, with dropout, an integer seed instead of the
mask or the dropped input: backward regenerates the identical mask from the seed.

Without dropout, forward and the input gradient use W_eff = W + s·B·A: one GEMM
instead of three, and building W_eff costs two weight-sized passes, fewer bytes
than the two activation-sized passes it replaces whenever tokens > out_features.

Same signature as `reference.lora_linear`; tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """keep / (1 - p), regenerated bit for bit from `seed` (forward and backward call this)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


def new_seed() -> int:
    """A dropout seed drawn from torch's CPU generator, so torch.manual_seed reproduces runs."""
    return int(torch.randint(0, 2**62, (1,)).item())


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with a hand-written backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float, seed: int) -> Tensor:
        # x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r)
        ct = x.dtype
        a, b = lora_A.to(ct), lora_B.to(ct)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        if dropout_p == 0.0:
            w_eff = torch.addmm(weight.to(ct), b, a, alpha=scale)  # (out, in)
            y = torch.nn.functional.linear(x2, w_eff, None if bias is None else bias.to(ct))
            h = x2 @ a.T  # (T, r)
        else:
            xd = x2 * _dropout_mask(x2.shape, dropout_p, seed, x.device, ct)  # (T, in), freed after forward
            h = xd @ a.T  # (T, r)
            y = torch.nn.functional.linear(x2, weight.to(ct), None if bias is None else bias.to(ct))
            y = torch.addmm(y, h, b.T, alpha=scale)  # (T, out)
        ctx.save_for_backward(x, weight, lora_A, lora_B, h)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, lora_A, lora_B, h = ctx.saved_tensors
        s, p = ctx.scale, ctx.dropout_p
        ct = dy.dtype
        a, b = lora_A.to(ct), lora_B.to(ct)
        x2 = x.reshape(-1, x.shape[-1]).to(ct)  # (T, in)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (T, out)
        dyb = dy2 @ b  # (T, r)
        mask = _dropout_mask(x2.shape, p, ctx.seed, x.device, ct) if p else None
        dx = dweight = dbias = d_a = d_b = None
        if ctx.needs_input_grad[3]:
            xd = x2 if mask is None else x2 * mask
            d_a = (dyb.T @ xd).mul_(s).to(lora_A.dtype)  # (r, in)
        if ctx.needs_input_grad[4]:
            d_b = (dy2.T @ h.to(ct)).mul_(s).to(lora_B.dtype)  # (out, r)
        if ctx.needs_input_grad[0]:
            if mask is None:
                dx = dy2 @ torch.addmm(weight.to(ct), b, a, alpha=s)  # dy·W_eff: (T, in)
            else:
                dx = torch.addcmul(dy2 @ weight.to(ct), (dyb @ a).mul_(s), mask)  # dy·W + s·(dy·B·A)⊙mask
            dx = dx.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dweight = (dy2.T @ x2).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy2.sum(0).to(weight.dtype)
        return dx, dweight, dbias, d_a, d_b, None, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float = 0.0, training: bool = False, seed: int | None = None) -> Tensor:
    """The fused path with `reference.lora_linear`'s signature (plus an optional dropout seed)."""
    p = float(dropout_p) if training else 0.0
    if p and seed is None:
        seed = new_seed()
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), p, int(seed or 0))
