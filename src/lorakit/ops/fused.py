"""A fused LoRA linear for training: one autograd node per adapted layer.

What it saves for backward is x itself (the very tensor the layer was given, so
layers fed the same tensor — q/k/v, gate/up — share one saved copy), the small
h = s·dropout(x)·Aᵀ (tokens × r), A and B in the compute dtype (on the GPU written by the
forward kernels that read the adapters, so neither pass launches a cast), and, with
dropout, an integer seed instead of the mask or the dropped input: on the GPU, backward's
kernels regenerate the identical mask from the seed. Where the kernels do not run (the
CPU), forward keeps its mask as booleans (a byte an element, a quarter of a float32
dropped copy), since remaking it with torch ops cost more time than the rest of the
dropout step.

The scale s rides in GEMM epilogues (h, dA) and the adapter gradients of float32
adapters under half-precision compute come out of their GEMM in float32 where the
library can write it (CUDA): no separate scale or cast kernels, since the eager step
is bound by the host issuing small kernels (benchmarks/RESULTS.md).

Without dropout, forward and the input gradient use W_eff = W + s·B·A: building it
costs two weight-sized passes, fewer bytes than the two activation-sized passes of
the separate base-plus-expand it replaces whenever tokens > out_features. (Computing
y and x·Aᵀ from one GEMM against [W_eff; A] was tried and dropped: the outputs come
out strided, and every op downstream of a strided activation slowed more than the
saved pass gained.)

Layers that read one input can also run as one node: the gated MLP (`GatedMLPFunction`) and
q/k/v (`SharedInputFunction`, which `lorakit.fusion` sets up). There x's gradient is
accumulated in place, and with dropout the layers' backward dropout terms (and, for three
layers, their masked shrinks) come from one pass over x instead of one a layer.

Same signature as `reference.lora_linear`; tested against it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lorakit.ops import triton_kernels as tk
from lorakit.ops.triton_kernels import as_dtype


def env_flag(name: str, default: bool) -> bool:
    """A LORAKIT_* switch: unset gives `default`; a default-on switch is turned off only by
    0/false/off/no, a default-off one turned on only by 1/true/on/yes (any case)."""
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    return value not in ("0", "false", "off", "no") if default else value in ("1", "true", "on", "yes")


def _rows(t: Tensor) -> Tensor:
    """t (..., n) as (T, n): t itself where it is 2-D already (no reshape call)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _unrows(t2: Tensor, like: Tensor) -> Tensor:
    """t2 (T, m) back in the leading shape of `like` (..., n): (..., m)."""
    return t2 if like.dim() == 2 else t2.reshape(*like.shape[:-1], t2.shape[-1])


def _keep_mask(x2: Tensor, p: float, seed: Tensor) -> Tensor:
    """The boolean keep-mask of x2 (T, in) for `seed`: the kernels' mask, made with torch ops
    (where the kernels do not run). Callers apply 1/(1-p) in a GEMM's scale, not per element."""
    return tk.keep_mask_torch(tuple(x2.shape), p, tk.seed_tensor(seed, x2.device))


def _cpu_keep(x: Tensor, p: float, seed: Tensor | None, rank: int = 0) -> Tensor | None:
    """Where the kernels do not run (the CPU, or a layer of that rank above tk.KERNEL_MAX_RANK),
    forward's dropout mask of x (..., in) as booleans (T, in), kept for backward: a byte an
    element, against hashing every position again (most of the dropout step's extra time on a
    CPU). None where the kernels run or without dropout."""
    if not p or _kernels(x, rank):
        return None
    return _keep_mask(_rows(x), p, seed)


def new_seed(device: torch.device | str = "cpu") -> Tensor:
    """A dropout seed drawn from torch's generator on `device`, so torch.manual_seed reproduces runs.

    It stays a one-element tensor: the kernels read it on the device, with no host sync
    and nothing that stops torch.compile from tracing the layer.
    """
    return torch.randint(0, 2**31 - 1, (1,), device=device)


# Keep W + s·B·A from forward for backward instead of building it again: one kernel and two
# weight-sized passes fewer per layer, for memory the size of the adapted weights (1.7 GiB on
# Llama-3.2-1B with all seven projections adapted). Off by default; LORAKIT_SAVE_W_EFF=1 or
# `set_save_w_eff(True)` turns it on.
SAVE_W_EFF = env_flag("LORAKIT_SAVE_W_EFF", default=False)


def set_save_w_eff(enabled: bool) -> None:
    """Keep W_eff from forward for backward (faster, more memory); see SAVE_W_EFF."""
    global SAVE_W_EFF
    SAVE_W_EFF = bool(enabled)


_KERNELS_ON_CPU = False  # tests turn this on under TRITON_INTERPRET=1 to run the kernels on the CPU


def use_kernels_on_cpu(enabled: bool) -> None:
    """Run the Triton kernels on CPU tensors too (only meaningful with TRITON_INTERPRET=1)."""
    global _KERNELS_ON_CPU
    _KERNELS_ON_CPU = enabled


def _kernels(t: Tensor, rank: int = 0) -> bool:
    """Whether the Triton kernels run on t (for a layer of that rank: above tk.KERNEL_MAX_RANK the torch ops do)."""
    return (tk.triton_usable(t) and (t.is_cuda or _KERNELS_ON_CPU) and t.numel() <= tk.MAX_MASK_ELEMENTS
            and rank <= tk.KERNEL_MAX_RANK)


_MM_OUT_DTYPE: dict[torch.device, bool] = {}  # per device: whether addmm can write float32 from half inputs


def _mm_out_dtype_ok(device: torch.device) -> bool:
    """Whether this torch can run addmm with out_dtype=float32 on half inputs on `device` (CUDA only),
    checked once per device against the two-step result."""
    ok = _MM_OUT_DTYPE.get(device)
    if ok is None:
        ok = False
        if device.type == "cuda":
            try:
                m1 = torch.randn(5, 24, device=device, dtype=torch.bfloat16)
                m2 = torch.randn(24, 7, device=device, dtype=torch.bfloat16)
                got = torch.addmm(m1.new_empty((), dtype=torch.float32), m1, m2, out_dtype=torch.float32, beta=0,
                                  alpha=0.5)
                ok = got.dtype == torch.float32 and torch.allclose(got, 0.5 * (m1.float() @ m2.float()), rtol=1e-3,
                                                                   atol=1e-3)
            except (RuntimeError, TypeError):
                ok = False
        _MM_OUT_DTYPE[device] = ok
    return ok


_UNREAD: dict[tuple, Tensor] = {}  # (dtype, device) -> a 0-dim tensor for addmm's unread input (beta = 0)


def _unread_input(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A 0-dim tensor to stand as addmm's input where beta = 0 (never read, so never written):
    made once per dtype and device instead of an empty() call per GEMM. Under torch.compile a
    fresh one, so no module-level tensor enters the traced graph."""
    if torch.compiler.is_compiling():
        return like.new_empty((), dtype=dtype)
    key = (dtype, like.device)
    t = _UNREAD.get(key)
    if t is None:
        t = _UNREAD[key] = like.new_empty((), dtype=dtype)
    return t


def _scaled_mm(m1: Tensor, m2: Tensor, scale: float, dtype: torch.dtype | None = None) -> Tensor:
    """scale·m1·m2 in `dtype` (default m1's) with the scale applied in the GEMM's epilogue.

    Half inputs with a float32 result (adapter gradients of float32 adapters) come out
    of one GEMM where the library can write float32 directly, else GEMM then cast.
    """
    dtype = dtype or m1.dtype
    if scale == 1.0 and dtype == m1.dtype:
        return m1 @ m2
    if dtype == m1.dtype:
        return torch.addmm(_unread_input(m1, dtype), m1, m2, beta=0, alpha=scale)  # beta=0: input not read
    if (dtype == torch.float32 and m1.dtype in (torch.float16, torch.bfloat16) and m1.is_cuda
            and not torch.compiler.is_compiling() and _mm_out_dtype_ok(m1.device)):
        return torch.addmm(_unread_input(m1, dtype), m1, m2, out_dtype=dtype, beta=0, alpha=scale)
    return _scaled_mm(m1, m2, scale).to(dtype)


def _forward(x2: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
             p: float, seed: Tensor | None, keep: Tensor | None = None, expand: bool = True,
             shrunk: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(y, h, a, b, w_eff) for x2 (T, in): y = x·Wᵀ + b + h·Bᵀ with h = s·dropout(x)·Aᵀ (T, r).

    a and b are A and B in x's dtype; backward reuses them instead of casting again.
    w_eff is W + s·B·A where forward built it (no dropout), else None. `keep`, where the
    kernels do not run, is the seed's mask made already (`_keep_mask`). `expand=False`, on
    the kernels' dropout route only, leaves h·Bᵀ out of y for the caller to add (the gated
    MLP folds it into its activation kernel); b is then lora_B itself or a buffer of its
    shape in x's dtype that the caller must fill with B rounded to that dtype. `shrunk`, on the
    kernels' dropout route only, is (h, a) made already (`_siblings_forward`'s shared shrink).
    """
    ct = x2.dtype
    n_out, n_in = weight.shape
    kernels = _kernels(x2, lora_A.shape[0])
    bias = None if bias is None else as_dtype(bias, ct)
    if p == 0.0:
        if weight.dtype == ct:  # the kernel rounds A and B to ct as it reads them: no cast launches
            w_eff, a, b = tk.build_w_eff_casts(weight, lora_A, lora_B, scale, use_kernel=kernels)  # (out, in)
        else:
            a, b = as_dtype(lora_A, ct), as_dtype(lora_B, ct)
            w_eff = torch.empty(n_out, n_in, dtype=ct, device=x2.device)  # (out, in)
            tk.build_w_eff(weight, a, b, scale, out=w_eff, use_kernel=kernels)
        return torch.nn.functional.linear(x2, w_eff, bias), _scaled_mm(x2, a.T, scale), a, b, w_eff  # (T, out), (T, r)
    y = torch.nn.functional.linear(x2, as_dtype(weight, ct), bias)
    if kernels:
        # The kernels read A and B in their own dtype and write the copies rounded to ct that
        # backward uses: no cast launches.
        b = _cast_buffer(lora_B, ct)
        if shrunk is None:
            a = _cast_buffer(lora_A, ct)
            h = tk.masked_shrink(x2, lora_A, p, seed, scale, None if a is lora_A else a)  # (T, r), mask made in-kernel
        else:
            h, a = shrunk
        if not expand:
            return y, h, a, b, None
        # The expand in place, in a Triton kernel: faster than cuBLAS's addmm_ here, and under the
        # compiler, which turns addmm_ into an out-of-place addmm that copies y first (0.18 ms a
        # Llama-1B block on an H200), it stays in place. Computing h·Bᵀ first and letting the base
        # GEMM add x·Wᵀ to it as its C operand was measured too: no faster on the GPU
        # (micro_lora_ops.py --masked, "C first"), and one launch more for the host (B's cast).
        return tk.expand_add_(y, h, lora_B, None if b is lora_B else b), h, a, b, None
    a, b = as_dtype(lora_A, ct), as_dtype(lora_B, ct)
    keep = _keep_mask(x2, p, seed) if keep is None else keep
    h = _scaled_mm(x2 * keep, a.T, scale / (1.0 - p))  # 1/(1-p) rides in the GEMM
    return y.addmm_(h, b.T), h, a, b, None  # (T, out)


def _backward(dy2: Tensor, x2: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor, scale: float,
              p: float, seed: Tensor | None, needs: tuple[bool, ...], a_dtype: torch.dtype, b_dtype: torch.dtype,
              w_eff: Tensor | None = None, dx_lora: bool = True, keep: Tensor | None = None,
              dx_out: Tensor | None = None):
    """Gradients (dx, dW, dbias, dA, dB) of `_forward`, then dy·B; `needs` says which are wanted, in that order.

    lora_A / lora_B may be the adapter or the copies `_forward` made in the compute dtype;
    dA and dB come out in `a_dtype` / `b_dtype`, the adapter's own. `w_eff`, if forward's
    W + s·B·A was kept, is used instead of building it again. dy·B (T, r) is returned
    last for a caller that computes dA itself (the gated-MLP node); with dropout,
    `dx_lora=False` leaves LoRA's share out of dx for that caller to add. `keep`, where the
    kernels do not run, is forward's dropout mask, kept instead of made again. `dx_out` (T, in),
    if given, receives dx added to what it holds (layers that read one input), and is returned.
    """
    need_dx, need_w, need_bias, need_a, need_b = needs
    ct = dy2.dtype
    n_out, n_in = weight.shape
    a, b = as_dtype(lora_A, ct), as_dtype(lora_B, ct)
    x2 = as_dtype(x2, ct)
    kernels = _kernels(x2, lora_A.shape[0])
    dx = dweight = dbias = d_a = d_b = None
    if keep is None and p and not kernels and (need_a or (need_dx and dx_lora)):
        keep = _keep_mask(x2, p, seed)
    dyb = dy2 @ b  # (T, r)
    if need_dx and p == 0.0:
        if w_eff is None and not kernels and torch.compiler.is_compiling():
            # Not the forward's build verbatim: the compiler would merge the two and keep forward's
            # W_eff (weight-sized) for backward. The scale on B instead of in the GEMM's epilogue.
            acc = torch.promote_types(ct, torch.float32)
            w_eff = as_dtype(torch.addmm(as_dtype(weight, acc), as_dtype(b, acc) * scale, as_dtype(a, acc)), ct)
        elif w_eff is None:
            w_eff = torch.empty(n_out, n_in, dtype=ct, device=x2.device)  # (out, in)
            tk.build_w_eff(weight, a, b, scale, out=w_eff, use_kernel=kernels)
        dx = dy2 @ w_eff if dx_out is None else dx_out.addmm_(dy2, w_eff)  # dy·W_eff: (T, in)
    elif need_dx:
        w = as_dtype(weight, ct)
        dx = dy2 @ w if dx_out is None else dx_out.addmm_(dy2, w)  # (T, in)
        if not dx_lora:
            pass
        elif kernels and need_a:  # both dropout terms from one pass and one mask
            d_a = as_dtype(tk.masked_backward_(dx, x2, dyb, a, scale, p, seed), a_dtype)
        elif kernels:
            tk.masked_dx_add_(dx, dyb, a, scale, p, seed)
        else:
            # The factor on the small dy·B, not as add_'s alpha: torch.compile's CPU code for an
            # add with alpha != 1 after a matmul came out wrong (torch 2.13; tests/test_ops_fused.py).
            dx.add_((dyb * (scale / (1.0 - p)) @ a).mul_(keep))
    if need_a and d_a is None:
        if p == 0.0:
            d_a = _scaled_mm(dyb.T, x2, scale, a_dtype)  # (r, in)
        elif kernels:
            d_a = as_dtype(tk.masked_grad_a(dyb, x2, p, seed, scale), a_dtype)
        else:
            # keep·x, not forward's x·keep: under torch.compile the two would be merged and the
            # dropped input (tokens × in) kept for backward.
            d_a = _scaled_mm(dyb.T, keep * x2, scale / (1.0 - p), a_dtype)
    if need_b:
        d_b = _scaled_mm(dy2.T, as_dtype(h, ct), 1.0, b_dtype)  # (out, r); h already carries s
    if need_w:
        dweight = as_dtype(dy2.T @ x2, weight.dtype)
    if need_bias:
        dbias = as_dtype(dy2.sum(0), weight.dtype)
    return dx, dweight, dbias, d_a, d_b, dyb


def _cast_buffer(t: Tensor, ct: torch.dtype) -> Tensor:
    """t itself if it is in ct, else an empty buffer of its shape in ct for a kernel to write t's rounded copy into."""
    return t if t.dtype == ct else torch.empty(t.shape, dtype=ct, device=t.device)


def _siblings_forward(x2: Tensor, layers, expand: bool = True) -> list[tuple]:
    """`_forward` of layers that read one input x2 (T, in): layers (weight, bias, A, B, s, p, seed,
    keep) a layer. Where the kernels run and three of them have dropout (ranks up to
    tk.SIBLINGS_ROUTE_MAX_RANK), their masked shrinks are one pass over x (`masked_shrink_siblings`)
    instead of one a layer."""
    shrunk = [None] * len(layers)
    masked = [i for i, layer in enumerate(layers) if layer[5]]
    if (len(masked) == 3 and _kernels(x2)  # at two layers the shared shrink was not faster (tk's config)
            and max(layers[i][2].shape[0] for i in masked) <= tk.SIBLINGS_ROUTE_MAX_RANK):
        bufs = [_cast_buffer(layers[i][2], x2.dtype) for i in masked]
        hs = tk.masked_shrink_siblings(x2, [(layers[i][2], layers[i][4], layers[i][5], layers[i][6],
                                            None if buf is layers[i][2] else buf) for i, buf in zip(masked, bufs)])
        for i, h, buf in zip(masked, hs, bufs):
            shrunk[i] = (h, buf)
    return [_forward(x2, w, bias, a, b, s, p, seed, keep, expand=expand, shrunk=pre)
            for (w, bias, a, b, s, p, seed, keep), pre in zip(layers, shrunk)]


def _siblings_backward(dys, x2: Tensor, layers, need_dx: bool) -> tuple[Tensor | None, list]:
    """Backward of layers that read one input x2 (T, in), as one pass where it can be.

    dys: each layer's dy (T, out), or None for an output that got no gradient. layers: per layer
    (weight, A, B, h, s, p, seed, w_eff, keep, needs (bias, A, B), dtypes (A, B)) as `_backward`
    takes them. dx = Σ dy·W (the GEMMs accumulate into one buffer in place) plus each layer's
    LoRA share; where the kernels run, the dropout layers' shares and their dA (ranks up to
    tk.SIBLINGS_ROUTE_MAX_RANK) come from one pass over dx and x (`masked_backward_siblings_`) instead
    of one pass a layer. Returns (dx, [(dbias, dA, dB) a layer]), None where not wanted.
    """
    dx, grads, masked = None, [], []
    kernels = _kernels(x2)
    for dy, (w, a, b, h, s, p, seed, w_eff, keep, (need_bias, need_a, need_b), (a_dt, b_dt)) in zip(dys, layers):
        if dy is None:
            grads.append((None, None, None))
            continue
        # its dropout terms go to the shared pass
        pass_later = bool(p) and kernels and need_dx and a.shape[0] <= tk.SIBLINGS_ROUTE_MAX_RANK
        dx_l, _, dbias, d_a, d_b, dyb = _backward(dy, x2, w, a, b, h, s, p, seed,
                                                  (need_dx, False, need_bias, need_a and not pass_later, need_b),
                                                  a_dt, b_dt, w_eff, dx_lora=not pass_later, keep=keep, dx_out=dx)
        dx = dx_l if need_dx else None
        if pass_later:
            masked.append((len(grads), (dyb, as_dtype(a, x2.dtype), s, p, seed), need_a, a_dt))
        grads.append([dbias, d_a, d_b])
    for start in range(0, len(masked), 3):
        chunk = masked[start:start + 3]
        if len(chunk) == 1:
            i, (dyb, a, s, p, seed), need_a, a_dt = chunk[0]
            d_as = [tk.masked_backward_(dx, x2, dyb, a, s, p, seed)]
        else:
            d_as = tk.masked_backward_siblings_(dx, x2, [term for _, term, _, _ in chunk])
        for (i, _, need_a, a_dt), d_a in zip(chunk, d_as):
            grads[i][1] = as_dtype(d_a, a_dt) if need_a else None
    return dx, [tuple(g) for g in grads]


def _linear_node_forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                         scale: float, p: float, seed: Tensor | None, keep: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """`_forward` for x (..., in): (y (..., out), h (T, r), a, b, w_eff)."""
    y, *rest = _forward(_rows(x), weight, bias, lora_A, lora_B, scale, p, seed, keep)
    return _unrows(y, x), *rest


def _linear_node_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                          scale: float, p: float, seed: Tensor | None, needs: tuple[bool, ...],
                          a_dtype: torch.dtype, b_dtype: torch.dtype, w_eff: Tensor | None = None,
                          dx_lora: bool = True, keep: Tensor | None = None):
    """`_backward` for dy (..., out): (dx in x's shape and dtype, dW, dbias, dA, dB, dy·B), None where not wanted."""
    dx, dw, dbias, d_a, d_b, dyb = _backward(_rows(dy), _rows(x), weight, lora_A, lora_B, h, scale, p, seed, needs,
                                             a_dtype, b_dtype, w_eff, dx_lora, keep)
    if dx is not None:
        dx = as_dtype(_unrows(dx, x), x.dtype)
    return dx, dw, dbias, d_a, d_b, dyb


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with a hand-written backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float, seed: Tensor | None) -> Tensor:
        # x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r)
        keep = _cpu_keep(x, dropout_p, seed, lora_A.shape[0])
        y, h, a, b, w_eff = _linear_node_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, keep)
        ctx.save_for_backward(x, weight, a, b, h, seed, w_eff if SAVE_W_EFF else None, keep)
        ctx.scale, ctx.dropout_p, ctx.dtypes = scale, dropout_p, (lora_A.dtype, lora_B.dtype)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, a, b, h, seed, w_eff, keep = ctx.saved_tensors
        n = ctx.needs_input_grad
        grads = _linear_node_backward(dy, x, weight, a, b, h, ctx.scale, ctx.dropout_p, seed,
                                      (n[0], n[1], ctx.has_bias and n[2], n[3], n[4]), *ctx.dtypes, w_eff,
                                      keep=keep)[:5]
        return *grads, None, None, None


# Activations the gated-MLP node can differentiate itself: name -> (forward, backward).
GATED_ACTIVATIONS = {
    "silu": (torch.nn.functional.silu, lambda grad, g: torch.ops.aten.silu_backward(grad, g)),
    "gelu": (torch.nn.functional.gelu, lambda grad, g: torch.ops.aten.gelu_backward(grad, g)),
    "gelu_tanh": (lambda g: torch.nn.functional.gelu(g, approximate="tanh"),
                  lambda grad, g: torch.ops.aten.gelu_backward(grad, g, approximate="tanh")),
}


def _gated_kernels(g: Tensor, u: Tensor, act: str, rank: int = 0) -> bool:
    """Whether the gated MLP's elementwise kernels can run on g and u (backward: with down's rank)."""
    return (act in tk.GATED_KERNEL_ACTS and _kernels(g, rank) and g.shape == u.shape and g.dtype == u.dtype
            and g.is_contiguous() and u.is_contiguous())


def _gated_node_forward(g: Tensor, u: Tensor, act: str, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                        lora_B: Tensor, scale: float, p: float, seed: Tensor | None, keep: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(down(act(g) ⊙ u) (..., out), h (T, r), a, b, w_eff) as `_forward` gives them; the product is freed."""
    if _gated_kernels(g, u, act):
        z = tk.gated_act(g, u, act)  # (..., width), one pass
    else:
        z = GATED_ACTIVATIONS[act][0](g) * u
    return _linear_node_forward(z, weight, bias, lora_A, lora_B, scale, p, seed, keep)


def _gated_node_backward(dy: Tensor, g: Tensor, u: Tensor, act: str, weight: Tensor, lora_A: Tensor,
                         lora_B: Tensor, h: Tensor, scale: float, p: float, seed: Tensor | None,
                         needs: tuple[bool, ...], a_dtype: torch.dtype, b_dtype: torch.dtype,
                         w_eff: Tensor | None = None, keep: Tensor | None = None):
    """(dg, du, dW, dbias, dA, dB) of `_gated_node_forward`, recomputing act(g) ⊙ u; None where not wanted.

    With the kernels (a frozen down weight), one pass over dz, g and u gives dg, du and dA
    (and, with dropout, adds LoRA's share of dz with the same mask); z = act(g) ⊙ u is never
    materialised in backward.
    """
    need_g, need_u, need_w, need_bias, need_a, need_b = needs
    if _gated_kernels(g, u, act, lora_A.shape[0]) and not need_w:
        # g stands in for down's input: same shape, and only its shape and device are used.
        dz, _, dbias, _, d_b, dyb = _linear_node_backward(dy, g, weight, lora_A, lora_B, h, scale, p, seed,
                                                          (True, False, need_bias, False, need_b), a_dtype, b_dtype,
                                                          w_eff, dx_lora=False)
        width = g.shape[-1]
        dg, du, d_a = tk.gated_backward(dz.view(-1, width), g.view(-1, width), u.view(-1, width), dyb, act, scale,
                                        p, seed, as_dtype(lora_A, g.dtype) if p else None)
        return (dg.view(g.shape) if need_g else None, du.view(u.shape) if need_u else None, None, dbias,
                as_dtype(d_a, a_dtype) if need_a else None, d_b)
    act_fwd, act_bwd = GATED_ACTIVATIONS[act]
    act_g = act_fwd(g)
    # u·act(g), not forward's act(g)·u (the same values): under torch.compile the two would be
    # merged and the product (tokens × width) kept for backward instead of recomputed.
    dz, dw, dbias, d_a, d_b, _ = _linear_node_backward(dy, u * act_g, weight, lora_A, lora_B, h, scale, p, seed,
                                                       (need_g or need_u, need_w, need_bias, need_a, need_b),
                                                       a_dtype, b_dtype, w_eff, keep=keep)
    du = dz * act_g if need_u else None
    dg = act_bwd(dz * u, g) if need_g else None
    return dg, du, dw, dbias, d_a, d_b


class GatedDownFunction(torch.autograd.Function):
    """down(act(g) ⊙ u) for a gated MLP, saving g and u instead of down's input.

    The MLP's own backward needs g and u anyway; the product act(g)⊙u (tokens × the
    MLP width, the largest activation of a block) is recomputed in backward instead
    of being stored, and act(g) is not stored either.
    """

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor, act: str, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                lora_B: Tensor, scale: float, dropout_p: float, seed: Tensor | None) -> Tensor:
        keep = _cpu_keep(g, dropout_p, seed, lora_A.shape[0])  # down's input has g's shape
        y, h, a, b, w_eff = _gated_node_forward(g, u, act, weight, bias, lora_A, lora_B, scale, dropout_p, seed, keep)
        ctx.save_for_backward(g, u, weight, a, b, h, seed, w_eff if SAVE_W_EFF else None, keep)
        ctx.act, ctx.scale, ctx.dropout_p, ctx.dtypes = act, scale, dropout_p, (lora_A.dtype, lora_B.dtype)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        g, u, weight, a, b, h, seed, w_eff, keep = ctx.saved_tensors
        n = ctx.needs_input_grad
        dg, du, dw, dbias, d_a, d_b = _gated_node_backward(dy, g, u, ctx.act, weight, a, b, h, ctx.scale,
                                                           ctx.dropout_p, seed,
                                                           (n[0], n[1], n[3], ctx.has_bias and n[4], n[5], n[6]),
                                                           *ctx.dtypes, w_eff, keep)
        return dg, du, None, dw, dbias, d_a, d_b, None, None, None


class GatedMLPFunction(torch.autograd.Function):
    """down(act(gate(x)) ⊙ up(x)) with LoRA on gate, up and down, as one autograd node.

    The arithmetic, and what is saved, of two LoraLinearFunction nodes and a GatedDownFunction
    node, in one node: the autograd engine runs one backward instead of three, and x's
    gradient is accumulated in place (dx += du·W_up) instead of being summed by an add
    kernel. An eager step is paced by its host (benchmarks/RESULTS.md); this is host work
    less per MLP. The tensor arguments are (weight, bias, A, B) of gate, up and down in turn;
    `scales`, `ps` and `seeds` hold one entry each for the three.
    """

    @staticmethod
    def forward(ctx, x: Tensor, act: str, wg: Tensor, bg: Tensor | None, ag: Tensor, bbg: Tensor, wu: Tensor,
                bu: Tensor | None, au: Tensor, bbu: Tensor, wd: Tensor, bd: Tensor | None, ad: Tensor, bbd: Tensor,
                scales: tuple[float, float, float], ps: tuple[float, float, float],
                seeds: tuple[Tensor | None, Tensor | None, Tensor | None]) -> Tensor:
        x2 = _rows(x)  # (T, in)
        # With dropout on gate and up and the kernels running, their expands h·Bᵀ are added in
        # the activation kernel (`gated_act_lora_`) rather than by two passes over g and u.
        fold = (bool(ps[0] and ps[1]) and _kernels(x2, max(ag.shape[0], au.shape[0])) and act in tk.GATED_KERNEL_ACTS
                and wg.shape[0] == wu.shape[0])
        keeps = [_cpu_keep(x2, p, seed, a.shape[0]) for p, seed, a in zip(ps[:2], seeds[:2], (ag, au))]
        (g, hg, ag_c, bg_c, weff_g), (u, hu, au_c, bu_c, weff_u) = _siblings_forward(  # (g or u, h, a, b, w_eff)
            x2, [(w, b, a, bb, s, p, seed, keep) for (w, b, a, bb), s, p, seed, keep in
                 zip(((wg, bg, ag, bbg), (wu, bu, au, bbu)), scales, ps, seeds, keeps)], expand=not fold)
        keeps.append(_cpu_keep(g, ps[2], seeds[2], ad.shape[0]))
        if fold:
            z = tk.gated_act_lora_(g, u, hg, bbg, hu, bbu, act, None if bg_c is bbg else bg_c,
                                   None if bu_c is bbu else bu_c)
            y, hd, ad_c, bd_c, weff_d = _forward(z, wd, bd, ad, bbd, scales[2], ps[2], seeds[2], keeps[2])
        else:
            y, hd, ad_c, bd_c, weff_d = _gated_node_forward(g, u, act, wd, bd, ad, bbd, scales[2], ps[2], seeds[2],
                                                            keeps[2])
        weffs = (weff_g, weff_u, weff_d) if SAVE_W_EFF else (None, None, None)
        ctx.save_for_backward(x, g, u, wg, wu, wd, ag_c, bg_c, au_c, bu_c, ad_c, bd_c, hg, hu, hd, *seeds, *weffs,
                              *keeps)
        ctx.act, ctx.scales, ctx.ps = act, scales, ps
        ctx.dtypes = (ag.dtype, bbg.dtype, au.dtype, bbu.dtype, ad.dtype, bbd.dtype)
        ctx.biases = (bg is not None, bu is not None, bd is not None)
        return _unrows(y, x)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x, g, u, wg, wu, wd, ag, bg, au, bu, ad, bd, hg, hu, hd, seed_g, seed_u, seed_d, weff_g, weff_u, weff_d,
         keep_g, keep_u, keep_d) = ctx.saved_tensors
        n = ctx.needs_input_grad  # x, act, (w, bias, A, B) of gate, up, down, scales, ps, seeds
        (sg, su, sd), (pg, pu, pd), dt, has_bias = ctx.scales, ctx.ps, ctx.dtypes, ctx.biases
        dy2 = _rows(dy)
        dg, du, _, dbias_d, d_ad, d_bd = _gated_node_backward(
            dy2, g, u, ctx.act, wd, ad, bd, hd, sd, pd, seed_d, (True, True, False, has_bias[2] and n[11], n[12], n[13]),
            dt[4], dt[5], weff_d, keep_d)
        dx, ((dbias_g, d_ag, d_bg), (dbias_u, d_au, d_bu)) = _siblings_backward(
            (dg, du), _rows(x),
            ((wg, ag, bg, hg, sg, pg, seed_g, weff_g, keep_g, (has_bias[0] and n[3], n[4], n[5]), dt[0:2]),
             (wu, au, bu, hu, su, pu, seed_u, weff_u, keep_u, (has_bias[1] and n[7], n[8], n[9]), dt[2:4])), n[0])
        if dx is not None:
            dx = as_dtype(_unrows(dx, x), x.dtype)
        return (dx, None, None, dbias_g, d_ag, d_bg, None, dbias_u, d_au, d_bu, None, dbias_d, d_ad, d_bd,
                None, None, None)


class SharedInputFunction(torch.autograd.Function):
    """Two or three LoRA linears reading one input x (q, k and v) as one autograd node.

    Forward is each layer's `_forward` on the one x; backward accumulates dx = Σ dy·W in one
    buffer (the GEMMs add in place, where autograd would sum the layers' dx with add kernels)
    and, with dropout on the kernel route, takes every layer's dropout terms and dA from one
    pass over dx and x (`_siblings_backward`). Saved: x once, and per layer what
    `LoraLinearFunction` saves. The tensor arguments are (weight, bias, A, B) of each layer in
    turn; `scales`, `ps` and `seeds` hold one entry a layer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scales: tuple[float, ...], ps: tuple[float, ...],
                seeds: tuple[Tensor | None, ...], *parts: Tensor | None) -> tuple[Tensor, ...]:
        x2 = _rows(x)  # (T, in)
        n = len(scales)
        keeps = [_cpu_keep(x2, ps[i], seeds[i], parts[4 * i + 2].shape[0]) for i in range(n)]
        outs = _siblings_forward(x2, [(*parts[4 * i:4 * i + 4], scales[i], ps[i], seeds[i], keeps[i]) for i in range(n)])
        ys, saved = [], []
        for i, (y, h, a, b, w_eff) in enumerate(outs):
            ys.append(_unrows(y, x))
            saved += [parts[4 * i], a, b, h, w_eff if SAVE_W_EFF else None]
        ctx.save_for_backward(x, *saved, *seeds, *keeps)
        ctx.scales, ctx.ps, ctx.n = scales, ps, n
        ctx.dtypes = tuple((parts[4 * i + 2].dtype, parts[4 * i + 3].dtype) for i in range(n))
        ctx.biases = tuple(parts[4 * i + 1] is not None for i in range(n))
        ctx.set_materialize_grads(False)  # an output nobody used gets None, and costs nothing
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys: Tensor | None):
        n = ctx.n
        x, *rest = ctx.saved_tensors
        saved, seeds, keeps = rest[:5 * n], rest[5 * n:6 * n], rest[6 * n:]
        need = ctx.needs_input_grad  # x, scales, ps, seeds, then (weight, bias, A, B) a layer
        layers = []
        for i in range(n):
            w, a, b, h, w_eff = saved[5 * i:5 * i + 5]
            needs = (ctx.biases[i] and need[5 + 4 * i], need[6 + 4 * i], need[7 + 4 * i])
            layers.append((w, a, b, h, ctx.scales[i], ctx.ps[i], seeds[i], w_eff, keeps[i], needs, ctx.dtypes[i]))
        dx, grads = _siblings_backward([None if dy is None else _rows(dy) for dy in dys], _rows(x), layers, need[0])
        if dx is not None:
            dx = as_dtype(_unrows(dx, x), x.dtype)
        return dx, None, None, None, *(g for dbias, d_a, d_b in grads for g in (None, dbias, d_a, d_b))


# -- the same two nodes as opaque custom ops, for torch.compile ---------------------------
#
# Traced through (the default), the autograd functions above let the compiler's partitioner
# choose what to keep for backward. Where backward rebuilt a tensor exactly as forward made it
# (W_eff, act(g)·u, the dropped input on the torch ops), the compiler merged the two and kept
# forward's; backward therefore writes those differently under torch.compile, and keeps what
# the eager path keeps (benchmarks/compiled_saved.py lists it). As custom ops the compiler keeps
# exactly what setup_context saves, but the step was slower: on an H100 (Llama-3.2-1B shape,
# 16 × 512) 1.45× the compiled floor against 1.24× traced, and on an H200 (four blocks, later
# kernels) 1.68× against 1.21×, the same kernel time but more host time (benchmarks/RESULTS.md,
# fourteenth set), so the custom ops are opt-in: COMPILE_AS_CUSTOM_OPS = True (or
# LORAKIT_COMPILE_CUSTOM_OPS=1). Eager calls always use the autograd functions.
COMPILE_AS_CUSTOM_OPS = env_flag("LORAKIT_COMPILE_CUSTOM_OPS", default=False)


@torch.library.custom_op("lorakit::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
                    dropout_p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    return _linear_node_forward(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed)[:2]


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    tokens = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(tokens, lora_A.shape[0])


@torch.library.custom_op("lorakit::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                             scale: float, dropout_p: float, seed: Tensor | None, need_dx: bool,
                             need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dbias, dA, dB); dx and dbias are empty when not asked for."""
    dx, _, dbias, d_a, d_b, _ = _linear_node_backward(dy, x, weight, lora_A, lora_B, h, scale, dropout_p, seed,
                                                      (need_dx, False, need_bias, True, True), lora_A.dtype,
                                                      lora_B.dtype)
    return x.new_empty(0) if dx is None else dx, weight.new_empty(0) if dbias is None else dbias, d_a, d_b


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scale, dropout_p, seed, need_dx, need_bias):
    return (x.new_empty(x.shape if need_dx else 0), weight.new_empty(weight.shape[0] if need_bias else 0),
            torch.empty_like(lora_A), torch.empty_like(lora_B))


def _lora_linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, scale, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scale, ctx.dropout_p, ctx.has_bias = scale, dropout_p, bias is not None


def _lora_linear_grad(ctx, dy: Tensor, _dh: Tensor):
    x, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    dx, dbias, d_a, d_b = _lora_linear_backward_op(dy, x, weight, lora_A, lora_B, h, ctx.scale, ctx.dropout_p, seed,
                                                   n[0], ctx.has_bias and n[2])
    return (dx if n[0] else None), None, (dbias if ctx.has_bias and n[2] else None), d_a, d_b, None, None, None


_lora_linear_op.register_autograd(_lora_linear_grad, setup_context=_lora_linear_setup)


@torch.library.custom_op("lorakit::gated_down", mutates_args=())
def _gated_down_op(g: Tensor, u: Tensor, act: str, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                   lora_B: Tensor, scale: float, dropout_p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    return _gated_node_forward(g, u, act, weight, bias, lora_A, lora_B, scale, dropout_p, seed)[:2]


@_gated_down_op.register_fake
def _(g, u, act, weight, bias, lora_A, lora_B, scale, dropout_p, seed):
    tokens = g.numel() // g.shape[-1]
    return g.new_empty(*g.shape[:-1], weight.shape[0]), g.new_empty(tokens, lora_A.shape[0])


@torch.library.custom_op("lorakit::gated_down_backward", mutates_args=())
def _gated_down_backward_op(dy: Tensor, g: Tensor, u: Tensor, act: str, weight: Tensor, lora_A: Tensor,
                            lora_B: Tensor, h: Tensor, scale: float, dropout_p: float, seed: Tensor | None,
                            need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dg, du, dbias, dA, dB); dbias is empty when not asked for."""
    dg, du, _, dbias, d_a, d_b = _gated_node_backward(dy, g, u, act, weight, lora_A, lora_B, h, scale, dropout_p,
                                                      seed, (True, True, False, need_bias, True, True),
                                                      lora_A.dtype, lora_B.dtype)
    return dg, du, weight.new_empty(0) if dbias is None else dbias, d_a, d_b


@_gated_down_backward_op.register_fake
def _(dy, g, u, act, weight, lora_A, lora_B, h, scale, dropout_p, seed, need_bias):
    return (torch.empty_like(g), torch.empty_like(u), weight.new_empty(weight.shape[0] if need_bias else 0),
            torch.empty_like(lora_A), torch.empty_like(lora_B))


def _gated_down_setup(ctx, inputs, output) -> None:
    g, u, act, weight, bias, lora_A, lora_B, scale, dropout_p, seed = inputs
    ctx.save_for_backward(g, u, weight, lora_A, lora_B, output[1], seed)
    ctx.act, ctx.scale, ctx.dropout_p, ctx.has_bias = act, scale, dropout_p, bias is not None


def _gated_down_grad(ctx, dy: Tensor, _dh: Tensor):
    g, u, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    need_bias = ctx.has_bias and n[4]
    dg, du, dbias, d_a, d_b = _gated_down_backward_op(dy, g, u, ctx.act, weight, lora_A, lora_B, h, ctx.scale,
                                                      ctx.dropout_p, seed, need_bias)
    return dg, du, None, None, (dbias if need_bias else None), d_a, d_b, None, None, None


_gated_down_op.register_autograd(_gated_down_grad, setup_context=_gated_down_setup)


def _compiling(weight: Tensor) -> bool:
    """Take the custom-op route: when asked for, under torch.compile, for a frozen base weight."""
    return COMPILE_AS_CUSTOM_OPS and torch.compiler.is_compiling() and not weight.requires_grad


def _seed(p: float, seed: int | Tensor | None, device) -> Tensor | None:
    if not p:
        return None
    return new_seed(device) if seed is None else tk.seed_tensor(seed, device)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float = 0.0, training: bool = False,
                seed: int | Tensor | None = None) -> Tensor:
    """The fused path with `reference.lora_linear`'s signature (plus an optional dropout seed)."""
    p = float(dropout_p) if training else 0.0
    if _compiling(weight):
        return _lora_linear_op(x, weight, bias, lora_A, lora_B, float(scale), p, _seed(p, seed, x.device))[0]
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), p, _seed(p, seed, x.device))


def gated_down(g: Tensor, u: Tensor, act: str, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
               lora_B: Tensor, scale: float, dropout_p: float = 0.0, training: bool = False,
               seed: int | Tensor | None = None) -> Tensor:
    """down(act(g) ⊙ u) with LoRA on down, storing g and u only; `act` names a GATED_ACTIVATIONS entry."""
    p = float(dropout_p) if training else 0.0
    if _compiling(weight):
        return _gated_down_op(g, u, act, weight, bias, lora_A, lora_B, float(scale), p, _seed(p, seed, g.device))[0]
    return GatedDownFunction.apply(g, u, act, weight, bias, lora_A, lora_B, float(scale), p, _seed(p, seed, g.device))


def gated_mlp(x: Tensor, act: str, parts, scales, dropouts, training: bool = False, seeds=None) -> Tensor:
    """down(act(gate(x)) ⊙ up(x)) with LoRA on all three as one node (`GatedMLPFunction`).

    parts: ((weight, bias, A, B) of gate, of up, of down), frozen base weights; scales and
    dropouts one float each; seeds (optional) one dropout seed each.
    """
    ps = tuple(float(p) if training else 0.0 for p in dropouts)
    seeds = tuple(_seed(p, s, x.device) for p, s in zip(ps, seeds or (None,) * 3))
    (wg, bg, ag, bbg), (wu, bu, au, bbu), (wd, bd, ad, bbd) = parts
    return GatedMLPFunction.apply(x, act, wg, bg, ag, bbg, wu, bu, au, bbu, wd, bd, ad, bbd,
                                  tuple(float(s) for s in scales), ps, seeds)


def shared_input_linears(x: Tensor, parts, scales, dropouts, training: bool = False, seeds=None) -> tuple[Tensor, ...]:
    """Two or three LoRA linears on one input x as one node (`SharedInputFunction`): their outputs.

    parts: (weight, bias, A, B) a layer, frozen base weights; scales and dropouts one float a
    layer; seeds (optional) one dropout seed a layer.
    """
    ps = tuple(float(p) if training else 0.0 for p in dropouts)
    seeds = tuple(_seed(p, s, x.device) for p, s in zip(ps, seeds or (None,) * len(ps)))
    return SharedInputFunction.apply(x, tuple(float(s) for s in scales), ps, seeds, *(t for part in parts for t in part))


def lora_linear_inference(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                          scale: float, base=None) -> Tensor:
    """x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ without autograd, with no activation-sized temporary.

    Long inputs (prefill) build W_eff = W + s·B·A and run one GEMM; short ones (decode)
    run the base GEMM and accumulate the expand into its output in place. The switch is
    where the bytes moved are equal: 2·in·out for W_eff against T·(in + 2·out) for
    reading x again and updating y in place. `base` (optional), the base layer, computes
    the base output instead of F.linear, and always takes the in-place route.
    """
    n_out, n_in = weight.shape
    x2 = x.reshape(-1, n_in)  # (T, in)
    ct = x2.dtype
    bias = None if bias is None else as_dtype(bias, ct)
    if base is None and x2.shape[0] * (n_in + 2 * n_out) > 2 * n_in * n_out:
        # A and B go in as they are: the kernel (or its torch twin) rounds them to ct itself.
        w_eff = tk.build_w_eff(as_dtype(weight, ct), lora_A, lora_B, scale, use_kernel=_kernels(x2, lora_A.shape[0]))
        y = torch.nn.functional.linear(x2, w_eff, bias)
    else:
        a, b = as_dtype(lora_A, ct), as_dtype(lora_B, ct)
        y = torch.nn.functional.linear(x2, as_dtype(weight, ct), bias) if base is None else base(x2)
        y.addmm_(x2 @ a.T, b.T, alpha=scale)  # (T, out), in place
    return y.view(*x.shape[:-1], n_out)
