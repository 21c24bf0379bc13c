"""A fused LoRA linear for training: one autograd node per adapted layer.

What it saves for backward is x itself (the very tensor the layer was given, so
layers fed the same tensor — q/k/v, gate/up — share one saved copy), the small
h = dropout(x)·Aᵀ (tokens × r), and, with dropout, an integer seed instead of the
mask or the dropped input: backward regenerates the identical mask from the seed.

Without dropout, forward and the input gradient use W_eff = W + s·B·A: building it
costs two weight-sized passes, fewer bytes than the two activation-sized passes of
the separate base-plus-expand it replaces whenever tokens > out_features. (Computing
y and x·Aᵀ from one GEMM against [W_eff; A] was tried and dropped: the outputs come
out strided, and every op downstream of a strided activation slowed more than the
saved pass gained.)

Same signature as `reference.lora_linear`; tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.ops import triton_kernels as tk


def _dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """keep / (1 - p), regenerated bit for bit from `seed` (forward and backward call this)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


def new_seed() -> int:
    """A dropout seed drawn from torch's CPU generator, so torch.manual_seed reproduces runs."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())  # int32: one kernel specialisation


_KERNELS_ON_CPU = False  # tests turn this on under TRITON_INTERPRET=1 to run the kernels on the CPU


def use_kernels_on_cpu(enabled: bool) -> None:
    """Run the Triton kernels on CPU tensors too (only meaningful with TRITON_INTERPRET=1)."""
    global _KERNELS_ON_CPU
    _KERNELS_ON_CPU = enabled


def _kernels(t: Tensor) -> bool:
    return tk.triton_usable(t) and (t.is_cuda or _KERNELS_ON_CPU) and t.numel() <= tk.MAX_MASK_ELEMENTS


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with a hand-written backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float, seed: int) -> Tensor:
        # x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r)
        ct = x.dtype
        n_out, n_in = weight.shape
        a, b = lora_A.to(ct), lora_B.to(ct)
        x2 = x.reshape(-1, n_in)  # (T, in)
        kernels = _kernels(x2)
        if dropout_p == 0.0:
            w_eff = torch.empty(n_out, n_in, dtype=ct, device=x.device)  # (out, in)
            _w_eff(weight, a, b, scale, w_eff, kernels)
            y = torch.nn.functional.linear(x2, w_eff, None if bias is None else bias.to(ct))  # (T, out)
            h = x2 @ a.T  # (T, r)
        else:
            y = torch.nn.functional.linear(x2, weight.to(ct), None if bias is None else bias.to(ct))
            if kernels:
                h = tk.masked_shrink(x2, a, dropout_p, seed)  # (T, r), mask made and dropped in-kernel
            else:
                h = (x2 * _dropout_mask(x2.shape, dropout_p, seed, x.device, ct)) @ a.T
            y = torch.addmm(y, h, b.T, alpha=scale)  # (T, out)
        ctx.save_for_backward(x, weight, lora_A, lora_B, h)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, lora_A, lora_B, h = ctx.saved_tensors
        s, p, seed = ctx.scale, ctx.dropout_p, ctx.seed
        ct = dy.dtype
        n_out, n_in = weight.shape
        a, b = lora_A.to(ct), lora_B.to(ct)
        x2 = x.reshape(-1, n_in).to(ct)  # (T, in)
        dy2 = dy.reshape(-1, n_out)  # (T, out)
        kernels = _kernels(x2)
        need_dx = ctx.needs_input_grad[0]
        dx = dweight = dbias = d_a = d_b = None
        if p == 0.0 and need_dx:
            w_eff = torch.empty(n_out, n_in, dtype=ct, device=x.device)  # (out, in)
            _w_eff(weight, a, b, s, w_eff, kernels)
            dx = dy2 @ w_eff  # dy·W_eff: (T, in)
            dyb = dy2 @ b  # (T, r)
        else:
            dyb = dy2 @ b  # (T, r)
            if need_dx:
                dx = dy2 @ weight.to(ct)  # (T, in)
                if kernels:
                    tk.masked_dx_add_(dx, dyb, a, s, p, seed)
                else:
                    dx.addcmul_(dyb @ a, _dropout_mask(x2.shape, p, seed, x.device, ct), value=s)
        if ctx.needs_input_grad[3]:
            if p == 0.0:
                d_a = dyb.T @ x2
            elif kernels:
                d_a = tk.masked_grad_a(dyb, x2, p, seed)
            else:
                d_a = dyb.T @ (x2 * _dropout_mask(x2.shape, p, seed, x.device, ct))
            d_a = (d_a * s).to(lora_A.dtype)  # (r, in)
        if ctx.needs_input_grad[4]:
            d_b = (dy2.T @ h.to(ct)).mul_(s).to(lora_B.dtype)  # (out, r)
        if need_dx:
            dx = dx.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dweight = (dy2.T @ x2).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy2.sum(0).to(weight.dtype)
        return dx, dweight, dbias, d_a, d_b, None, None, None


def _w_eff(weight: Tensor, a: Tensor, b: Tensor, scale: float, out: Tensor, kernels: bool) -> None:
    """out ← W + s·B·A, accumulated in float32 and rounded once."""
    if kernels:
        tk.build_w_eff(weight, a, b, scale, out=out)
    else:
        acc = torch.promote_types(weight.dtype, torch.float32)  # float64 stays float64
        out.copy_(torch.addmm(weight.to(acc), b.to(acc), a.to(acc), alpha=scale))


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float = 0.0, training: bool = False, seed: int | None = None) -> Tensor:
    """The fused path with `reference.lora_linear`'s signature (plus an optional dropout seed)."""
    p = float(dropout_p) if training else 0.0
    if p and seed is None:
        seed = new_seed()
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), p, int(seed or 0))
