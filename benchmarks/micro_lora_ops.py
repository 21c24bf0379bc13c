"""Micro-benchmark of the pieces of a LoRA linear step at the Llama-3.2-1B shapes (T = 16 × 512 tokens).

For each projection shape (in -> out) it times, in bf16, replayed from CUDA graphs (median of many):
the base GEMM x·Wᵀ, the same GEMM with r extra output rows ([W; A]), the shrink x·Aᵀ,
building W + s·B·A, the input-gradient GEMM dy·W and dy·[W | B], and the weight-gradient
pieces (dy·B)ᵀ·x and dyᵀ·h. Prints one row per shape.

    python benchmarks/micro_lora_ops.py             # the pieces above
    python benchmarks/micro_lora_ops.py --kernels   # lorakit's Triton kernels against torch
    python benchmarks/micro_lora_ops.py --grads     # ways to get float32 adapter gradients
    python benchmarks/micro_lora_ops.py --gated     # the gated MLP's elementwise work, torch vs kernels
    python benchmarks/micro_lora_ops.py --masked    # the dropout kernels' tile configurations
    python benchmarks/micro_lora_ops.py --w-eff     # the W + s·B·A kernel's tiles against a plain copy of W
    python benchmarks/micro_lora_ops.py --mask-cost # the dropout kernels with their hashed mask and with a cheap one
    python benchmarks/micro_lora_ops.py --siblings  # layers reading one x: their dropout backward and shrinks one by one or in one pass
    python benchmarks/micro_lora_ops.py --masked --rank 64   # any of them at another rank (default 16)
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import triton.testing as tt

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 512), "gate/up": (2048, 8192), "down": (8192, 2048)}


def bench(fn) -> float:
    """Median ms of fn replayed from a CUDA graph, so the host's launch cost is not timed: with
    triton.testing.do_bench, on a slow host, a Triton kernel of about 30 µs timed at about twice
    that (an H200, 2026-12-01: the masked shrink took 63 µs here against 30 µs a call in a
    profiled training step). fn must be capturable: no host syncs, Triton kernels compiled by the
    warm-up call."""
    return tt.do_bench_cudagraph(fn, rep=100, return_mode="median")


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
    seed = tk.seed_tensor(3, dev)  # a device tensor: an int would be copied to it during capture
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
               bench(lambda: tk.masked_shrink(x, a, 0.1, seed)), bench(lambda: dyb.T @ x),
               bench(lambda: tk.masked_grad_a(dyb, x, 0.1, seed)), bench(lambda: dx.addcmul_(dyb @ a, mask)),
               bench(lambda: tk.masked_dx_add_(dx, dyb, a, 2.0, 0.1, seed))]
        print(f"{name:<8} " + " ".join(f"{v:7.3f}" for v in row))


W_EFF_TILES = [(64, 128, 4), (128, 128, 4), (128, 128, 8), (64, 256, 4), (64, 256, 8), (128, 256, 8),
               (32, 256, 4), (256, 128, 8)]  # (BM, BN, num_warps)


def w_eff(r: int = 16) -> None:
    """W + s·B·A (lorakit's kernel) at each tile of W_EFF_TILES, against out.copy_(W): the same
    bytes moved (W read, out written) with no arithmetic. GB/s counts those bytes. Replayed from
    CUDA graphs without flushing L2, so matrices that fit in L2 (q/o, k/v) show rates above HBM's."""
    from lorakit.ops import triton_kernels as tk

    dev, dt = "cuda", torch.bfloat16
    configured = dict(tk.W_EFF_CONFIG)
    print(f"\nW + s·B·A, µs (GB/s); configured tile {configured}")
    print(f"{'shape':<8} {'copy':>15} " + " ".join(f"{f'{bm}x{bn}/{w}':>15}" for bm, bn, w in W_EFF_TILES))
    try:
        for name, (fin, fout) in SHAPES.items():
            w = torch.randn(fout, fin, device=dev, dtype=dt) * 0.02
            a = torch.randn(r, fin, device=dev, dtype=dt) * 0.02
            b = torch.randn(fout, r, device=dev, dtype=dt) * 0.02
            out = torch.empty_like(w)
            gb = 2 * w.numel() * w.element_size() / 1e9
            cells = [bench(lambda: out.copy_(w))]
            for bm, bn, warps in W_EFF_TILES:
                tk.W_EFF_CONFIG.update(BM=bm, BN=bn, num_warps=warps)
                tk.build_w_eff(w, a, b, 2.0, out=out)  # compile outside the graph
                cells.append(bench(lambda: tk.build_w_eff(w, a, b, 2.0, out=out)))
            print(f"{name:<8} " + " ".join(f"{ms * 1e3:7.1f} ({gb / ms * 1e3:5.0f})" for ms in cells))
    finally:
        tk.W_EFF_CONFIG.clear()
        tk.W_EFF_CONFIG.update(configured)


def grads(T: int = 8192, r: int = 16) -> None:
    """The adapter-gradient GEMMs of the fused path, written as float32 three ways: bf16 GEMM then
    scale then cast (3 kernels), addmm with the scale in the epilogue then cast (2), and one
    addmm with out_dtype=float32 (1, where torch supports it)."""
    dev, dt = "cuda", torch.bfloat16
    print(f"\n{'shape':<8} {'dA 3k':>7} {'dA 2k':>7} {'dA 1k':>7} {'dB 3k':>7} {'dB 2k':>7} {'dB 1k':>7}   (ms)")
    for name, (fin, fout) in SHAPES.items():
        x = torch.randn(T, fin, device=dev, dtype=dt)
        dy = torch.randn(T, fout, device=dev, dtype=dt)
        dyb = torch.randn(T, r, device=dev, dtype=dt)
        h = torch.randn(T, r, device=dev, dtype=dt)
        z32 = torch.empty((), device=dev)
        row = []
        for m1, m2 in ((dyb.T, x), (dy.T, h)):
            row += [bench(lambda: (m1 @ m2).mul_(2.0).float()),
                    bench(lambda: torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=2.0).float()),
                    bench(lambda: torch.addmm(z32, m1, m2, out_dtype=torch.float32, beta=0, alpha=2.0))]
        print(f"{name:<8} " + " ".join(f"{v:7.3f}" for v in row))


def gated(T: int = 8192, width: int = 8192, r: int = 16) -> None:
    """The gated MLP's elementwise work around down_proj (Llama-1B width): forward z = silu(g)·u and
    backward (dg, du, dA), as torch ops and as lorakit's kernels, with the frozen floor's own
    backward (mul then silu backward) for scale. GB/s counts the bytes each must move at least."""
    import torch.nn.functional as F

    from lorakit.ops import triton_kernels as tk

    dev, dt = "cuda", torch.bfloat16
    seed = tk.seed_tensor(3, dev)  # a device tensor: an int would be copied to it during capture
    g, u, dz = (torch.randn(T, width, device=dev, dtype=dt) for _ in range(3))
    dyb = torch.randn(T, r, device=dev, dtype=dt)
    act_g = F.silu(g)
    z32 = torch.empty((), device=dev)
    mb = T * width * 2 / 1e6  # one tensor, MB

    def torch_backward():  # lorakit's backward before the kernel
        ag = F.silu(g)
        z = ag * u
        torch.addmm(z32, dyb.T, z, out_dtype=torch.float32, beta=0, alpha=2.0)
        du = dz * ag
        return torch.ops.aten.silu_backward(dz * u, g), du

    def floor_backward():  # autograd of silu(g)·u with act(g) saved
        du = dz * act_g
        return torch.ops.aten.silu_backward(dz * u, g), du

    rows = [("forward: silu(g)·u, torch", bench(lambda: F.silu(g) * u), 3),
            ("forward: kernel", bench(lambda: tk.gated_act(g, u, "silu")), 3),
            ("backward: floor (torch, act(g) saved)", bench(floor_backward), 6),
            ("backward: lorakit before (torch + dA GEMM)", bench(torch_backward), 5),
            ]
    # gate's and up's expands (h·Bᵀ into g and into u) before the activation, or folded into it
    g2, u2 = g.clone(), u.clone()  # updated in place at every replay
    hg, hu = (torch.randn(T, r, device=dev, dtype=dt) for _ in range(2))
    bg, bu = (torch.randn(width, r, device=dev, dtype=dt) * 0.02 for _ in range(2))

    def expands_then_act():
        tk.expand_add_(g2, hg, bg)
        tk.expand_add_(u2, hu, bu)
        return tk.gated_act(g2, u2, "silu")

    rows.append(("forward + gate/up expands: two expand_add_, gated_act", bench(expands_then_act), 7))
    default = dict(tk.GATED_ACT_LORA_CONFIG)
    for bt, bn, warps in [(32, 128, 4), (64, 128, 4), (64, 64, 4), (32, 256, 8), (64, 128, 8), (128, 64, 8)]:
        tk.GATED_ACT_LORA_CONFIG.update(BT=bt, BN=bn, num_warps=warps)
        rows.append((f"forward + expands folded: kernel BT={bt} BN={bn} warps={warps}",
                     bench(lambda: tk.gated_act_lora_(g2, u2, hg, bg, hu, bu, "silu")), 5))
    tk.GATED_ACT_LORA_CONFIG.update(default)
    default = dict(tk.GATED_BACKWARD_CONFIG)
    for bt, bn, warps, programs in [(64, 64, 4, 1024), (32, 128, 4, 1024), (64, 128, 8, 1024), (64, 64, 4, 2048),
                                    (128, 64, 8, 1024), (32, 64, 4, 4096)]:
        tk.GATED_BACKWARD_CONFIG.update(BT=bt, BN=bn, num_warps=warps, programs=programs)
        rows.append((f"backward: kernel BT={bt} BN={bn} warps={warps} programs~{programs}",
                     bench(lambda: tk.gated_backward(dz, g, u, dyb, "silu", 2.0)), 5))
    tk.GATED_BACKWARD_CONFIG.update(default)
    a = torch.randn(r, width, device=dev, dtype=dt) * 0.02
    in_use = tk.gated_backward_config(r, True)  # the dict gated_backward reads at this rank
    default = dict(in_use)
    for bt, bn, warps, programs in [(32, 64, 4, 4096), (32, 64, 8, 4096), (32, 64, 8, 2048), (16, 64, 4, 4096),
                                    (16, 64, 4, 8192), (64, 64, 8, 2048), (16, 128, 8, 4096)]:
        in_use.update(BT=bt, BN=bn, num_warps=warps, programs=programs)
        rows.append((f"backward, dropout 0.1: kernel BT={bt} BN={bn} warps={warps} programs~{programs}",
                     bench(lambda: tk.gated_backward(dz, g, u, dyb, "silu", 2.0, 0.1, seed, a)), 5))
    in_use.update(default)
    print(f"\n{'gated MLP elementwise (T=' + str(T) + ', width=' + str(width) + ')':<62} {'ms':>7} {'GB/s':>7}")
    for name, ms, tensors in rows:
        print(f"{name:<62} {ms:7.3f} {tensors * mb / ms:7.0f}")


def masked(T: int = 8192, r: int = 16) -> None:
    """lorakit's dropout kernels under several tile configurations, each against the unmasked cuBLAS
    op it stands for; ms at each projection's input width (the kernels' work scales with it)."""
    from lorakit.ops import triton_kernels as tk

    dev, dt = "cuda", torch.bfloat16
    seed = tk.seed_tensor(3, dev)  # a device tensor: an int would be copied to it during capture
    widths = {"in=2048": 2048, "in=8192": 8192}
    data = {k: (torch.randn(T, n, device=dev, dtype=dt), torch.randn(r, n, device=dev, dtype=dt) * 0.02)
            for k, n in widths.items()}
    dyb = torch.randn(T, r, device=dev, dtype=dt)
    rows = []
    for name, (x, a) in data.items():
        rows.append(("shrink: x·Aᵀ cuBLAS (no mask)", name, bench(lambda: x @ a.T)))
        rows.append(("dA: dyBᵀ·x cuBLAS (no mask)", name, bench(lambda: dyb.T @ x)))
        dx = torch.randn_like(x)
        rows.append(("dx += dyB·A torch (no mask)", name, bench(lambda: dx.addmm_(dyb, a))))
        default = {k: dict(v) for k, v in tk.MASKED_CONFIG.items()}
        wide_default = dict(tk.MASKED_BACKWARD_WIDE_CONFIG)
        for cfg in [(64, 64, 4), (32, 128, 4), (16, 128, 4), (32, 64, 2), (16, 256, 4)]:
            tk.MASKED_CONFIG["shrink"] = dict(zip(("BT", "BK", "num_warps"), cfg))
            rows.append((f"shrink kernel BT,BK,warps={cfg}", name, bench(lambda: tk.masked_shrink(x, a, 0.1, seed))))
        for cfg in [(64, 64, 4, 512), (64, 64, 4, 1024), (64, 128, 4, 1024), (128, 64, 8, 1024), (32, 64, 4, 2048)]:
            tk.MASKED_CONFIG["grad_a"] = dict(zip(("BT", "BN", "num_warps", "programs"), cfg))
            rows.append((f"dA kernel BT,BN,warps,programs={cfg}", name,
                         bench(lambda: tk.masked_grad_a(dyb, x, 0.1, seed))))
        for cfg in [(64, 64, 4), (32, 128, 4), (64, 128, 8), (128, 64, 4)]:
            tk.MASKED_CONFIG["dx_add"] = dict(zip(("BT", "BN", "num_warps"), cfg))
            rows.append((f"dx kernel BT,BN,warps={cfg}", name, bench(lambda: tk.masked_dx_add_(dx, dyb, a, 2., 0.1, seed))))
        for cfg in [(64, 64, 4, 1024), (32, 128, 4, 1024), (64, 128, 8, 1024), (64, 64, 4, 2048), (32, 64, 4, 2048),
                    (32, 128, 8, 1024), (32, 64, 8, 2048)]:
            tk.masked_backward_config(r).update(zip(("BT", "BN", "num_warps", "programs"), cfg))
            rows.append((f"dx + dA kernel BT,BN,warps,programs={cfg}", name,
                         bench(lambda: tk.masked_backward_(dx, x, dyb, a, 2., 0.1, seed))))
        tk.MASKED_CONFIG.update(default)
        tk.MASKED_BACKWARD_WIDE_CONFIG.update(wide_default)
    # The dropout forward's expand, y += h·Bᵀ, at each output width: cuBLAS in place, cuBLAS out of
    # place (what the compiler makes of addmm_), and lorakit's in-place kernel (what the fused path runs).
    h = torch.randn(T, r, device=dev, dtype=dt)
    for n_out in (2048, 8192):
        y = torch.randn(T, n_out, device=dev, dtype=dt)
        b = torch.randn(n_out, r, device=dev, dtype=dt) * 0.02
        name = f"in={n_out}"  # the column this width's rows land in
        rows.append(("expand y += h·Bᵀ: addmm_ (columns: out width)", name, bench(lambda: y.addmm_(h, b.T))))
        rows.append(("expand: torch.addmm out of place (a copy of y first)", name,
                     bench(lambda: torch.addmm(y, h, b.T))))
        default = dict(tk.EXPAND_CONFIG)
        for bt, bn, warps in [(64, 128, 4), (128, 128, 8), (64, 256, 8), (32, 128, 4)]:
            tk.EXPAND_CONFIG.update(BT=bt, BN=bn, num_warps=warps)
            rows.append((f"expand kernel BT,BN,warps={(bt, bn, warps)}", name, bench(lambda: tk.expand_add_(y, h, b))))
        tk.EXPAND_CONFIG.update(default)
    print(f"\n{'dropout kernels (T=' + str(T) + ')':<58} " + " ".join(f"{k:>8}" for k in widths))
    for label in dict.fromkeys(r[0] for r in rows):
        print(f"{label:<58} " + " ".join(f"{ms:8.3f}" for lab, _, ms in rows if lab == label))
    # The dropout forward's base GEMM and expand, two orders: y = x·Wᵀ then the in-place kernel
    # y += h·Bᵀ (what the fused path runs), or h·Bᵀ first and the GEMM adding x·Wᵀ to it in place
    # as its C operand (measured, not used); the bare GEMM for scale.
    print(f"\n{'dropout forward, GEMM + expand (ms)':<36} {'x·Wᵀ':>8} {'+kernel':>8} {'C first':>8}")
    for name, (fin, fout) in SHAPES.items():
        x = torch.randn(T, fin, device=dev, dtype=dt)
        w = torch.randn(fout, fin, device=dev, dtype=dt) * 0.02
        b = torch.randn(fout, r, device=dev, dtype=dt) * 0.02
        y = torch.empty(T, fout, device=dev, dtype=dt)
        cells = [bench(lambda: torch.mm(x, w.T, out=y)),
                 bench(lambda: tk.expand_add_(torch.mm(x, w.T, out=y), h, b)),
                 bench(lambda: torch.mm(h, b.T, out=y).addmm_(x, w.T))]
        print(f"{name:<36} " + " ".join(f"{v:8.3f}" for v in cells))


def siblings(T: int = 8192, r: int = 16) -> None:
    """The dropout backward (dx share and dA) of two layers (gate/up) and three (q/k/v) reading one
    x (in = 2048): one `masked_backward_` a layer against one shared pass, at several tiles
    (GB/s counts what the shared pass must move: dx read and written, x read once); then their
    masked shrinks, one a layer against one shared pass."""
    from lorakit.ops import triton_kernels as tk

    dev, dt, n_in = "cuda", torch.bfloat16, 2048
    x = torch.randn(T, n_in, device=dev, dtype=dt)
    dx = torch.randn_like(x)
    seeds = [tk.seed_tensor(3 + i, dev) for i in range(3)]
    terms = [(torch.randn(T, r, device=dev, dtype=dt), torch.randn(r, n_in, device=dev, dtype=dt) * 0.02, 2.0, 0.1,
              seeds[i]) for i in range(3)]
    mb = 3 * T * n_in * 2 / 1e6
    rows = []
    for n in (2, 3):
        rows.append((f"{n} layers, one masked_backward_ each", bench(
            lambda: [tk.masked_backward_(dx, x, d, a, s, p, sd) for d, a, s, p, sd in terms[:n]])))
        cfg = tk.MASKED_SIBLINGS_CONFIG[n]
        default = dict(cfg)
        for bt, bn, warps, programs in [(32, 128, 4, 1024), (32, 64, 4, 2048), (64, 64, 4, 1024), (32, 128, 8, 1024),
                                        (16, 128, 4, 2048), (64, 128, 8, 1024), (16, 64, 4, 4096)]:
            cfg.update(BT=bt, BN=bn, num_warps=warps, programs=programs)
            rows.append((f"{n} layers, shared pass BT={bt} BN={bn} warps={warps} programs~{programs}",
                         bench(lambda: tk.masked_backward_siblings_(dx, x, terms[:n]))))
        cfg.update(default)
    print(f"\n{'layers reading one x (T=' + str(T) + ', in=2048, p = 0.1)':<62} {'ms':>7} {'GB/s':>7}")
    for name, ms in rows:
        print(f"{name:<62} {ms:7.3f} {mb / ms:7.0f}")
    # Forward: the masked shrinks, one a layer against one pass over x (GB/s: x read once).
    shrink_terms = [(a, s, p, sd, None) for _, a, s, p, sd in terms]
    rows = []
    for n in (2, 3):
        rows.append((f"{n} layers, one masked_shrink each", bench(
            lambda: [tk.masked_shrink(x, a, p, sd, s) for a, s, p, sd, _ in shrink_terms[:n]])))
        cfg = tk.MASKED_SHRINK_SIBLINGS_CONFIG[n]
        default = dict(cfg)
        for bt, bk, warps in [(32, 128, 4), (64, 128, 4), (16, 128, 4), (32, 64, 4), (64, 64, 8), (16, 64, 4)]:
            cfg.update(BT=bt, BK=bk, num_warps=warps)
            rows.append((f"{n} layers, shared shrink BT={bt} BK={bk} warps={warps}",
                         bench(lambda: tk.masked_shrink_siblings(x, shrink_terms[:n]))))
        cfg.update(default)
    print(f"\n{'their shrinks (forward)':<62} {'ms':>7} {'GB/s':>7}")
    for name, ms in rows:
        print(f"{name:<62} {ms:7.3f} {T * n_in * 2 / 1e6 / ms:7.0f}")


def _mask_kernel_rows(T: int, r: int) -> list[tuple[str, float]]:
    """(label, ms) of each kernel that regenerates a dropout mask, at p = 0.1, with whatever `_keep` is in place."""
    from lorakit.ops import triton_kernels as tk

    dev, dt = "cuda", torch.bfloat16
    seed = tk.seed_tensor(3, dev)
    dyb = torch.randn(T, r, device=dev, dtype=dt)
    rows = []
    for n in (2048, 8192):
        x = torch.randn(T, n, device=dev, dtype=dt)
        a = torch.randn(r, n, device=dev, dtype=dt) * 0.02
        dx = torch.randn_like(x)
        rows.append((f"masked shrink, in={n}", bench(lambda: tk.masked_shrink(x, a, 0.1, seed))))
        rows.append((f"masked dx + dA, in={n}", bench(lambda: tk.masked_backward_(dx, x, dyb, a, 2.0, 0.1, seed))))
    g, u, dz = (torch.randn(T, 8192, device=dev, dtype=dt) for _ in range(3))
    a = torch.randn(r, 8192, device=dev, dtype=dt) * 0.02
    rows.append(("gated backward, 8192 wide", bench(lambda: tk.gated_backward(dz, g, u, dyb, "silu", 2.0, 0.1, seed, a))))
    return rows


def _no_dropout_rows(T: int, r: int) -> dict[str, float]:
    """The same work without dropout (nothing to hash), for scale: cuBLAS where lorakit uses it at p = 0."""
    from lorakit.ops import triton_kernels as tk

    dev, dt = "cuda", torch.bfloat16
    dyb = torch.randn(T, r, device=dev, dtype=dt)
    rows = {}
    for n in (2048, 8192):
        x = torch.randn(T, n, device=dev, dtype=dt)
        a = torch.randn(r, n, device=dev, dtype=dt) * 0.02
        dx = torch.randn_like(x)
        rows[f"masked shrink, in={n}"] = bench(lambda: x @ a.T)
        rows[f"masked dx + dA, in={n}"] = bench(lambda: (dx.addmm_(dyb, a), dyb.T @ x))
    g, u, dz = (torch.randn(T, 8192, device=dev, dtype=dt) for _ in range(3))
    rows["gated backward, 8192 wide"] = bench(lambda: tk.gated_backward(dz, g, u, dyb, "silu", 2.0))
    return rows


def mask_cost(T: int = 8192, r: int = 16) -> None:
    """What hashing the dropout mask costs the kernels that regenerate it: each kernel timed as it is, then in
    a child process with `_keep` swapped for a mask of three integer operations an element (wrong as dropout,
    same memory traffic), and the same work without dropout for scale."""
    hashed = _mask_kernel_rows(T, r)
    child = subprocess.run([sys.executable, __file__, "--mask-cost-cheap", "--rank", str(r)], capture_output=True,
                           text=True, check=True)
    cheap = dict(json.loads(child.stdout.strip().splitlines()[-1]))
    plain = _no_dropout_rows(T, r)
    print(f"\n{'dropout mask cost (T=' + str(T) + ', r=' + str(r) + ', p = 0.1), ms':<40} {'hashed':>8} {'cheap':>8} "
          f"{'hash':>8} {'no dropout':>10}")
    for label, ms in hashed:
        print(f"{label:<40} {ms:8.3f} {cheap[label]:8.3f} {ms - cheap[label]:8.3f} {plain[label]:10.3f}")


def _mask_cost_cheap(r: int = 16) -> None:
    """mask_cost's child: the kernels with a cheap stand-in for `_keep`, set before any of them compiles."""
    import triton
    import triton.language as tl

    from lorakit.ops import triton_kernels as tk

    @triton.jit
    def cheap_keep(seed, rows, c0, n_in, p, BT: tl.constexpr, BC: tl.constexpr):
        cols = c0 + tl.arange(0, BC)
        return ((rows[:, None] + cols[None, :] + seed.to(tl.int32)) & 15) != 0

    tk._keep = cheap_keep
    print(json.dumps(_mask_kernel_rows(8192, r)))


if __name__ == "__main__":
    import argparse

    modes = {"kernels": kernels, "grads": grads, "gated": gated, "masked": masked, "w_eff": w_eff,
             "mask_cost": mask_cost, "siblings": siblings}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for mode in modes:
        parser.add_argument(f"--{mode.replace('_', '-')}", action="store_true")
    parser.add_argument("--rank", type=int, default=16, help="the LoRA rank r (default %(default)s)")
    parser.add_argument("--mask-cost-cheap", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mask_cost_cheap:
        sys.exit(_mask_cost_cheap(args.rank))
    chosen = [fn for mode, fn in modes.items() if getattr(args, mode)] or [main]
    for fn in chosen:
        fn(r=args.rank)
