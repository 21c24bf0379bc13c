"""Mixed-adapter LoRA for inference: one forward where each batch row uses its own adapter or none.

The adapters of a layer are stacked into padded tables (`stack_adapters`); each batch row
names its adapter by index into them, or -1 for the base layer alone. Tokens are row-major:
row b owns tokens b·seq .. b·seq + seq - 1. The LoRA branch is two kernels, each one launch
for all adapters with no host sync, and the base GEMM adds onto the second one's output:

    h = lora_shrink(x2, a_stack, row_adapter, seq)              # (T, R) float32: x·Aᵀ
    E = lora_expand(h, b_stack, row_adapter, seq, bias, dtype)  # (T, out): h·(s·B)ᵀ + bias
    y = E.addmm_(x2, weight.T)                                  # cuBLAS reads E in its epilogue

The kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1 once
`fused.use_kernels_on_cpu(True)` is set; elsewhere, and for dtypes or ranks the kernels do
not take, the `*_torch` functions compute the same. Gradients do not flow through the kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lorakit.ops import fused
from lorakit.ops import triton_kernels as tk
from lorakit.ops.triton_kernels import triton

if triton is not None:
    import triton.language as tl

SHRINK_BLOCK_K = 128  # `in` columns per shrink step (BLOCK_K)
EXPAND_BLOCK_N = 128  # output columns per expand program (BLOCK_N)
MIN_BLOCK_T, MAX_BLOCK_T = 16, 64  # tokens per program: 16 for decode (seq = 1), up to 64 for long rows
EXPAND_TILE_ELEMENTS = 4096  # caps BLOCK_N·R of the expand's Bᵀ tile: BLOCK_N shrinks for ranks above 32
SHRINK_STAGES = 4  # pipeline depth of the shrink's `in` loop (on an H100, 4 beat 3 by up to 25% at decode)
SHRINK_SMEM_BYTES = 80 * 1024  # the shrink's staged x and Aᵀ tiles; BLOCK_K halves until they fit
NUM_WARPS = 4
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _padded_rank(r: int) -> int:
    """max(16, the next power of two >= r): the kernels' rank tile."""
    return max(16, tk.next_power_of_2(r))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def stack_adapters(a_list: Sequence[Tensor], b_list: Sequence[Tensor], scales: Sequence[float],
                   dtype: torch.dtype, device: torch.device | str) -> tuple[Tensor, Tensor, int]:
    """Stack N adapters of possibly different ranks into padded tables.

    a_list[i]: (r_i, in), b_list[i]: (out, r_i), scales[i]: float. Returns a_stack (N, R, in),
    b_stack (N, out, R) with B multiplied by its scale (in float32 or wider, rounded once to `dtype`),
    and R = max(16, next power of two >= max r_i). Rows and columns beyond r_i are zero, so
    the padding adds nothing to any product.
    """
    n = len(a_list)
    if n == 0 or len(b_list) != n or len(scales) != n:
        raise ValueError("expected equal, non-zero numbers of A factors, B factors and scales; "
                         f"found {len(a_list)}, {len(b_list)} and {len(scales)}")
    n_in, n_out = a_list[0].shape[-1], b_list[0].shape[0]
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] < 1 or a.shape[1] != n_in or b.shape != (n_out, a.shape[0]):
            raise ValueError(f"adapter {i}: expected A (r, {n_in}) and B ({n_out}, r) with the same r >= 1; "
                             f"found A {tuple(a.shape)} and B {tuple(b.shape)}")
    R = _padded_rank(max(a.shape[0] for a in a_list))
    a_stack = torch.zeros(n, R, n_in, dtype=dtype, device=device)
    b_stack = torch.zeros(n, n_out, R, dtype=dtype, device=device)
    for i, (a, b, scale) in enumerate(zip(a_list, b_list, scales)):
        r = a.shape[0]
        a_stack[i, :r] = a
        b_stack[i, :, :r] = b.to(device=device, dtype=_acc_dtype(b.dtype)) * float(scale)
    return a_stack, b_stack, R


def kernels_usable(t: Tensor, rank: int = MIN_BLOCK_T) -> bool:
    """Whether the kernels take tensors like `t` (the dtype that feeds tl.dot) at padded rank `rank`.

    Like `fused._kernels`: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 while
    `fused.use_kernels_on_cpu(True)` is on; float16, bfloat16 (CUDA only: the interpreter
    does not model it) or float32; rank a power of two >= 16.
    """
    on_device = t.is_cuda or (fused._KERNELS_ON_CPU and t.dtype != torch.bfloat16)
    return (tk.triton_usable(t) and on_device and t.dtype in KERNEL_DTYPES
            and rank >= MIN_BLOCK_T and rank & (rank - 1) == 0)


# -- checks --------------------------------------------------------------------------------


def _check_tokens(name: str, t: Tensor, row_adapter: Tensor, seq: int) -> None:
    """t (T, ·) with T = n_rows·seq, and row_adapter (n_rows,) int32 on t's device."""
    if row_adapter.dim() != 1 or row_adapter.dtype != torch.int32 or row_adapter.device != t.device:
        raise ValueError(f"row_adapter: expected a 1-D int32 tensor on {t.device}; found shape "
                         f"{tuple(row_adapter.shape)}, {row_adapter.dtype} on {row_adapter.device}")
    n_rows = row_adapter.shape[0]
    if t.dim() != 2 or seq < 1 or t.shape[0] != n_rows * seq:
        raise ValueError(f"{name}: expected shape (n_rows·seq, ·) = ({n_rows}·{seq}, ·) with seq >= 1; "
                         f"found {tuple(t.shape)} with seq = {seq}")


def _check_table(name: str, table: Tensor, expected: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """table (N >= 1, ·, ·) matching `expected` where it is not None, in `dtype` on `device`."""
    ok = (table.dim() == 3 and table.shape[0] >= 1 and table.dtype == dtype and table.device == device
          and all(e is None or e == s for e, s in zip(expected, table.shape[1:])))
    if not ok:
        want = ", ".join("·" if e is None else str(e) for e in expected)
        raise ValueError(f"{name}: expected shape (N >= 1, {want}), {dtype} on {device}; "
                         f"found {tuple(table.shape)}, {table.dtype} on {table.device}")


def _check_h(h: Tensor, b_stack: Tensor, row_adapter: Tensor, seq: int) -> None:
    _check_tokens("h", h, row_adapter, seq)
    if h.shape[1] > 1 and h.stride(1) != 1:
        raise ValueError(f"h: expected unit column stride; found strides {h.stride()}")
    if h.dtype != _acc_dtype(b_stack.dtype):
        raise ValueError(f"h: expected {_acc_dtype(b_stack.dtype)} as lora_shrink returns it for "
                         f"{b_stack.dtype} tables; found {h.dtype}")
    _check_table("b_stack", b_stack, (None, h.shape[1]), b_stack.dtype, h.device)


# -- torch path: the CPU path and the kernels' cross-check -----------------------------------


def lora_shrink_torch(x2: Tensor, a_stack: Tensor, row_adapter: Tensor, seq: int) -> Tensor:
    """`lora_shrink` in torch: h (T, R) in float32 (float64 for float64 inputs)."""
    n_rows = row_adapter.shape[0]
    acc = _acc_dtype(x2.dtype)
    a = a_stack.index_select(0, row_adapter.clamp_min(0)).to(acc)  # (n_rows, R, in); -1 reads table 0
    h = torch.bmm(x2.reshape(n_rows, seq, -1).to(acc), a.transpose(1, 2))  # (n_rows, seq, R)
    h.masked_fill_((row_adapter < 0)[:, None, None], 0.0)
    return h.reshape(n_rows * seq, -1)


def lora_expand_torch(h: Tensor, b_stack: Tensor, row_adapter: Tensor, seq: int, bias: Tensor | None,
                      out_dtype: torch.dtype) -> Tensor:
    """`lora_expand` in torch: E (T, out) in out_dtype."""
    n_rows = row_adapter.shape[0]
    b = b_stack.index_select(0, row_adapter.clamp_min(0)).to(h.dtype)  # (n_rows, out, R)
    # h is rounded to B's dtype first, as the kernel feeds it to tl.dot.
    e = torch.bmm(h.to(b_stack.dtype).to(h.dtype).reshape(n_rows, seq, -1), b.transpose(1, 2))  # (n_rows, seq, out)
    e.masked_fill_((row_adapter < 0)[:, None, None], 0.0)
    if bias is not None:
        e += bias.to(h.dtype)
    return e.reshape(n_rows * seq, -1).to(out_dtype)


def lora_expand_add_torch(y2: Tensor, h: Tensor, b_stack: Tensor, row_adapter: Tensor, seq: int) -> Tensor:
    """`lora_expand_add_` in torch: y2 (T, out) += h·Bᵀ, rounded once to y2's dtype."""
    return y2.copy_(y2 + lora_expand_torch(h, b_stack, row_adapter, seq, None, h.dtype))


# -- Triton kernels --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _dot_acc(acc, x, a, IEEE: tl.constexpr):
        if IEEE:
            return acc + tl.dot(x, a, input_precision="ieee")
        return acc + tl.dot(x, a)

    @triton.jit
    def _shrink_kernel(X, A0, A1, A2, ROWS, H, seq, n_in, s_x0, s_x1, s_a0, s_a1, s_a2,
                       MEMBERS: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                       IEEE: tl.constexpr):
        # H[t, m·R:(m + 1)·R] = X[t, :]·A_m[a]ᵀ for BT tokens of one row and the MEMBERS tables
        # A0, A1, A2 (one shape and strides), a = ROWS[row]; zeros where a = -1. Each x tile is
        # read once for all members.
        row = tl.program_id(0)
        rt = tl.program_id(1) * BT + tl.arange(0, BT)  # token within the row
        tok = row.to(tl.int64) * seq + rt  # (BT,) token index into X and H
        t_ok = rt < seq
        rr = tl.arange(0, R)
        adapter = tl.load(ROWS + row)
        acc0 = tl.zeros((BT, R), dtype=tl.float32)
        acc1 = tl.zeros((BT, R), dtype=tl.float32)
        acc2 = tl.zeros((BT, R), dtype=tl.float32)
        if adapter >= 0:
            a_off = adapter.to(tl.int64) * s_a0
            for k0 in range(0, n_in, BK):
                rk = k0 + tl.arange(0, BK)
                k_ok = rk < n_in
                x = tl.load(X + tok[:, None] * s_x0 + rk[None, :] * s_x1, mask=t_ok[:, None] & k_ok[None, :],
                            other=0.0)  # (BT, BK)
                a_idx = a_off + rr[None, :] * s_a1 + rk[:, None] * s_a2  # (BK, R): the Aᵀ tile
                acc0 = _dot_acc(acc0, x, tl.load(A0 + a_idx, mask=k_ok[:, None], other=0.0), IEEE)
                if MEMBERS >= 2:
                    acc1 = _dot_acc(acc1, x, tl.load(A1 + a_idx, mask=k_ok[:, None], other=0.0), IEEE)
                if MEMBERS >= 3:
                    acc2 = _dot_acc(acc2, x, tl.load(A2 + a_idx, mask=k_ok[:, None], other=0.0), IEEE)
        h_ptr = H + tok[:, None] * (MEMBERS * R) + rr[None, :]
        tl.store(h_ptr, acc0, mask=t_ok[:, None])
        if MEMBERS >= 2:
            tl.store(h_ptr + R, acc1, mask=t_ok[:, None])
        if MEMBERS >= 3:
            tl.store(h_ptr + 2 * R, acc2, mask=t_ok[:, None])

    @triton.jit
    def _expand_tile(H, B, adapter, tok, t_ok, rn, n_out, s_h0, h_col, s_b0, s_b1, s_b2, R: tl.constexpr,
                     IEEE: tl.constexpr):
        # (BT, BN) float32 = H[tok, h_col:h_col + R]·B[adapter][rn, :]ᵀ, with H rounded to B's dtype.
        rr = tl.arange(0, R)
        h = tl.load(H + tok[:, None] * s_h0 + h_col + rr[None, :], mask=t_ok[:, None],
                    other=0.0).to(B.dtype.element_ty)
        b = tl.load(B + adapter.to(tl.int64) * s_b0 + rn[None, :] * s_b1 + rr[:, None] * s_b2,
                    mask=rn[None, :] < n_out, other=0.0)  # (R, BN) = Bᵀ tile
        if IEEE:
            acc = tl.dot(h, b, input_precision="ieee")
        else:
            acc = tl.dot(h, b)
        return acc

    @triton.jit
    def _expand_kernel(H, B, ROWS, BIAS, OUT, seq, n_out, s_h0, s_b0, s_b1, s_b2, s_o0, s_o1,
                       HAS_BIAS: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                       IEEE: tl.constexpr):
        # OUT[t, n] = H[t, :]·B[a][n, :] + BIAS[n] on one (row, token block, column block); BIAS alone where a = -1.
        row = tl.program_id(0)
        rt = tl.program_id(1) * BT + tl.arange(0, BT)
        rn = tl.program_id(2) * BN + tl.arange(0, BN)
        tok = row.to(tl.int64) * seq + rt
        t_ok = rt < seq
        adapter = tl.load(ROWS + row)
        acc = tl.zeros((BT, BN), dtype=tl.float32)
        if adapter >= 0:
            acc = _expand_tile(H, B, adapter, tok, t_ok, rn, n_out, s_h0, 0, s_b0, s_b1, s_b2, R, IEEE)
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=rn < n_out, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + tok[:, None] * s_o0 + rn[None, :] * s_o1, acc.to(OUT.dtype.element_ty),
                 mask=t_ok[:, None] & (rn[None, :] < n_out))

    @triton.jit
    def _expand_add_kernel(H, B, ROWS, Y, seq, n_out, s_h0, s_b0, s_b1, s_b2, s_y0, s_y1,
                           R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
        # Y[t, n] += H[t, :]·B[a][n, :] on one (row, token block, column block); nothing where a = -1.
        row = tl.program_id(0)
        rt = tl.program_id(1) * BT + tl.arange(0, BT)
        rn = tl.program_id(2) * BN + tl.arange(0, BN)
        tok = row.to(tl.int64) * seq + rt
        t_ok = rt < seq
        adapter = tl.load(ROWS + row)
        if adapter >= 0:
            ok = t_ok[:, None] & (rn[None, :] < n_out)
            ptr = Y + tok[:, None] * s_y0 + rn[None, :] * s_y1
            acc = _expand_tile(H, B, adapter, tok, t_ok, rn, n_out, s_h0, 0, s_b0, s_b1, s_b2, R, IEEE)
            acc += tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
            tl.store(ptr, acc.to(Y.dtype.element_ty), mask=ok)


def _block_t(seq: int) -> int:
    return min(MAX_BLOCK_T, max(MIN_BLOCK_T, 1 << (seq - 1).bit_length()))


def _shrink_block_k(bt: int, R: int, elem_bytes: int) -> int:
    """The largest BLOCK_K <= SHRINK_BLOCK_K (and >= 16) whose SHRINK_STAGES x and Aᵀ tiles fit
    SHRINK_SMEM_BYTES (R: the columns of all the Aᵀ tiles a program reads)."""
    bk = SHRINK_BLOCK_K
    while bk > 16 and (bt + R) * bk * elem_bytes * SHRINK_STAGES > SHRINK_SMEM_BYTES:
        bk //= 2
    return bk


def _expand_grid(n_rows: int, seq: int, n_out: int, R: int) -> tuple[tuple[int, int, int], int, int]:
    bt, bn = _block_t(seq), min(EXPAND_BLOCK_N, max(16, EXPAND_TILE_ELEMENTS // R))
    return (n_rows, tk.cdiv(seq, bt), tk.cdiv(n_out, bn)), bt, bn


# -- the ops ---------------------------------------------------------------------------------


def lora_shrink(x2: Tensor, a_stack: Tensor, row_adapter: Tensor, seq: int, check: bool = True) -> Tensor:
    """h (T, R) float32: h[t] = x2[t]·a_stack[row_adapter[t // seq]]ᵀ, zero where row_adapter is -1.

    x2 (T, in) with T = n_rows·seq (row b owns tokens b·seq .. b·seq + seq - 1); a_stack
    (N, R, in) in x2's dtype; row_adapter (n_rows,) int32 on x2's device, values in [-1, N)
    (not checked: that would need a host sync). float64 inputs give a float64 h. `check=False`
    skips the argument checks, for callers that checked the same tables and shapes before.
    """
    return lora_shrink_group(x2, [a_stack], row_adapter, seq, check)


def lora_shrink_group(x2: Tensor, a_stacks: Sequence[Tensor], row_adapter: Tensor, seq: int,
                      check: bool = True) -> Tensor:
    """`lora_shrink` of several layers fed the same x2 (q/k/v, gate/up), one pass over x2:
    h (T, M·R) whose columns m·R .. (m + 1)·R - 1 are `lora_shrink(x2, a_stacks[m], ...)`.

    The M <= GROUP_MAX_MEMBERS tables share one shape (N, R, in) and dtype, each contiguous.
    """
    m = len(a_stacks)
    if check:
        _check_tokens("x2", x2, row_adapter, seq)
        if not 1 <= m <= GROUP_MAX_MEMBERS:
            raise ValueError(f"expected 1 to {GROUP_MAX_MEMBERS} A tables; found {m}")
        for i, a in enumerate(a_stacks):
            _check_table(f"a_stack {i}" if m > 1 else "a_stack", a, (None, x2.shape[1]), x2.dtype, x2.device)
            if m > 1 and (a.shape != a_stacks[0].shape or not a.is_contiguous()):
                raise ValueError(f"a_stack {i}: expected a contiguous table of a_stack 0's shape "
                                 f"{tuple(a_stacks[0].shape)}; found {tuple(a.shape)}")
    if not kernels_usable(x2, a_stacks[0].shape[1]):
        hs = [lora_shrink_torch(x2, a, row_adapter, seq) for a in a_stacks]
        return hs[0] if m == 1 else torch.cat(hs, dim=1)
    return _Shrink(x2, a_stacks, row_adapter, seq)(x2)


def lora_expand(h: Tensor, b_stack: Tensor, row_adapter: Tensor, seq: int, bias: Tensor | None,
                out_dtype: torch.dtype, check: bool = True) -> Tensor:
    """E (T, out) in out_dtype: E[t] = h[t]·b_stack[a]ᵀ + bias with a = row_adapter[t // seq].

    Rows whose adapter is -1 get the bias alone (zeros if bias is None). h (T, R) as
    `lora_shrink` returns it (or a column block of a wider h: its row stride may exceed R);
    b_stack (N, out, R), already scaled; bias (out,) or None. `check=False` as for `lora_shrink`.
    """
    if check:
        _check_h(h, b_stack, row_adapter, seq)
    n_out, R = b_stack.shape[1], b_stack.shape[2]
    if check and bias is not None and (bias.shape != (n_out,) or bias.device != h.device):
        raise ValueError(f"bias: expected shape ({n_out},) on {h.device}; found {tuple(bias.shape)} on {bias.device}")
    if not kernels_usable(b_stack, R):
        return lora_expand_torch(h, b_stack, row_adapter, seq, bias, out_dtype)
    return _Expand(h.shape[0], b_stack, row_adapter, seq, bias, out_dtype, h.device)(h)


def lora_expand_add_(y2: Tensor, h: Tensor, b_stack: Tensor, row_adapter: Tensor, seq: int,
                     check: bool = True) -> Tensor:
    """In place: y2[t] += h[t]·b_stack[a]ᵀ for tokens whose row has an adapter; returns y2 (T, out).
    `check=False` as for `lora_shrink`."""
    if check:
        _check_h(h, b_stack, row_adapter, seq)
    n_out, R = b_stack.shape[1], b_stack.shape[2]
    if check and (y2.shape != (h.shape[0], n_out) or y2.device != h.device):
        raise ValueError(f"y2: expected shape ({h.shape[0]}, {n_out}) on {h.device}; "
                         f"found {tuple(y2.shape)} on {y2.device}")
    if not kernels_usable(b_stack, R):
        return lora_expand_add_torch(y2, h, b_stack, row_adapter, seq)
    if y2.numel():
        grid, bt, bn = _expand_grid(row_adapter.shape[0], seq, n_out, R)
        _expand_add_kernel[grid](
            h, b_stack, row_adapter, y2, seq, n_out, h.stride(0), b_stack.stride(0), b_stack.stride(1),
            b_stack.stride(2), y2.stride(0), y2.stride(1), R=R, BT=bt, BN=bn, IEEE=b_stack.dtype == torch.float32,
            num_warps=NUM_WARPS)
    return y2


class _Shrink:
    """`lora_shrink_group`'s kernel launch for inputs shaped like x2, its settings worked out once:
    calling it with such an x2 returns h (T, M·R) float32."""

    def __init__(self, x2: Tensor, a_stacks: Sequence[Tensor], row_adapter: Tensor, seq: int) -> None:
        self.m, self.r = len(a_stacks), a_stacks[0].shape[1]
        self.a = [*a_stacks, *[a_stacks[0]] * (GROUP_MAX_MEMBERS - self.m)]  # unused slots repeat the first
        self.rows, self.seq, self.t, self.n_in, self.device = row_adapter, seq, x2.shape[0], x2.shape[1], x2.device
        bt = _block_t(seq)
        self.grid, self.bt = (row_adapter.shape[0], tk.cdiv(seq, bt)), bt
        self.bk = _shrink_block_k(bt, self.m * self.r, x2.element_size())
        self.ieee = x2.dtype == torch.float32

    def __call__(self, x2: Tensor) -> Tensor:
        h = torch.empty(self.t, self.m * self.r, dtype=torch.float32, device=self.device)
        if self.t:
            a = self.a[0]
            _shrink_kernel[self.grid](
                x2, *self.a, self.rows, h, self.seq, self.n_in, x2.stride(0), x2.stride(1), a.stride(0),
                a.stride(1), a.stride(2), MEMBERS=self.m, R=self.r, BT=self.bt, BK=self.bk, IEEE=self.ieee,
                num_warps=NUM_WARPS, num_stages=SHRINK_STAGES)
        return h


class _Expand:
    """`lora_expand`'s kernel launch for `t`-token inputs, its settings worked out once: calling
    it with an h (t, R) returns E (t, out) in out_dtype."""

    def __init__(self, t: int, b_stack: Tensor, row_adapter: Tensor, seq: int, bias: Tensor | None,
                 out_dtype: torch.dtype, device: torch.device) -> None:
        self.b, self.rows, self.seq, self.t, self.bias = b_stack, row_adapter, seq, t, bias
        self.n_out, self.dtype, self.device = b_stack.shape[1], out_dtype, device
        self.grid, self.bt, self.bn = _expand_grid(row_adapter.shape[0], seq, self.n_out, b_stack.shape[2])
        self.ieee = b_stack.dtype == torch.float32

    def __call__(self, h: Tensor) -> Tensor:
        out = torch.empty(self.t, self.n_out, dtype=self.dtype, device=self.device)
        if self.t and self.n_out:
            b, bias = self.b, self.bias
            _expand_kernel[self.grid](
                h, b, self.rows, out if bias is None else bias, out, self.seq, self.n_out, h.stride(0),
                b.stride(0), b.stride(1), b.stride(2), out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
                R=b.shape[2], BT=self.bt, BN=self.bn, IEEE=self.ieee, num_warps=NUM_WARPS)
        return out


def _check_linear(x: Tensor, weight: Tensor, b_stack: Tensor) -> None:
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected (n_rows, seq, in) or (n_rows, in); found shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.dtype != x.dtype:
        raise ValueError(f"weight: expected shape (out, {x.shape[-1]}) in {x.dtype}; "
                         f"found {tuple(weight.shape)} in {weight.dtype}")
    _check_table("b_stack", b_stack, (weight.shape[0], None), x.dtype, x.device)


class MixedLinear:
    """`multi_lora_linear` for inputs of one shape and dtype, with its arguments checked and the
    kernels' launch settings worked out once, at construction from an example x.

    A prefill-sized mixed-batch layer call repeats its shapes every forward; calling a plan
    with such an x (same shape and dtype; its strides may differ) costs the two launches and
    the GEMM, little more. `plan(x, h)` takes h (T, R) computed elsewhere instead of running
    the shrink.
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor | None, a_stack: Tensor, b_stack: Tensor,
                 row_adapter: Tensor, check: bool = True, out_shape: tuple[int, ...] | None = None) -> None:
        if check:
            _check_linear(x, weight, b_stack)
        n_out, n_in = weight.shape
        self.seq = 1 if x.dim() == 2 else x.shape[1]
        self.t = x.numel() // n_in
        # the shape of y: x's with `out` last, or `out_shape` for a caller that passes x
        # reshaped to (n_rows, seq, in) here and calls the plan with x as it came
        self.out_shape = (*x.shape[:-1], n_out) if out_shape is None else out_shape
        if check:
            _check_tokens("x2", x.reshape(self.t, n_in), row_adapter, self.seq)
            _check_table("a_stack", a_stack, (None, n_in), x.dtype, x.device)
        self.weight, self.w_t, self.bias, self.n_in = weight, weight.T, bias, n_in
        self.a_stack, self.b_stack, self.row_adapter = a_stack, b_stack, row_adapter
        R, seq, dtype = a_stack.shape[1], self.seq, x.dtype
        self.kernels = kernels_usable(x, R) and kernels_usable(b_stack, R) and self.t > 0
        if self.kernels:
            self.shrink = _Shrink(x.reshape(self.t, n_in), [a_stack], row_adapter, seq)
            self.expand = _Expand(self.t, b_stack, row_adapter, seq, bias, dtype, x.device)
        else:  # the torch ops, as lora_shrink and lora_expand run them where the kernels cannot
            self.shrink = lambda x2: lora_shrink_torch(x2, a_stack, row_adapter, seq)
            self.expand = lambda h: lora_expand_torch(h, b_stack, row_adapter, seq, bias, dtype)

    def shares_shrink_with(self, other: MixedLinear) -> bool:
        """Whether `lora_shrink_group` can compute this plan's h with `other`'s in one pass: the
        same index tensor and tokens, A tables of one shape and dtype, both contiguous, one path."""
        a, b = self.a_stack, other.a_stack
        return (self.row_adapter is other.row_adapter and self.t == other.t and self.seq == other.seq
                and a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous() and b.is_contiguous()
                and self.kernels == other.kernels)

    def __call__(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        x2 = x.reshape(self.t, self.n_in)
        e = self.expand(self.shrink(x2) if h is None else h)
        return e.addmm_(x2, self.w_t).view(self.out_shape)


def multi_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a_stack: Tensor, b_stack: Tensor,
                      row_adapter: Tensor, check: bool = True) -> Tensor:
    """y = x·Wᵀ + bias + x·A[a]ᵀ·B[a]ᵀ, a = row_adapter[row] (no LoRA term where a = -1).

    x (n_rows, seq, in) or (n_rows, in) (seq = 1); weight (out, in) in x's dtype; a_stack
    (N, R, in) and b_stack (N, out, R) from `stack_adapters`; row_adapter (n_rows,) int32.
    Returns (n_rows, seq, out) or (n_rows, out) in x's dtype. The base GEMM adds into the
    expand kernel's output in place, so y costs no copy beyond it. `check=False` skips the
    argument checks, for callers that checked the same tables and shapes before. A caller
    that repeats one shape can keep a `MixedLinear` plan instead.
    """
    return MixedLinear(x, weight, bias, a_stack, b_stack, row_adapter, check=check)(x)


# Prefill-sized calls of layers fed the same input (q/k/v, gate/up) share one shrink, one pass
# over x for all of them (`lora_shrink_group`; LoraLinear._prefill_step). False: each layer alone.
PREFILL_SIBLINGS = True


# -- few tokens (decode): dense products over all adapters, masked per row ------------------
#
# With a handful of tokens, launch cost dominates the LoRA branch. Multiplying every token by
# all N adapters' A at once (one GEMM against the (N·R, in) table), zeroing the columns of
# the adapters a token does not use, and adding the product with the (out, N·R) B table into
# y in place is three library calls and no Triton launch; the N-fold extra arithmetic is on
# (T × N·R) tiles and costs nothing measurable at decode sizes. Inputs of up to
# DENSE_MAX_TOKENS tokens take this route, or `grouped_decode_add_` below (its first GEMM is
# this one, for several layers at once); longer ones (prefill) take the kernels above.
DENSE_MAX_TOKENS = 256


def dense_tables(a_stack: Tensor, b_stack: Tensor) -> tuple[Tensor, Tensor]:
    """(a_cat (N·R, in), b_cat (out, N·R)) views/copies of the stacked tables for `dense_expand_add_`."""
    n, r, n_in = a_stack.shape
    return a_stack.reshape(n * r, n_in), dense_b_table(b_stack)


def dense_b_table(b_stack: Tensor) -> Tensor:
    """b_cat (out, N·R): every adapter's B side by side, from b_stack (N, out, R)."""
    n, n_out, r = b_stack.shape
    return b_stack.permute(1, 0, 2).reshape(n_out, n * r)


def dense_row_mask(row_adapter: Tensor, seq: int, n: int, r: int, dtype: torch.dtype) -> Tensor:
    """(T, N·R): 1 in the R columns of each token's adapter, 0 elsewhere (all 0 for -1 rows)."""
    cols = torch.arange(n * r, device=row_adapter.device) // r  # (N·R,) adapter of each column
    mask = (cols[None, :] == row_adapter.long()[:, None]).to(dtype)  # (rows, N·R)
    return mask.repeat_interleave(seq, dim=0)


def dense_expand_add_(y2: Tensor, x2: Tensor, a_cat: Tensor, b_cat: Tensor, mask: Tensor) -> Tensor:
    """In place: y2 += ((x2·a_catᵀ) ⊙ mask)·b_catᵀ; returns y2."""
    return y2.addmm_((x2 @ a_cat.T).mul_(mask), b_cat.T)


# -- few tokens: layers fed the same input share their launches -------------------------------
#
# A decode step's LoRA work is a few hundred kilobytes per layer: its cost is the number of
# kernels and their serial latency, not arithmetic. `grouped_decode_add_` runs the branch of
# every layer that reads one x (q/k/v, gate/up; or one layer alone) at once: x·Aᵀ for all
# members and adapters in one cuBLAS GEMM against the members' A tables stacked
# (`group_table`), then the expand into each member's y in place, either
#
# - by one Triton kernel for all members, whose programs each take one adapter's tokens (up
#   to GROUP_BLOCK_T of them) and one BN-wide block of one member's columns, so each block of
#   B is read once per adapter: two launches a group;
# - or dense: the columns of the adapters a token does not use zeroed (one multiply for all
#   members), then one addmm with all adapters' B per member: 2 + M library calls (the CPU path).
#
# DECODE_GROUPED picks the kernel (True, where the kernels can run) or the dense expand. On an
# H200, replayed from a CUDA graph, the kernel made the step 1.14× the base model's against
# 1.22× dense; eagerly the step is bound by the host and the two were alike (each faster on
# one of two machines). A one-launch variant whose programs also did the shrink was slower:
# its serial loop over `in` cost 13-17 µs a launch; so was launching the expand as a
# programmatic dependent of the shrink GEMM, by a little (benchmarks/RESULTS.md, seventh set).
DECODE_GROUPED = True
DECODE_SIBLINGS = True  # layers fed the same tensor share their launches (False: each layer alone)
GROUP_CONFIG = {"BN": 128, "num_warps": 4}
GROUP_MAX_MEMBERS = 3  # members per expand launch; a larger group takes more launches
GROUP_BLOCK_T = 16  # tokens of one adapter per program (tl.dot's smallest tile)


class AdapterTokens(NamedTuple):
    """The tokens of a mixed batch grouped by adapter, for `grouped_decode_add_`.

    order (T_used,) int32: token indices, adapter 0's first; starts (N + 1,) int32: adapter
    i owns order[starts[i]:starts[i + 1]]; max_tokens: the most tokens any adapter has (a
    host int: it sizes the grid with no sync). Tokens of rows without an adapter are left
    out. row_adapter and seq serve the torch path.
    """

    order: Tensor
    starts: Tensor
    max_tokens: int
    row_adapter: Tensor
    seq: int


def adapter_tokens(rows: Sequence[int], seq: int, n: int, device: torch.device | str) -> AdapterTokens:
    """`AdapterTokens` of a batch whose row i uses adapter rows[i] (in [-1, n); -1: none) with `seq` tokens a row."""
    if seq < 1 or any(not -1 <= a < n for a in rows):
        raise ValueError(f"expected seq >= 1 and adapter indices in [-1, {n}); found seq = {seq} and {list(rows)}")
    order, starts = [], [0]
    for i in range(n):
        order += [row * seq + t for row, a in enumerate(rows) if a == i for t in range(seq)]
        starts.append(len(order))
    most = max(b - a for a, b in zip(starts, starts[1:])) if n else 0
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return AdapterTokens(as_tensor(order), as_tensor(starts), most, as_tensor(list(rows)), seq)


def grouped_kernel(b_stack: Tensor) -> bool:
    """Whether `grouped_decode_add_` expands with its Triton kernel (see DECODE_GROUPED) for this B table."""
    return DECODE_GROUPED and kernels_usable(b_stack, b_stack.shape[2])


def group_table(a_cats: Sequence[Tensor]) -> Tensor:
    """The members' (N·R, in) A tables stacked: (M·N·R, in), one GEMM's weight for all of them."""
    return a_cats[0] if len(a_cats) == 1 else torch.cat(list(a_cats))


def _check_group(ys: Sequence[Tensor], x2: Tensor, a_group: Tensor, b_stacks: Sequence[Tensor],
                 tokens: AdapterTokens) -> None:
    if not ys or len(ys) != len(b_stacks):
        raise ValueError(f"expected equal, non-zero numbers of outputs and B tables; found {len(ys)} and {len(b_stacks)}")
    _check_tokens("x2", x2, tokens.row_adapter, tokens.seq)
    n, _, R = b_stacks[0].shape
    _check_table("a_group", a_group[None], (len(ys) * n * R, x2.shape[1]), x2.dtype, x2.device)
    for i, (y2, b) in enumerate(zip(ys, b_stacks)):
        _check_table(f"b_stack {i}", b, (None, R), x2.dtype, x2.device)
        if b.shape[0] != n or not b.is_contiguous() or y2.shape != (x2.shape[0], b.shape[1]) or y2.stride(1) != 1:
            raise ValueError(f"member {i}: expected a contiguous b_stack ({n}, out, {R}) and y2 ({x2.shape[0]}, out) "
                             f"with unit column stride; found b_stack {tuple(b.shape)} and y2 {tuple(y2.shape)}")


def grouped_decode_add_(ys: Sequence[Tensor], x2: Tensor, a_group: Tensor, b_stacks: Sequence[Tensor],
                        tokens: AdapterTokens, mask: Tensor | None = None, b_cats: Sequence[Tensor] | None = None,
                        kernel: bool | None = None, check: bool = True) -> list[Tensor]:
    """In place, for every member m: ys[m][t] += (x2[t]·A_m[a]ᵀ)·B_m[a]ᵀ, a the adapter of token t
    (nothing for tokens without one). x2 (T, in); a_group (M·N·R, in) from `group_table`;
    b_stacks[m] (N, out_m, R, already scaled) from `stack_adapters`, contiguous; ys[m] (T, out_m)
    with unit column stride; all in x2's dtype. For the dense expand, `mask` (`dense_row_mask` of
    the tokens) and `b_cats` (each member's (out_m, N·R) table from `dense_tables`) are built when
    None. `kernel`: the Triton expand, or dense (None: `grouped_kernel` decides). `check=False`
    skips the checks of the arguments, for callers that checked the same tables and shapes
    before (a decode step repeats the last one's). Returns ys."""
    if check:
        _check_group(ys, x2, a_group, b_stacks, tokens)
    return GroupedDecode(x2, a_group, b_stacks, tokens, mask, b_cats, kernel)(ys, x2)


class GroupedDecode:
    """`grouped_decode_add_` for one group's tables and tokens, with its route (kernel or dense)
    and launch settings worked out once; calling it with (ys, x2) does the step's work, checking nothing.
    A decode step repeats the last one's tables and tokens, so a layer keeps one for a context.
    Settings are read at construction (DECODE_GROUPED, GROUP_CONFIG)."""

    def __init__(self, x2: Tensor, a_group: Tensor, b_stacks: Sequence[Tensor], tokens: AdapterTokens,
                 mask: Tensor | None = None, b_cats: Sequence[Tensor] | None = None, kernel: bool | None = None) -> None:
        n, _, R = b_stacks[0].shape
        self.a_t, self.b_stacks, self.nr, self.t = a_group.T, list(b_stacks), n * R, x2.shape[0]
        self.kernel = grouped_kernel(b_stacks[0]) if kernel is None else kernel and kernels_usable(b_stacks[0], R)
        if not self.kernel:
            self.mask = (dense_row_mask(tokens.row_adapter, tokens.seq, n, R, x2.dtype) if mask is None else mask)[:, None, :]
            self.b_cats_t = [(dense_b_table(b) if b_cats is None else b_cats[m]).T for m, b in enumerate(b_stacks)]
            return
        self.launches = []  # (grid, the member in each kernel slot, arguments before and after the slots, constexprs)
        if not self.t or not tokens.max_tokens:
            return
        bn = GROUP_CONFIG["BN"]
        for g in range(0, len(b_stacks), GROUP_MAX_MEMBERS):
            part = list(range(g, min(g + GROUP_MAX_MEMBERS, len(b_stacks))))
            blocks = [tk.cdiv(b_stacks[m].shape[1], bn) for m in part]
            slots = part + [part[0]] * (GROUP_MAX_MEMBERS - len(part))  # unused slots repeat the first member
            grid = (n, tk.cdiv(tokens.max_tokens, GROUP_BLOCK_T), sum(blocks))
            head = (g * n * R, n * R, tokens.order, tokens.starts)
            tail = (blocks[0], blocks[1] if len(part) > 1 else 0)
            consts = dict(MEMBERS=len(part), R=R, BT=GROUP_BLOCK_T, BN=bn, IEEE=x2.dtype == torch.float32,
                          num_warps=GROUP_CONFIG["num_warps"])
            self.launches.append((grid, slots, head, tail, consts))

    def __call__(self, ys: Sequence[Tensor], x2: Tensor) -> list[Tensor]:
        h_all = torch.mm(x2, self.a_t)  # (T, M·N·R)
        if not self.kernel:
            h_all.view(self.t, len(ys), self.nr).mul_(self.mask)
            for m, (y2, b_t) in enumerate(zip(ys, self.b_cats_t)):
                y2.addmm_(h_all[:, m * self.nr:(m + 1) * self.nr], b_t)
            return list(ys)
        bs = self.b_stacks
        for grid, slots, head, tail, consts in self.launches:
            args = []
            for m in slots:
                args += [bs[m], ys[m], ys[m].stride(0), bs[m].shape[1]]
            _grouped_expand_kernel[grid](h_all, h_all.stride(0), *head, *args, *tail, **consts)
        return list(ys)


if triton is not None:

    @triton.jit
    def _group_member(H, s_h0, h_col, B, Y, s_y0, n_out, adapter, tok, t_ok, block, R: tl.constexpr,
                      BN: tl.constexpr, IEEE: tl.constexpr):
        # Y[tok, block's BN columns] += H[tok, h_col:h_col + R]·B[adapter][columns]ᵀ; B (N, n_out, R) contiguous.
        rn = block * BN + tl.arange(0, BN)
        acc = _expand_tile(H, B, adapter, tok, t_ok, rn, n_out, s_h0, h_col, n_out * R, R, 1, R, IEEE)
        ok = t_ok[:, None] & (rn[None, :] < n_out)
        ptr = Y + tok[:, None] * s_y0 + rn[None, :]
        acc += tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptr, acc.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _grouped_expand_kernel(H, s_h0, h_start, h_member, ORDER, STARTS, B0, Y0, s_y0_0, n_out0,
                               B1, Y1, s_y0_1, n_out1, B2, Y2, s_y0_2, n_out2, blocks0, blocks1,
                               MEMBERS: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                               IEEE: tl.constexpr):
        # Program (adapter, token block, column block): column blocks 0 .. blocks0 - 1 belong to
        # member 0, the next blocks1 to member 1, the rest to member 2. Member m's h columns for
        # the adapter start at h_start + m·h_member + adapter·R.
        adapter = tl.program_id(0)
        start = tl.load(STARTS + adapter)
        end = tl.load(STARTS + adapter + 1)
        first = start + tl.program_id(1) * BT
        if first < end:
            offs = first + tl.arange(0, BT)
            t_ok = offs < end
            tok = tl.load(ORDER + offs, mask=t_ok, other=0).to(tl.int64)
            c = tl.program_id(2)
            h_col = h_start + adapter.to(tl.int64) * R
            if c < blocks0:
                _group_member(H, s_h0, h_col, B0, Y0, s_y0_0, n_out0, adapter, tok, t_ok, c, R, BN, IEEE)
            else:
                if MEMBERS >= 2:
                    if c < blocks0 + blocks1:
                        _group_member(H, s_h0, h_col + h_member, B1, Y1, s_y0_1, n_out1, adapter, tok, t_ok,
                                      c - blocks0, R, BN, IEEE)
                    else:
                        if MEMBERS >= 3:
                            _group_member(H, s_h0, h_col + 2 * h_member, B2, Y2, s_y0_2, n_out2, adapter, tok,
                                          t_ok, c - blocks0 - blocks1, R, BN, IEEE)
