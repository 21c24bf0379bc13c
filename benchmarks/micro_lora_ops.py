"""Micro-benchmark of the pieces of a LoRA linear step at the Llama-3.2-1B shapes (T = 16 × 512 tokens).

For each projection shape (in -> out) it times, in bf16 with CUDA events (median of many):
the base GEMM x·Wᵀ, the same GEMM with r extra output rows ([W; A]), the shrink x·Aᵀ,
building W + s·B·A, the input-gradient GEMM dy·W and dy·[W | B], and the weight-gradient
pieces (dy·B)ᵀ·x and dyᵀ·h. Prints one row per shape.

    python benchmarks/micro_lora_ops.py
"""

from __future__ import annotations

import torch
import triton.testing as tt

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 512), "gate/up": (2048, 8192), "down": (8192, 2048)}


def bench(fn) -> float:
    return tt.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main(T: int = 8192, r: int = 16) -> None:
    dev, dt = "cuda", torch.bfloat16
    print(f"{'shape':<8} {'xW':>7} {'x[W;A]':>7} {'xA':>7} {'W+sBA':>7} {'dyW':>7} {'dy[W|B]':>7} {'dyB':>7} "
          f"{'dyBᵀx':>7} {'dyᵀh':>7}   (ms)")
    for name, (fin, fout) in SHAPES.items():
        x = torch.randn(T, fin, device=dev, dtype=dt)
        dy = torch.randn(T, fout, device=dev, dtype=dt)
        w = torch.randn(fout, fin, device=dev, dtype=dt) * 0.02
        a = torch.randn(r, fin, device=dev, dtype=dt) * 0.02
        b = torch.randn(fout, r, device=dev, dtype=dt) * 0.02
        wa = torch.cat([w, a], 0)
        wb = torch.cat([w, b], 1)
        h = x @ a.T
        dyb = dy @ b
        buf = torch.empty_like(w)
        row = [bench(lambda: x @ w.T), bench(lambda: x @ wa.T), bench(lambda: x @ a.T),
               bench(lambda: torch.addmm(w, b, a, alpha=2.0, out=buf)), bench(lambda: dy @ w),
               bench(lambda: dy @ wb), bench(lambda: dy @ b), bench(lambda: dyb.T @ x), bench(lambda: dy.T @ h)]
        print(f"{name:<8} " + " ".join(f"{v:7.3f}" for v in row))




def kernels(T: int = 8192, r: int = 16) -> None:
    """Time lorakit's Triton kernels against the cuBLAS/torch ops they replace."""
    from lorakit.ops import triton_kernels as tk

    dev, dt = "cuda", torch.bfloat16
    print(f"\n{'shape':<8} {'addmm':>7} {'k:Weff':>7} {'k:Wcol':>7} {'xA':>7} {'k:shr':>7} {'dyBᵀx':>7} "
          f"{'k:dA':>7} {'dxadd':>7} {'k:dx':>7}   (ms)")
    for name, (fin, fout) in SHAPES.items():
        x = torch.randn(T, fin, device=dev, dtype=dt)
        w = torch.randn(fout, fin, device=dev, dtype=dt) * 0.02
        a = torch.randn(r, fin, device=dev, dtype=dt) * 0.02
        b = torch.randn(fout, r, device=dev, dtype=dt) * 0.02
        dyb = torch.randn(T, r, device=dev, dtype=dt)
        dx = torch.randn(T, fin, device=dev, dtype=dt)
        cols = torch.empty(fout, fin + r, device=dev, dtype=dt)
        mask = torch.rand(T, fin, device=dev) > 0.1
        row = [bench(lambda: torch.addmm(w, b, a, alpha=2.0)), bench(lambda: tk.build_w_eff(w, a, b, 2.0)),
               bench(lambda: tk.build_w_eff(w, a, b, 2.0, out=cols[:, :fin])), bench(lambda: x @ a.T),
               bench(lambda: tk.masked_shrink(x, a, 0.1, 3)), bench(lambda: dyb.T @ x),
               bench(lambda: tk.masked_grad_a(dyb, x, 0.1, 3)), bench(lambda: dx.addcmul_(dyb @ a, mask)),
               bench(lambda: tk.masked_dx_add_(dx, dyb, a, 2.0, 0.1, 3))]
        print(f"{name:<8} " + " ".join(f"{v:7.3f}" for v in row))


if __name__ == "__main__":
    import sys

    kernels() if "--kernels" in sys.argv else main()
