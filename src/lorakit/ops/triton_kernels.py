"""Triton kernels for the fused LoRA path, with plain-PyTorch fallbacks.

`build_w_eff` writes W + s·B·A in one pass over W (cuBLAS's addmm with K = r reaches
about a third of memory bandwidth at these shapes). The kernels run on CUDA, or on
the CPU under TRITON_INTERPRET=1 (how the tests exercise them without a GPU); where
neither applies, the same function computes the result with torch.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # Triton is optional: the CPU path and machines without it use torch.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for launch grids. triton.cdiv is a constexpr function whose host-side call
    costs microseconds of Python each (several per launch add up in an eager step)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), as triton.next_power_of_2 without its call cost."""
    return 1 << (n - 1).bit_length()


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype`: t itself where it already is (skipping the dispatcher's call for a no-op .to)."""
    return t if t.dtype == dtype else t.to(dtype)


def triton_usable(t: Tensor) -> bool:
    """Whether the Triton kernels can run on tensors like `t`."""
    return triton is not None and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


if triton is not None:

    @triton.jit
    def _w_eff_kernel(W, A, B, OUT, A_OUT, B_OUT, n_out, n_in, r, scale,
                      s_w0, s_w1, s_a0, s_a1, s_b0, s_b1, s_o0, s_o1,
                      BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
                      WRITE_AB: tl.constexpr):
        # OUT[m, n] = W[m, n] + scale · Σ_k B[m, k] · A[k, n]; one (BM, BN) tile per program.
        # A and B are read in their own dtype and rounded to W's (half W) before the product,
        # the same bits as casting them first; with WRITE_AB the rounded copies are stored too
        # (A_OUT (r, in) by the first row of programs, B_OUT (out, r) by the first column).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BR)
        m_ok = rm[:, None] < n_out
        n_ok = rn[None, :] < n_in
        b_ok = m_ok & (rk[None, :] < r)
        a_ok = (rk[:, None] < r) & n_ok
        b = tl.load(B + rm[:, None] * s_b0 + rk[None, :] * s_b1, mask=b_ok, other=0.0)
        a = tl.load(A + rk[:, None] * s_a0 + rn[None, :] * s_a1, mask=a_ok, other=0.0)
        if IEEE:
            acc = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")  # (BM, BN) float32
        else:
            b = b.to(W.dtype.element_ty)
            a = a.to(W.dtype.element_ty)
            acc = tl.dot(b, a)
        if WRITE_AB:
            if pid_n == 0:
                tl.store(B_OUT + rm[:, None] * r + rk[None, :], b.to(B_OUT.dtype.element_ty), mask=b_ok)
            if pid_m == 0:
                tl.store(A_OUT + rk[:, None] * n_in + rn[None, :], a.to(A_OUT.dtype.element_ty), mask=a_ok)
        w = tl.load(W + rm[:, None] * s_w0 + rn[None, :] * s_w1, mask=m_ok & n_ok, other=0.0)
        out = w.to(tl.float32) + scale * acc
        tl.store(OUT + rm[:, None] * s_o0 + rn[None, :] * s_o1, out.to(OUT.dtype.element_ty), mask=m_ok & n_ok)


W_EFF_CONFIG = {"BM": 64, "BN": 128, "num_warps": 4}  # the W + s·B·A kernel's tile (micro_lora_ops.py --w-eff)


def build_w_eff(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, out: Tensor | None = None,
                use_kernel: bool | None = None) -> Tensor:
    """W + s·B·A in W's dtype. weight (out, in), lora_A (r, in), lora_B (out, r).

    For a half-precision W, A and B are first rounded to W's dtype (the kernel reads them
    in their own dtype and rounds them itself, so float32 adapters cost no cast launches);
    the product is accumulated in float32 (float64 for float64 weights) and added to W
    before the one rounding. `out` (optional) receives the result and may be a slice of
    a larger buffer. `use_kernel` (default: wherever Triton can run) picks the kernel
    or the same arithmetic in torch.
    """
    return _w_eff(weight, lora_A, lora_B, scale, out, use_kernel, None)


def build_w_eff_casts(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                      use_kernel: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(W + s·B·A, A, B) with A and B in W's dtype: `build_w_eff`'s result plus the rounded
    adapters, which the kernel writes as it reads them (no separate cast launches)."""
    dtype = weight.dtype
    if lora_A.dtype == dtype and lora_B.dtype == dtype:
        return _w_eff(weight, lora_A, lora_B, scale, None, use_kernel, None), lora_A, lora_B
    if dtype not in (torch.float16, torch.bfloat16) or not _kernel_for(weight, use_kernel):
        a, b = lora_A.to(dtype), lora_B.to(dtype)
        return _w_eff(weight, a, b, scale, None, use_kernel, None), a, b
    a = torch.empty(lora_A.shape, dtype=dtype, device=weight.device)
    b = torch.empty(lora_B.shape, dtype=dtype, device=weight.device)
    return _w_eff(weight, lora_A, lora_B, scale, None, True, (a, b)), a, b


def _kernel_for(weight: Tensor, use_kernel: bool | None) -> bool:
    """`use_kernel`, or where it is None, whether Triton can run on weight's device."""
    return triton_usable(weight) if use_kernel is None else use_kernel


def _w_eff(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, out: Tensor | None,
           use_kernel: bool | None, casts: tuple[Tensor, Tensor] | None) -> Tensor:
    n_out, n_in = weight.shape
    r = lora_A.shape[0]
    half = weight.dtype in (torch.float16, torch.bfloat16)
    if not _kernel_for(weight, use_kernel):
        acc = torch.promote_types(weight.dtype, torch.float32)
        if half:  # the kernel's rounding of the factors
            lora_A, lora_B = as_dtype(lora_A, weight.dtype), as_dtype(lora_B, weight.dtype)
        w_eff = torch.addmm(as_dtype(weight, acc), as_dtype(lora_B, acc), as_dtype(lora_A, acc), alpha=scale)
        return as_dtype(w_eff, weight.dtype) if out is None else out.copy_(w_eff)
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    a_out, b_out = casts if casts is not None else (out, out)  # unused without WRITE_AB
    br = _br(r)
    bm, bn, warps = W_EFF_CONFIG["BM"], W_EFF_CONFIG["BN"], W_EFF_CONFIG["num_warps"]
    grid = (cdiv(n_out, bm), cdiv(n_in, bn))
    _w_eff_kernel[grid](weight, lora_A, lora_B, out, a_out, b_out, n_out, n_in, r, float(scale),
                        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0),
                        lora_B.stride(1), out.stride(0), out.stride(1), BM=bm, BN=bn, BR=br, IEEE=not half,
                        WRITE_AB=casts is not None, num_warps=warps)
    return out


# -- dropout without a stored mask ---------------------------------------------------------
#
# Columns are hashed in pairs: with half = ceil(n_in / 2), the pair (t, j), columns 2j and
# 2j + 1 of row t, gets h = hash(seed, t·half + j), a 32-bit integer hash of the position and
# the seed; column 2j keeps its element where the low 16 bits of h are >= ⌈p·2¹⁶⌉, column
# 2j + 1 where the high 16 bits are. Every kernel below regenerates the same mask from (seed,
# position), so forward and backward agree and nothing mask-sized is ever stored. A
# multiply-xorshift hash costs a handful of integer operations, several times less than a
# counter-based generator; one hash for two elements halves that again (the hash had cost
# about as much as these kernels' memory traffic). The drop rate is p rounded up to a
# multiple of 2⁻¹⁶ (0.1 becomes 0.100006); the 1/(1-p) scale uses p itself.

MAX_MASK_ELEMENTS = 2**31 - 1  # positions are int32 offsets
_GOLDEN, _MUL1, _MUL2, _LOW32 = 0x9E3779B1, 0x7FEB352D, 0x846CA68B, 0xFFFFFFFF


# Pairs hashed at a time by `keep_mask_torch` outside torch.compile: its int64 temporaries
# (2 MiB) then stay in a CPU's cache, five times faster on a 2048 × 384 mask than one pass each.
MASK_CHUNK = 1 << 18


def mask_threshold(p: float) -> int:
    """⌈p·2¹⁶⌉ with p rounded to float32 first, as the kernels compute it: a 16-bit draw keeps
    its element where it is >= this."""
    m, e = math.frexp(p)  # p = m·2^e, 0.5 <= m < 1: round m to float32's 24 bits, ties to even
    return math.ceil(math.ldexp(round(m * 16777216.0), e - 24) * 65536.0)


def keep_mask_torch(shape: tuple[int, int], p: float, seed: Tensor) -> Tensor:
    """The kernels' keep-mask computed with torch integer ops: the same bits on any device.

    int64 products wrap modulo 2⁶⁴, which keeps the low 32 bits exact; masking to 32 bits
    before every shift keeps the shifts logical. Eagerly the pairs are hashed in chunks of
    MASK_CHUNK, in place; under torch.compile in one piece, for the compiler to fuse.
    """
    T, n_in = shape
    half = (n_in + 1) // 2
    n = T * half
    step = n if torch.compiler.is_compiling() else MASK_CHUNK
    seed32 = seed & _LOW32
    threshold = mask_threshold(p)
    keep = torch.empty(n, 2, dtype=torch.bool, device=seed.device)
    for start in range(0, n, max(1, step)):
        h = torch.arange(start, min(n, start + step), device=seed.device, dtype=torch.int64)
        h.mul_(_GOLDEN).add_(seed32).bitwise_and_(_LOW32)
        h.bitwise_xor_(h >> 16)
        h.mul_(_MUL1).bitwise_and_(_LOW32)
        h.bitwise_xor_(h >> 15)
        h.mul_(_MUL2).bitwise_and_(_LOW32)
        h.bitwise_xor_(h >> 16)
        part = keep[start:start + h.numel()]
        part[:, 0] = (h & 0xFFFF) >= threshold
        part[:, 1] = (h >> 16) >= threshold
    return keep.view(T, 2 * half)[:, :n_in]

if triton is not None:

    @triton.jit
    def _keep(seed, rows, c0, n_in, p, BT: tl.constexpr, BC: tl.constexpr):
        # keep_mask_torch's bits for the BT rows `rows` and columns c0 .. c0 + BC (c0 even): one
        # hash a pair of columns, its low and high 16 bits for the pair's two elements.
        # (t·half + j)·G + seed is spread over a row term and a column term (mod 2³² the
        # products distribute), and the draws are compared with ⌈p·2¹⁶⌉ as integers.
        half = (n_in + 1) // 2
        pairs = c0 // 2 + tl.arange(0, BC // 2)
        row_term = rows.to(tl.uint32) * half * 0x9E3779B1
        col_term = pairs.to(tl.uint32) * 0x9E3779B1 + seed.to(tl.uint32)
        h = row_term[:, None] + col_term[None, :]
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        h = h ^ (h >> 16)
        draws = tl.reshape(tl.join(h & 0xFFFF, h >> 16), (BT, BC))  # column 2j: low bits; 2j + 1: high
        return draws >= tl.math.ceil(p * 65536.0).to(tl.uint32)

    @triton.jit
    def _mask_kernel(OUT, T, n_in, SEED, p, BT: tl.constexpr, BN: tl.constexpr):
        rt = tl.program_id(0) * BT + tl.arange(0, BT)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        ok = (rt[:, None] < T) & (rn[None, :] < n_in)
        keep = _keep(tl.load(SEED), rt, tl.program_id(1) * BN, n_in, p, BT, BN)
        tl.store(OUT + rt[:, None] * n_in + rn[None, :], keep.to(tl.int8), mask=ok)

    @triton.jit
    def _shrink_term(acc, x, A, A_OUT, s_a0, s_a1, rr, rk, rt, k0, n_in, r, SEED, p, BT: tl.constexpr,
                     BK: tl.constexpr, IEEE: tl.constexpr, WRITE_A: tl.constexpr):
        # One layer's share of a k-tile x (BT, BK) of the input: acc += keep·x · Aᵀ. A is read in its
        # own dtype and rounded to x's; with WRITE_A the first program stores that rounded copy in
        # A_OUT (r, in), contiguous.
        keep = _keep(tl.load(SEED), rt, k0, n_in, p, BT, BK)
        xm = tl.where(keep, x, 0.0).to(x.dtype)
        a_ok = (rr[None, :] < r) & (rk[:, None] < n_in)
        a = tl.load(A + rr[None, :] * s_a0 + rk[:, None] * s_a1, mask=a_ok, other=0.0).to(x.dtype)  # (BK, BR) = Aᵀ
        if WRITE_A:
            if tl.program_id(0) == 0:
                tl.store(A_OUT + rr[None, :] * n_in + rk[:, None], a, mask=a_ok)
        if IEEE:
            acc += tl.dot(xm, a, input_precision="ieee")
        else:
            acc += tl.dot(xm, a)
        return acc

    @triton.jit
    def _masked_shrink_kernel(X, A, H, A_OUT, T, n_in, r, SEED, p, mult,
                              s_x0, s_x1, s_a0, s_a1, s_h0, s_h1,
                              BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
                              WRITE_A: tl.constexpr):
        # H[t, :] = mult · Σ_i keep(t, i)·X[t, i] · A[:, i], mult = s/(1-p); one block of BT rows per program.
        # mult scales the float32 sum once, so the dropped x enters the dot as it was loaded.
        rt = tl.program_id(0) * BT + tl.arange(0, BT)
        rr = tl.arange(0, BR)
        acc = tl.zeros((BT, BR), dtype=tl.float32)
        for k0 in range(0, n_in, BK):
            rk = k0 + tl.arange(0, BK)
            ok = (rt[:, None] < T) & (rk[None, :] < n_in)
            x = tl.load(X + rt[:, None] * s_x0 + rk[None, :] * s_x1, mask=ok, other=0.0)
            acc = _shrink_term(acc, x, A, A_OUT, s_a0, s_a1, rr, rk, rt, k0, n_in, r, SEED, p, BT, BK, IEEE, WRITE_A)
        tl.store(H + rt[:, None] * s_h0 + rr[None, :] * s_h1, (acc * mult).to(H.dtype.element_ty),
                 mask=(rt[:, None] < T) & (rr[None, :] < r))

    @triton.jit
    def _masked_shrink_siblings_kernel(X, T, n_in, s_x0, s_x1,
                                       A0, A_OUT0, H0, SEED0, p0, mult0, r0,
                                       A1, A_OUT1, H1, SEED1, p1, mult1, r1,
                                       A2, A_OUT2, H2, SEED2, p2, mult2, r2,
                                       N: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                                       IEEE: tl.constexpr, WRITE_A0: tl.constexpr, WRITE_A1: tl.constexpr,
                                       WRITE_A2: tl.constexpr):
        # `_masked_shrink_kernel` for N = 2 or 3 layers reading one input x, each with its own mask:
        # H_l[t, :] = mult_l · Σ_i keep_l(t, i)·X[t, i]·A_l[:, i], one read of X for all of them.
        # A_l (r_l, in) contiguous; H_l (T, r_l) contiguous.
        rt = tl.program_id(0) * BT + tl.arange(0, BT)
        rr = tl.arange(0, BR)
        acc0 = tl.zeros((BT, BR), dtype=tl.float32)
        acc1 = tl.zeros((BT, BR), dtype=tl.float32)
        acc2 = tl.zeros((BT, BR), dtype=tl.float32)
        for k0 in range(0, n_in, BK):
            rk = k0 + tl.arange(0, BK)
            ok = (rt[:, None] < T) & (rk[None, :] < n_in)
            x = tl.load(X + rt[:, None] * s_x0 + rk[None, :] * s_x1, mask=ok, other=0.0)
            acc0 = _shrink_term(acc0, x, A0, A_OUT0, n_in, 1, rr, rk, rt, k0, n_in, r0, SEED0, p0, BT, BK, IEEE, WRITE_A0)
            acc1 = _shrink_term(acc1, x, A1, A_OUT1, n_in, 1, rr, rk, rt, k0, n_in, r1, SEED1, p1, BT, BK, IEEE, WRITE_A1)
            if N == 3:
                acc2 = _shrink_term(acc2, x, A2, A_OUT2, n_in, 1, rr, rk, rt, k0, n_in, r2, SEED2, p2, BT, BK, IEEE, WRITE_A2)
        t_ok = rt[:, None] < T
        tl.store(H0 + rt[:, None] * r0 + rr[None, :], (acc0 * mult0).to(H0.dtype.element_ty),
                 mask=t_ok & (rr[None, :] < r0))
        tl.store(H1 + rt[:, None] * r1 + rr[None, :], (acc1 * mult1).to(H1.dtype.element_ty),
                 mask=t_ok & (rr[None, :] < r1))
        if N == 3:
            tl.store(H2 + rt[:, None] * r2 + rr[None, :], (acc2 * mult2).to(H2.dtype.element_ty),
                     mask=t_ok & (rr[None, :] < r2))

    @triton.jit
    def _masked_grad_a_kernel(DYB, X, PART, T, n_in, r, SEED, p, mult, rows_per_split,
                              s_d0, s_d1, s_x0, s_x1,
                              BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr):
        # PART[split, :, n] = mult · Σ_{t in split} DYB[t, :]ᵀ · keep(t, n)·X[t, n], mult = s/(1-p)
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        acc = tl.zeros((BR, BN), dtype=tl.float32)
        t_start = split * rows_per_split
        for t0 in range(t_start, t_start + rows_per_split, BT):
            rt = t0 + tl.arange(0, BT)
            t_ok = rt < T
            x = tl.load(X + rt[:, None] * s_x0 + rn[None, :] * s_x1, mask=t_ok[:, None] & (rn[None, :] < n_in),
                        other=0.0)
            keep = _keep(tl.load(SEED), rt, pid_n * BN, n_in, p, BT, BN)
            x = tl.where(keep, x, 0.0).to(X.dtype.element_ty)
            d = tl.load(DYB + rr[:, None] * s_d1 + rt[None, :] * s_d0, mask=(rr[:, None] < r) & t_ok[None, :],
                        other=0.0)  # (BR, BT) = DYBᵀ tile
            if IEEE:
                acc += tl.dot(d, x, input_precision="ieee")
            else:
                acc += tl.dot(d, x)
        out = PART + split * r * n_in + rr[:, None] * n_in + rn[None, :]
        tl.store(out, acc * mult, mask=(rr[:, None] < r) & (rn[None, :] < n_in))

    @triton.jit
    def _masked_dx_add_kernel(DX, DYB, A, T, n_in, r, SEED, p, scale_keep,
                              s_dx0, s_dx1, s_d0, s_d1, s_a0, s_a1,
                              BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr):
        # DX[t, n] += s/(1-p) · keep(t, n) · Σ_k DYB[t, k] · A[k, n]
        rt = tl.program_id(0) * BT + tl.arange(0, BT)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        d = tl.load(DYB + rt[:, None] * s_d0 + rr[None, :] * s_d1, mask=(rt[:, None] < T) & (rr[None, :] < r),
                    other=0.0)
        a = tl.load(A + rr[:, None] * s_a0 + rn[None, :] * s_a1, mask=(rr[:, None] < r) & (rn[None, :] < n_in),
                    other=0.0)
        if IEEE:
            prod = tl.dot(d, a, input_precision="ieee")
        else:
            prod = tl.dot(d, a)
        keep = _keep(tl.load(SEED), rt, tl.program_id(1) * BN, n_in, p, BT, BN)
        ok = (rt[:, None] < T) & (rn[None, :] < n_in)
        ptr = DX + rt[:, None] * s_dx0 + rn[None, :] * s_dx1
        dx = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        dx += tl.where(keep, prod * scale_keep, 0.0)
        tl.store(ptr, dx.to(DX.dtype.element_ty), mask=ok)


if triton is not None:

    @triton.jit
    def _lora_delta(H, B, B_OUT, rt, rn, T, width, r, s_h0, s_h1, s_b0, s_b1, dtype,
                    BR: tl.constexpr, IEEE: tl.constexpr, WRITE_B: tl.constexpr):
        # (H·Bᵀ)[rt, rn] in float32, B read in its own dtype and rounded to `dtype`; with WRITE_B
        # the first row of programs stores that rounded B in B_OUT (width, r).
        rr = tl.arange(0, BR)
        h = tl.load(H + rt[:, None] * s_h0 + rr[None, :] * s_h1, mask=(rt[:, None] < T) & (rr[None, :] < r),
                    other=0.0)  # (BT, BR)
        b_ok = (rr[:, None] < r) & (rn[None, :] < width)
        b = tl.load(B + rn[None, :] * s_b0 + rr[:, None] * s_b1, mask=b_ok, other=0.0).to(dtype)  # (BR, BN) = Bᵀ
        if WRITE_B:
            if tl.program_id(0) == 0:
                tl.store(B_OUT + rn[None, :] * r + rr[:, None], b, mask=b_ok)
        if IEEE:
            return tl.dot(h, b, input_precision="ieee")
        return tl.dot(h, b)

    @triton.jit
    def _train_expand_add_kernel(Y, H, B, B_OUT, T, n_out, r, s_y0, s_y1, s_h0, s_h1, s_b0, s_b1,
                                 BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
                                 WRITE_B: tl.constexpr):
        # Y[t, n] += Σ_k H[t, k] · B[n, k] on one (BT, BN) tile, summed in float32 and rounded once.
        # B is read in its own dtype and rounded to h's; with WRITE_B the first row of programs
        # stores that rounded copy in B_OUT (out, r).
        rt = tl.program_id(0) * BT + tl.arange(0, BT)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = _lora_delta(H, B, B_OUT, rt, rn, T, n_out, r, s_h0, s_h1, s_b0, s_b1, H.dtype.element_ty, BR, IEEE,
                          WRITE_B)
        ok = (rt[:, None] < T) & (rn[None, :] < n_out)
        ptr = Y + rt[:, None] * s_y0 + rn[None, :] * s_y1
        y = tl.load(ptr, mask=ok, other=0.0).to(tl.float32) + acc
        tl.store(ptr, y.to(Y.dtype.element_ty), mask=ok)


def _br(r: int) -> int:
    return max(16, next_power_of_2(r))


def _ieee(t: Tensor) -> bool:
    return t.dtype not in (torch.float16, torch.bfloat16)


def seed_tensor(seed: int | Tensor, device) -> Tensor:
    """The seed as the one-element int64 tensor the kernels read (so no host sync is needed)."""
    if isinstance(seed, Tensor):
        if seed.dtype == torch.int64 and seed.shape == (1,) and seed.device == device:
            return seed  # as new_seed made it: no conversion calls
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    return torch.tensor([seed], dtype=torch.int64, device=device)


def dropout_keep_mask(shape: tuple[int, int], p: float, seed: int | Tensor, device) -> Tensor:
    """The (T, in) boolean keep-mask that the kernels regenerate from `seed` (for tests and the CPU)."""
    T, n_in = shape
    out = torch.empty(T, n_in, dtype=torch.int8, device=device)
    grid = (cdiv(T, 32), cdiv(n_in, 64))
    _mask_kernel[grid](out, T, n_in, seed_tensor(seed, device), p, BT=32, BN=64)
    return out.bool()


# Tile sizes, warps and (for the dA reduction) about how many programs to split the rows over;
# benchmarks/micro_lora_ops.py --masked times the choices.
MASKED_CONFIG = {"shrink": {"BT": 32, "BK": 128, "num_warps": 4},
                 "grad_a": {"BT": 64, "BN": 64, "num_warps": 4, "programs": 512},
                 "dx_add": {"BT": 64, "BN": 64, "num_warps": 4},
                 "backward": {"BT": 32, "BN": 128, "num_warps": 4, "programs": 1024}}

# From rank 64 on (BR >= WIDE_RANK) the factor tiles are four times larger, and two kernels do
# better at other tiles (an H200, `micro_lora_ops.py --masked --rank 64` and `--gated --rank 64`,
# benchmarks/RESULTS.md tenth set): the dx/dA pass at 64-column blocks (0.056 against 0.063 ms at
# in = 2048, 0.159 against 0.175 at 8192), and the gated backward with dropout at 32 rows and 8
# warps (0.356 against 0.422 ms at 8192 × 8192). At rank 16 those tiles were slower.
WIDE_RANK = 64
MASKED_BACKWARD_WIDE_CONFIG = {"BT": 32, "BN": 64, "num_warps": 4, "programs": 2048}


# From rank 256 on the shrink's A tiles (BK × r, read in A's own dtype, float32 for float32
# adapters) and their pipeline buffers no longer fit a Hopper SM's 227 KiB of shared memory at
# BK = 128 (an H200 refused r = 256: 311,296 bytes asked); at BK = 32 the launch asks for 71,680
# bytes at r = 256 and 137,216 at 512 (benchmarks/kernel_resources.py --rank 256 --factors fp32).
MASKED_SHRINK_WIDE_CONFIG = {"BT": 32, "BK": 32, "num_warps": 4}

# Above this rank the fused layers use torch ops instead of the kernels: at rank 512 the in-place
# expand's tiles, among others, ask for more shared memory than an SM has (kernel_resources.py).
KERNEL_MAX_RANK = 256


def masked_backward_config(r: int) -> dict:
    """The tile `masked_backward_` uses at rank r (the dict itself: tuning scripts update it)."""
    return MASKED_BACKWARD_WIDE_CONFIG if _br(r) >= WIDE_RANK else MASKED_CONFIG["backward"]


# The in-place expand's tile (benchmarks/micro_lora_ops.py --masked times the choices).
EXPAND_CONFIG = {"BT": 32, "BN": 128, "num_warps": 4}


def expand_add_(y: Tensor, h: Tensor, lora_B: Tensor, b_out: Tensor | None = None) -> Tensor:
    """y += h·Bᵀ in place, summed in float32 and rounded once (as addmm_ with beta = 1 does):
    y (T, out) and h (T, r) in one dtype, B (out, r) in any (rounded to h's as it is read;
    `b_out`, a contiguous (out, r) tensor of h's dtype, if given receives that rounded B).
    Faster than cuBLAS's in-place addmm_ at these shapes (profiled Llama-1B steps on H200s,
    8192 tokens, r = 16: 3.02 ms for its 112 calls against 4.36 ms for addmm_'s), and under
    torch.compile it stays an in-place update, where the compiler's out-of-place addmm would
    first copy y."""
    T, n_out = y.shape
    r = h.shape[1]
    cfg = EXPAND_CONFIG
    grid = (cdiv(T, cfg["BT"]), cdiv(n_out, cfg["BN"]))
    _train_expand_add_kernel[grid](y, h, lora_B, y if b_out is None else b_out, T, n_out, r, y.stride(0),
                                   y.stride(1), h.stride(0), h.stride(1), lora_B.stride(0), lora_B.stride(1),
                                   BR=_br(r), IEEE=_ieee(y), WRITE_B=b_out is not None, **cfg)
    return y


def masked_shrink(x2: Tensor, lora_A: Tensor, p: float, seed: int | Tensor, scale: float = 1.0,
                  a_out: Tensor | None = None) -> Tensor:
    """h = s·dropout(x)·Aᵀ with the seed's mask: x2 (T, in), A (r, in) in any dtype, rounded to
    x's as it is read -> (T, r). `a_out`, a contiguous (r, in) tensor of x's dtype, if given
    receives that rounded A."""
    T, n_in = x2.shape
    r = lora_A.shape[0]
    h = torch.empty(T, r, dtype=x2.dtype, device=x2.device)
    cfg = MASKED_CONFIG["shrink"] if _br(r) < 256 else MASKED_SHRINK_WIDE_CONFIG
    _masked_shrink_kernel[(cdiv(T, cfg["BT"]),)](
        x2, lora_A, h, h if a_out is None else a_out, T, n_in, r, seed_tensor(seed, x2.device), p,
        scale / (1.0 - p), x2.stride(0), x2.stride(1), lora_A.stride(0), lora_A.stride(1), h.stride(0), h.stride(1),
        BR=_br(r), IEEE=_ieee(x2), WRITE_A=a_out is not None, **cfg)
    return h


# The siblings' shrink at two and at three layers (benchmarks/micro_lora_ops.py --siblings times the
# choices). On an H200 at T = 8192, in = 2048, r = 16 (benchmarks/RESULTS.md, twelfth set) three
# layers took 0.040 ms at 32 × 64 against 0.043 for three `masked_shrink`s (0.045 at 32 × 128); two
# took 0.031 at best against 0.029 for two, so `fused` uses this pass for three layers only.
MASKED_SHRINK_SIBLINGS_CONFIG = {2: {"BT": 32, "BK": 64, "num_warps": 4}, 3: {"BT": 32, "BK": 64, "num_warps": 4}}

# The shared passes hold every layer's factor tiles at once: up to this rank (their tiles at 64
# fit a Hopper SM's shared memory in float32 too; at 32 × 128 three rank-64 float32 layers did not).
SIBLINGS_MAX_RANK = 64

# The fused nodes route layers to the shared passes up to this rank, and run wider ones a layer at
# a time, with tiles tuned for their rank. The shared passes' tiles were tuned at r = 16; on an H200
# (benchmarks/RESULTS.md, thirteenth set) the graphed 16 × 512 step at r = 64 and dropout 0.1 took
# 129.7 ms with them against 122.1 and 122.2 a layer at a time, r = 16 110.4–110.5 ms either way.
SIBLINGS_ROUTE_MAX_RANK = 16


def _check_siblings(name: str, ranks: list[int]) -> None:
    if len(ranks) not in (2, 3):
        raise ValueError(f"{name} takes 2 or 3 layers, got {len(ranks)}")
    if max(ranks) > SIBLINGS_MAX_RANK:
        raise ValueError(f"{name} takes ranks up to {SIBLINGS_MAX_RANK}, got {max(ranks)}")


def masked_shrink_siblings(x2: Tensor, terms: list[tuple[Tensor, float, float, Tensor, Tensor | None]]
                           ) -> list[Tensor]:
    """`masked_shrink` for two or three layers that read one input x, in one pass over x: each
    layer's h = s·dropout(x)·Aᵀ with its own mask. terms: (A (r, in) in any dtype, s, p > 0, seed,
    a_out) a layer, a_out as `masked_shrink` takes it; the ranks may differ, up to SIBLINGS_MAX_RANK.
    Returns the h's (T, r)."""
    T, n_in = x2.shape
    n = len(terms)
    _check_siblings("masked_shrink_siblings", [t[0].shape[0] for t in terms])
    cfg = MASKED_SHRINK_SIBLINGS_CONFIG[n]
    args, hs, writes = [], [], []
    for lora_A, scale, p, seed, a_out in terms:
        lora_A = lora_A.contiguous()
        h = torch.empty(T, lora_A.shape[0], dtype=x2.dtype, device=x2.device)
        hs.append(h)
        writes.append(a_out is not None)
        args += [lora_A, h if a_out is None else a_out, h, seed_tensor(seed, x2.device), p, scale / (1.0 - p),
                 lora_A.shape[0]]
    args += args[:7] * (3 - n)  # the third slot, unread at n = 2
    writes += [False] * (3 - n)
    br = _br(max(t[0].shape[0] for t in terms))
    _masked_shrink_siblings_kernel[(cdiv(T, cfg["BT"]),)](
        x2, T, n_in, x2.stride(0), x2.stride(1), *args, N=n, BT=cfg["BT"], BK=cfg["BK"], BR=br, IEEE=_ieee(x2),
        WRITE_A0=writes[0], WRITE_A1=writes[1], WRITE_A2=writes[2], num_warps=cfg["num_warps"])
    return hs


def masked_grad_a(dyb: Tensor, x2: Tensor, p: float, seed: int | Tensor, scale: float = 1.0) -> Tensor:
    """s·dyBᵀ·dropout(x) in float32: dyb (T, r), x2 (T, in) -> (r, in)."""
    T, n_in = x2.shape
    r = dyb.shape[1]
    bt, bn, warps, programs = (MASKED_CONFIG["grad_a"][k] for k in ("BT", "BN", "num_warps", "programs"))
    n_blocks, splits, rows = _row_splits(T, n_in, bt, bn, programs)
    part = torch.empty(splits, r, n_in, dtype=torch.float32, device=x2.device)
    _masked_grad_a_kernel[(n_blocks, splits)](
        dyb, x2, part, T, n_in, r, seed_tensor(seed, x2.device), p, scale / (1.0 - p), rows, dyb.stride(0), dyb.stride(1),
        x2.stride(0), x2.stride(1), BT=bt, BN=bn, BR=_br(r), IEEE=_ieee(x2), num_warps=warps)
    return part.sum(0) if splits > 1 else part[0]


def masked_dx_add_(dx: Tensor, dyb: Tensor, lora_A: Tensor, scale: float, p: float, seed: int | Tensor) -> Tensor:
    """dx += s·(dyB·A)⊙mask/(1-p) in place: dx (T, in), dyb (T, r), A (r, in)."""
    T, n_in = dx.shape
    r = lora_A.shape[0]
    cfg = MASKED_CONFIG["dx_add"]
    grid = (cdiv(T, cfg["BT"]), cdiv(n_in, cfg["BN"]))
    _masked_dx_add_kernel[grid](
        dx, dyb, lora_A, T, n_in, r, seed_tensor(seed, dx.device), p, scale / (1.0 - p), dx.stride(0), dx.stride(1),
        dyb.stride(0), dyb.stride(1), lora_A.stride(0), lora_A.stride(1), BR=_br(r), IEEE=_ieee(dx), **cfg)
    return dx


# -- the gated MLP's elementwise work, fused -------------------------------------------------
#
# z = act(g) ⊙ u in forward is one pass (torch runs act and the product as two); backward
# reads dz, g and u once and writes dg (over dz) and du, and in the same pass adds
# s·dyBᵀ·dropout(z) into down_proj's dA, recomputing z in registers. torch's version of
# that backward makes five tensor-sized temporaries (act(g), z, dz·act(g), dz·u and dg)
# and reads z once more for dA.

GATED_KERNEL_ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}

if triton is not None:

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr):
        # act(g) and act'(g) in float32
        if ACT == 0:
            sig = tl.sigmoid(g)
            return g * sig, sig * (1.0 + g * (1.0 - sig))
        elif ACT == 1:
            cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        else:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner)
            return 0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (
                1.0 + 0.134145 * g * g)

    @triton.jit
    def _gated_act_kernel(G, U, Z, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, ACT)
        tl.store(Z + offs, (a * u).to(Z.dtype.element_ty), mask=ok)

    @triton.jit
    def _gated_act_lora_kernel(G, U, Z, HG, BG, HU, BU, BG_OUT, BU_OUT, T, width, rg, ru,
                               s_hg0, s_hg1, s_bg0, s_bg1, s_hu0, s_hu1, s_bu0, s_bu1, ACT: tl.constexpr,
                               BT: tl.constexpr, BN: tl.constexpr, BRG: tl.constexpr, BRU: tl.constexpr,
                               IEEE: tl.constexpr, WRITE_BG: tl.constexpr, WRITE_BU: tl.constexpr):
        # On one (BT, BN) tile of G, U, Z (contiguous (T, width)): G += HG·BGᵀ and U += HU·BUᵀ in
        # place (summed in float32, rounded once, as the in-place expand does), then
        # Z = act(G)·U from the rounded G and U, as backward recomputes it.
        rt = tl.program_id(0) * BT + tl.arange(0, BT)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        ok = (rt[:, None] < T) & (rn[None, :] < width)
        offs = rt[:, None].to(tl.int64) * width + rn[None, :]
        dtype = G.dtype.element_ty
        dg = _lora_delta(HG, BG, BG_OUT, rt, rn, T, width, rg, s_hg0, s_hg1, s_bg0, s_bg1, dtype, BRG, IEEE,
                         WRITE_BG)
        g = (tl.load(G + offs, mask=ok, other=0.0).to(tl.float32) + dg).to(dtype)
        tl.store(G + offs, g, mask=ok)
        du = _lora_delta(HU, BU, BU_OUT, rt, rn, T, width, ru, s_hu0, s_hu1, s_bu0, s_bu1, dtype, BRU, IEEE,
                         WRITE_BU)
        u = (tl.load(U + offs, mask=ok, other=0.0).to(tl.float32) + du).to(dtype)
        tl.store(U + offs, u, mask=ok)
        a, _ = _act_and_grad(g.to(tl.float32), ACT)
        tl.store(Z + offs, (a * u.to(tl.float32)).to(dtype), mask=ok)

    @triton.jit
    def _gated_backward_kernel(DZ, G, U, DYB, A, DU, PART, T, width, r, SEED, p, mult, rows_per_split,
                               s_d0, s_d1, s_a0, s_a1, ACT: tl.constexpr, DROPOUT: tl.constexpr,
                               BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr):
        # For rows t of this split and columns n of this block (DZ, G, U, DU contiguous (T, width)):
        #   with DROPOUT, first DZ += mult·keep(t, n)·(DYB·A)[t, n] (LoRA's share of dz);
        #   DU = DZ·act(G);  DZ <- DZ·U·act'(G)  (dg, in place);
        #   PART[split, :, n] = mult · Σ_t DYB[t, :]ᵀ · keep(t, n)·act(G[t, n])·U[t, n]
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        acc = tl.zeros((BR, BN), dtype=tl.float32)
        if DROPOUT:
            seed = tl.load(SEED)
            a_t = tl.load(A + rr[:, None] * s_a0 + rn[None, :] * s_a1, mask=(rr[:, None] < r) & (rn[None, :] < width),
                          other=0.0)  # (BR, BN)
        t_start = split * rows_per_split
        for t0 in range(t_start, t_start + rows_per_split, BT):
            rt = t0 + tl.arange(0, BT)
            t_ok = rt < T
            ok = t_ok[:, None] & (rn[None, :] < width)
            offs = rt[:, None].to(tl.int64) * width + rn[None, :]
            d = tl.load(DYB + rt[:, None] * s_d0 + rr[None, :] * s_d1, mask=t_ok[:, None] & (rr[None, :] < r),
                        other=0.0)  # (BT, BR)
            dz = tl.load(DZ + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
            a, da = _act_and_grad(g, ACT)
            z = (a * u).to(G.dtype.element_ty)  # the forward's z, rounded as it was there
            if DROPOUT:
                keep = _keep(seed, rt, pid_n * BN, width, p, BT, BN)
                if IEEE:
                    prod = tl.dot(d, a_t, input_precision="ieee")
                else:
                    prod = tl.dot(d, a_t)
                dz += tl.where(keep, prod * mult, 0.0)
                z = tl.where(keep, z, 0.0).to(G.dtype.element_ty)
            tl.store(DU + offs, (dz * a).to(DU.dtype.element_ty), mask=ok)
            tl.store(DZ + offs, (dz * u * da).to(DZ.dtype.element_ty), mask=ok)
            if IEEE:
                acc += tl.dot(tl.trans(d), z, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(d), z)
        out = PART + split * r * width + rr[:, None] * width + rn[None, :]
        tl.store(out, acc * mult, mask=(rr[:, None] < r) & (rn[None, :] < width))

    @triton.jit
    def _masked_backward_kernel(DX, X, DYB, A, PART, T, n_in, r, SEED, p, mult, rows_per_split,
                                s_dx0, s_dx1, s_x0, s_x1, s_d0, s_d1, s_a0, s_a1,
                                BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr):
        # Both dropout terms of a LoRA layer's backward from one mask per tile, mult = s/(1-p):
        #   DX[t, n] += mult·keep(t, n)·(DYB·A)[t, n];
        #   PART[split, :, n] = mult · Σ_{t in split} DYB[t, :]ᵀ · keep(t, n)·X[t, n]
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        seed = tl.load(SEED)
        a_t = tl.load(A + rr[:, None] * s_a0 + rn[None, :] * s_a1, mask=(rr[:, None] < r) & (rn[None, :] < n_in),
                      other=0.0)  # (BR, BN)
        acc = tl.zeros((BR, BN), dtype=tl.float32)
        t_start = split * rows_per_split
        for t0 in range(t_start, t_start + rows_per_split, BT):
            rt = t0 + tl.arange(0, BT)
            t_ok = rt < T
            ok = t_ok[:, None] & (rn[None, :] < n_in)
            d = tl.load(DYB + rt[:, None] * s_d0 + rr[None, :] * s_d1, mask=t_ok[:, None] & (rr[None, :] < r),
                        other=0.0)  # (BT, BR)
            keep = _keep(seed, rt, pid_n * BN, n_in, p, BT, BN)
            if IEEE:
                prod = tl.dot(d, a_t, input_precision="ieee")
            else:
                prod = tl.dot(d, a_t)
            ptr = DX + rt[:, None] * s_dx0 + rn[None, :] * s_dx1
            dx = tl.load(ptr, mask=ok, other=0.0).to(tl.float32) + tl.where(keep, prod * mult, 0.0)
            tl.store(ptr, dx.to(DX.dtype.element_ty), mask=ok)
            x = tl.load(X + rt[:, None] * s_x0 + rn[None, :] * s_x1, mask=ok, other=0.0)
            x = tl.where(keep, x, 0.0).to(X.dtype.element_ty)
            if IEEE:
                acc += tl.dot(tl.trans(d), x, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(d), x)
        out = PART + split * r * n_in + rr[:, None] * n_in + rn[None, :]
        tl.store(out, acc * mult, mask=(rr[:, None] < r) & (rn[None, :] < n_in))

    @triton.jit
    def _masked_terms(DYB, r, SEED, p, a_t, x, rt, t_ok, c0, n_in, BT: tl.constexpr, BN: tl.constexpr,
                      BR: tl.constexpr, IEEE: tl.constexpr):
        # One layer's dropout terms on a (BT, BN) tile of its input x: (keep·(DYB·A), DYBᵀ·(keep·x)),
        # both unscaled; DYB (T, r) contiguous, a_t the (BR, BN) tile of A.
        rr = tl.arange(0, BR)
        d = tl.load(DYB + rt[:, None] * r + rr[None, :], mask=t_ok[:, None] & (rr[None, :] < r), other=0.0)
        keep = _keep(tl.load(SEED), rt, c0, n_in, p, BT, BN)
        if IEEE:
            prod = tl.dot(d, a_t, input_precision="ieee")
        else:
            prod = tl.dot(d, a_t)
        xm = tl.where(keep, x, 0.0).to(x.dtype)
        if IEEE:
            grad = tl.dot(tl.trans(d), xm, input_precision="ieee")
        else:
            grad = tl.dot(tl.trans(d), xm)
        return tl.where(keep, prod, 0.0), grad

    @triton.jit
    def _load_a_tile(A, r, rn, n_in, BR: tl.constexpr):
        rr = tl.arange(0, BR)
        return tl.load(A + rr[:, None] * n_in + rn[None, :], mask=(rr[:, None] < r) & (rn[None, :] < n_in), other=0.0)

    @triton.jit
    def _masked_backward_siblings_kernel(DX, X, T, n_in, rows_per_split, s_dx0, s_dx1, s_x0, s_x1,
                                         DYB0, A0, PART0, SEED0, p0, mult0, r0,
                                         DYB1, A1, PART1, SEED1, p1, mult1, r1,
                                         DYB2, A2, PART2, SEED2, p2, mult2, r2,
                                         N: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                                         IEEE: tl.constexpr):
        # `_masked_backward_kernel` for N = 2 or 3 layers reading one input x, each with its own
        # mask: one read-modify-write of DX and one read of X for all of them.
        #   DX[t, n] += Σ_l mult_l·keep_l(t, n)·(DYB_l·A_l)[t, n];
        #   PART_l[split, :, n] = mult_l · Σ_{t in split} DYB_l[t, :]ᵀ · keep_l(t, n)·X[t, n]
        # DYB_l (T, r_l) and A_l (r_l, in) contiguous.
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rn = pid_n * BN + tl.arange(0, BN)
        c0 = pid_n * BN
        a0 = _load_a_tile(A0, r0, rn, n_in, BR)
        a1 = _load_a_tile(A1, r1, rn, n_in, BR)
        acc0 = tl.zeros((BR, BN), dtype=tl.float32)
        acc1 = tl.zeros((BR, BN), dtype=tl.float32)
        if N == 3:
            a2 = _load_a_tile(A2, r2, rn, n_in, BR)
            acc2 = tl.zeros((BR, BN), dtype=tl.float32)
        t_start = split * rows_per_split
        for t0 in range(t_start, t_start + rows_per_split, BT):
            rt = t0 + tl.arange(0, BT)
            t_ok = rt < T
            ok = t_ok[:, None] & (rn[None, :] < n_in)
            x = tl.load(X + rt[:, None] * s_x0 + rn[None, :] * s_x1, mask=ok, other=0.0)
            share, grad = _masked_terms(DYB0, r0, SEED0, p0, a0, x, rt, t_ok, c0, n_in, BT, BN, BR, IEEE)
            delta = share * mult0
            acc0 += grad
            share, grad = _masked_terms(DYB1, r1, SEED1, p1, a1, x, rt, t_ok, c0, n_in, BT, BN, BR, IEEE)
            delta += share * mult1
            acc1 += grad
            if N == 3:
                share, grad = _masked_terms(DYB2, r2, SEED2, p2, a2, x, rt, t_ok, c0, n_in, BT, BN, BR, IEEE)
                delta += share * mult2
                acc2 += grad
            ptr = DX + rt[:, None] * s_dx0 + rn[None, :] * s_dx1
            dx = tl.load(ptr, mask=ok, other=0.0).to(tl.float32) + delta
            tl.store(ptr, dx.to(DX.dtype.element_ty), mask=ok)
        rr = tl.arange(0, BR)
        tl.store(PART0 + split * r0 * n_in + rr[:, None] * n_in + rn[None, :], acc0 * mult0,
                 mask=(rr[:, None] < r0) & (rn[None, :] < n_in))
        tl.store(PART1 + split * r1 * n_in + rr[:, None] * n_in + rn[None, :], acc1 * mult1,
                 mask=(rr[:, None] < r1) & (rn[None, :] < n_in))
        if N == 3:
            tl.store(PART2 + split * r2 * n_in + rr[:, None] * n_in + rn[None, :], acc2 * mult2,
                     mask=(rr[:, None] < r2) & (rn[None, :] < n_in))


def _row_splits(T: int, width: int, bt: int, bn: int, programs: int) -> tuple[int, int, int]:
    """(column blocks, row splits, rows per split) for kernels that reduce over rows: about
    `programs` programs in all, so the grid fills the GPU; partial sums are added with torch."""
    n_blocks = cdiv(width, bn)
    splits = max(1, min(cdiv(T, bt), programs // max(1, n_blocks)))
    rows = cdiv(cdiv(T, splits), bt) * bt
    return n_blocks, cdiv(T, rows), rows


def gated_act(g: Tensor, u: Tensor, act: str) -> Tensor:
    """act(g) ⊙ u in one pass, computed in float32 and rounded once; g and u contiguous, same shape."""
    z = torch.empty_like(g)
    n = g.numel()
    block = 1024
    _gated_act_kernel[(cdiv(n, block),)](g, u, z, n, ACT=GATED_KERNEL_ACTS[act], BLOCK=block)
    return z


# The folded expand-and-activate kernel's tile (benchmarks/micro_lora_ops.py --gated times it).
GATED_ACT_LORA_CONFIG = {"BT": 32, "BN": 128, "num_warps": 4}


def gated_act_lora_(g: Tensor, u: Tensor, hg: Tensor, lora_Bg: Tensor, hu: Tensor, lora_Bu: Tensor, act: str,
                    bg_out: Tensor | None = None, bu_out: Tensor | None = None) -> Tensor:
    """act(g + hg·Bgᵀ) ⊙ (u + hu·Buᵀ) in one pass, with g and u updated in place to the sums.

    g, u: contiguous (T, width) of one dtype, the base GEMMs' outputs of gate and up; hg (T, rg)
    and hu (T, ru) their scaled shrinks in that dtype; Bg (width, rg), Bu (width, ru) in any
    dtype, rounded to g's as they are read (`bg_out` / `bu_out`, contiguous tensors of B's shape
    in g's dtype, if given receive the rounded copies). The arithmetic of `expand_add_` on g and
    on u followed by `gated_act`, with two reads and two writes of a (T, width) tensor fewer.
    """
    T, width = g.shape
    z = torch.empty_like(g)
    cfg = GATED_ACT_LORA_CONFIG
    grid = (cdiv(T, cfg["BT"]), cdiv(width, cfg["BN"]))
    _gated_act_lora_kernel[grid](
        g, u, z, hg, lora_Bg, hu, lora_Bu, g if bg_out is None else bg_out, u if bu_out is None else bu_out, T, width,
        hg.shape[1], hu.shape[1], hg.stride(0), hg.stride(1), lora_Bg.stride(0), lora_Bg.stride(1), hu.stride(0),
        hu.stride(1), lora_Bu.stride(0), lora_Bu.stride(1), ACT=GATED_KERNEL_ACTS[act], BRG=_br(hg.shape[1]),
        BRU=_br(hu.shape[1]), IEEE=_ieee(g), WRITE_BG=bg_out is not None, WRITE_BU=bu_out is not None, **cfg)
    return z


# Tile rows and columns, warps, and about how many programs to split the rows over
# (benchmarks/micro_lora_ops.py --gated times the choices). The dropout variant has its own
# entry: at the other's tile it needs about twice the registers (187 a thread at BT=32, BN=64,
# 4 warps, compiled for sm_90 by Triton 3.6, against 96 without dropout), which caps it at 8
# resident warps a multiprocessor (benchmarks/kernel_resources.py); at half the rows it needs
# 105 (16 warps) and took 0.417 against 0.544 ms on an H200 (8192 × 8192, benchmarks/RESULTS.md).
GATED_BACKWARD_CONFIG = {"BT": 32, "BN": 64, "num_warps": 4, "programs": 4096}
GATED_BACKWARD_DROPOUT_CONFIG = {"BT": 16, "BN": 64, "num_warps": 4, "programs": 8192}
GATED_BACKWARD_DROPOUT_WIDE_CONFIG = {"BT": 32, "BN": 64, "num_warps": 8, "programs": 2048}  # rank >= WIDE_RANK


def gated_backward_config(r: int, dropout: bool) -> dict:
    """The tile `gated_backward` uses at rank r (the dict itself: tuning scripts update it)."""
    if not dropout:
        return GATED_BACKWARD_CONFIG
    return GATED_BACKWARD_DROPOUT_WIDE_CONFIG if _br(r) >= WIDE_RANK else GATED_BACKWARD_DROPOUT_CONFIG


def gated_backward(dz: Tensor, g: Tensor, u: Tensor, dyb: Tensor, act: str, scale: float, p: float = 0.0,
                   seed: int | Tensor | None = None, lora_A: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dg, du, dA) for z = act(g) ⊙ u feeding a LoRA layer, from dz = ∂L/∂z.

    dz, g, u: contiguous (T, width) of one dtype; dyb = dy·B (T, r). dA = s·dybᵀ·dropout(z)
    (r, width) comes out in float32, with z recomputed as `gated_act` makes it and the
    dropout mask regenerated from `seed`. With dropout, dz is the base layer's share alone
    and lora_A (r, width), in dz's dtype, is required: the kernel adds the LoRA share
    s·(dyb·A)⊙mask/(1-p) with the same mask. dg is written over dz (which is returned as dg).
    """
    T, width = g.shape
    r = dyb.shape[1]
    dropout = bool(p)
    if dropout and lora_A is None:
        raise ValueError("gated_backward with dropout needs lora_A to add the LoRA share of dz")
    du = torch.empty_like(u)
    cfg = gated_backward_config(r, dropout)
    bt, bn, warps, programs = (cfg[k] for k in ("BT", "BN", "num_warps", "programs"))
    n_blocks, splits, rows = _row_splits(T, width, bt, bn, programs)
    part = torch.empty(splits, r, width, dtype=torch.float32, device=g.device)
    seed_t = seed_tensor(seed, g.device) if dropout else part  # unread without dropout
    a = lora_A if dropout else dyb  # unread without dropout
    _gated_backward_kernel[(n_blocks, splits)](
        dz, g, u, dyb, a, du, part, T, width, r, seed_t, float(p), scale / (1.0 - p), rows, dyb.stride(0),
        dyb.stride(1), a.stride(0), a.stride(1), ACT=GATED_KERNEL_ACTS[act], DROPOUT=dropout, BT=bt, BN=bn,
        BR=_br(r), IEEE=_ieee(g), num_warps=warps)
    return dz, du, part.sum(0) if splits > 1 else part[0]


def masked_backward_(dx: Tensor, x2: Tensor, dyb: Tensor, lora_A: Tensor, scale: float, p: float,
                     seed: int | Tensor) -> Tensor:
    """A dropout LoRA layer's two backward terms from one mask: dx += s·(dyB·A)⊙mask/(1-p) in
    place, and returns dA = s·dyBᵀ·(x⊙mask)/(1-p) in float32. dx, x2 (T, in); dyb (T, r); A (r, in)."""
    T, n_in = x2.shape
    r = dyb.shape[1]
    cfg = masked_backward_config(r)
    n_blocks, splits, rows = _row_splits(T, n_in, cfg["BT"], cfg["BN"], cfg["programs"])
    part = torch.empty(splits, r, n_in, dtype=torch.float32, device=x2.device)
    _masked_backward_kernel[(n_blocks, splits)](
        dx, x2, dyb, lora_A, part, T, n_in, r, seed_tensor(seed, x2.device), p, scale / (1.0 - p), rows,
        dx.stride(0), dx.stride(1), x2.stride(0), x2.stride(1), dyb.stride(0), dyb.stride(1), lora_A.stride(0),
        lora_A.stride(1), BT=cfg["BT"], BN=cfg["BN"], BR=_br(r), IEEE=_ieee(x2), num_warps=cfg["num_warps"])
    return part.sum(0) if splits > 1 else part[0]


# The siblings' pass at two and at three layers (benchmarks/micro_lora_ops.py --siblings times the
# choices). On an H200 at T = 8192, in = 2048, r = 16 (benchmarks/RESULTS.md, twelfth set): two layers
# 0.073 ms against 0.088 for two `masked_backward_`s; three 0.111 against 0.132.
MASKED_SIBLINGS_CONFIG = {2: {"BT": 32, "BN": 64, "num_warps": 4, "programs": 2048},
                          3: {"BT": 32, "BN": 128, "num_warps": 4, "programs": 1024}}


def masked_backward_siblings_(dx: Tensor, x2: Tensor, terms: list[tuple[Tensor, Tensor, float, float, Tensor]]
                              ) -> list[Tensor]:
    """`masked_backward_` for two or three layers that read one input x, in one pass over dx and x:
    dx += Σ s·(dyB·A)⊙mask/(1-p) in place, and returns each layer's dA = s·dyBᵀ·(x⊙mask)/(1-p) in
    float32. terms: (dyb (T, r), A (r, in) in x's dtype, s, p, seed) a layer, p > 0; the ranks may differ,
    up to SIBLINGS_MAX_RANK."""
    T, n_in = x2.shape
    n = len(terms)
    _check_siblings("masked_backward_siblings_", [t[1].shape[0] for t in terms])
    cfg = MASKED_SIBLINGS_CONFIG[n]
    n_blocks, splits, rows = _row_splits(T, n_in, cfg["BT"], cfg["BN"], cfg["programs"])
    args, parts = [], []
    for dyb, lora_A, scale, p, seed in terms:
        part = torch.empty(splits, lora_A.shape[0], n_in, dtype=torch.float32, device=x2.device)
        parts.append(part)
        args += [dyb.contiguous(), lora_A.contiguous(), part, seed_tensor(seed, x2.device), p, scale / (1.0 - p),
                 lora_A.shape[0]]
    args += args[:7] * (3 - n)  # the third slot, unread at n = 2
    br = _br(max(t[1].shape[0] for t in terms))
    _masked_backward_siblings_kernel[(n_blocks, splits)](
        dx, x2, T, n_in, rows, dx.stride(0), dx.stride(1), x2.stride(0), x2.stride(1), *args, N=n, BT=cfg["BT"],
        BN=cfg["BN"], BR=br, IEEE=_ieee(x2), num_warps=cfg["num_warps"])
    return [part.sum(0) if splits > 1 else part[0] for part in parts[:n]]
