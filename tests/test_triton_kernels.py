"""Triton kernels against plain PyTorch: on the CPU through TRITON_INTERPRET=1 (set in conftest),
on a GPU natively. bfloat16 is checked only on the GPU: the interpreter does not model it."""

import pytest
import torch

triton = pytest.importorskip("triton")

from lorakit.ops import fused  # noqa: E402
from lorakit.ops import reference as ref  # noqa: E402
from lorakit.ops import triton_kernels as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

pytestmark = pytest.mark.skipif(not tk.triton_usable(torch.empty(1, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_out,n_in,r", [(70, 45, 5), (64, 128, 16), (33, 200, 1)])
def test_w_eff(dtype, n_out, n_in, r):
    w, a, b = rand(n_out, n_in, dtype=dtype), rand(r, n_in, seed=1), rand(n_out, r, seed=2)
    got = tk.build_w_eff(w, a, b, 0.7)
    half = dtype != torch.float32
    want = w.float() + 0.7 * (b.to(dtype).float() if half else b) @ (a.to(dtype).float() if half else a)
    assert got.dtype == dtype and rel(got, want) < TOL[dtype]
    # into a row slice and a column slice of larger buffers, as the fused path does
    rows = torch.full((n_out + r, n_in), float("nan"), dtype=dtype, device=DEVICE)
    tk.build_w_eff(w, a, b, 0.7, out=rows[:n_out])
    assert torch.equal(rows[:n_out], got) and rows[n_out:].isnan().all()
    cols = torch.full((n_out, n_in + r), float("nan"), dtype=dtype, device=DEVICE)
    tk.build_w_eff(w, a, b, 0.7, out=cols[:, :n_in])
    assert torch.equal(cols[:, :n_in], got) and cols[:, n_in:].isnan().all()
    # a transposed (Conv1D-style) weight view
    wt = w.T.contiguous().T
    assert torch.equal(tk.build_w_eff(wt, a, b, 0.7), got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_out,n_in,r", [(70, 45, 5), (130, 300, 16), (33, 200, 1)])
def test_w_eff_rounds_float32_factors_itself_and_can_write_them(dtype, n_out, n_in, r):
    """float32 A and B go into the kernel as they are: the same bits as casting them first,
    and `build_w_eff_casts` hands back those rounded copies, written by the kernel (every tile)."""
    w, a, b = rand(n_out, n_in, dtype=dtype, seed=3), rand(r, n_in, seed=4), rand(n_out, r, seed=5)
    half = dtype != torch.float32
    pre = tk.build_w_eff(w, a.to(dtype), b.to(dtype), 0.7) if half else tk.build_w_eff(w, a, b, 0.7)
    assert torch.equal(tk.build_w_eff(w, a, b, 0.7), pre)
    w_eff, a2, b2 = tk.build_w_eff_casts(w, a, b, 0.7)
    assert torch.equal(w_eff, pre)
    assert a2.dtype == b2.dtype == dtype
    assert torch.equal(a2, a.to(dtype)) and torch.equal(b2, b.to(dtype))
    # the torch twin (use_kernel=False) rounds the same way
    w_t, a_t, b_t = tk.build_w_eff_casts(w, a, b, 0.7, use_kernel=False)
    assert torch.equal(a_t, a2) and torch.equal(b_t, b2) and rel(w_t, w_eff) < TOL[dtype] / 10


def test_mask_is_reproducible_and_drops_p():
    m1 = tk.dropout_keep_mask((300, 70), 0.25, 5, DEVICE)
    assert torch.equal(m1, tk.dropout_keep_mask((300, 70), 0.25, 5, DEVICE))
    assert not torch.equal(m1, tk.dropout_keep_mask((300, 70), 0.25, 6, DEVICE))
    assert abs(1 - float(m1.float().mean()) - 0.25) < 0.02


def test_mask_draws_of_a_pair_are_independent():
    # Two columns share one 32-bit hash (its low and high halves): neighbours, within a pair
    # and across pairs and rows, must still look independent, and the drop rate is p's.
    p = 0.3
    keep = tk.keep_mask_torch((1024, 1024), p, tk.seed_tensor(9, "cpu")).float()
    assert abs(1 - float(keep.mean()) - p) < 0.005
    q = 1 - p
    for a, b in [(keep[:, 0::2], keep[:, 1::2]), (keep[:, 1:-1:2], keep[:, 2::2]), (keep[:-1], keep[1:])]:
        assert abs(float((a * b).mean()) - q * q) < 0.005  # P(both kept) = (1-p)² for independent draws
    assert tk.mask_threshold(0.1) == 6554 and tk.mask_threshold(0.5) == 32768 and tk.mask_threshold(1e-7) == 1

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_in,r", [(70, 45, 5), (130, 64, 16), (90, 130, 64)])  # r = 64: the wide tiles
def test_masked_kernels_use_one_mask(dtype, T, n_in, r):
    p, seed = 0.3, 1234
    x, a, dyb = rand(T, n_in, dtype=dtype), rand(r, n_in, dtype=dtype, seed=1), rand(T, r, dtype=dtype, seed=2)
    keep = tk.dropout_keep_mask((T, n_in), p, seed, DEVICE)
    xd = torch.where(keep, x.float() / (1 - p), 0.0)
    assert rel(tk.masked_shrink(x, a, p, seed), xd @ a.float().T) < TOL[dtype]
    assert rel(tk.masked_grad_a(dyb, x, p, seed), dyb.float().T @ xd) < TOL[dtype]
    dx = rand(T, n_in, dtype=dtype, seed=3)
    want = dx.float() + 0.7 * torch.where(keep, dyb.float() @ a.float() / (1 - p), 0.0)
    dx2 = dx.clone()
    assert rel(tk.masked_dx_add_(dx, dyb, a, 0.7, p, seed), want) < TOL[dtype]
    # both backward terms from one pass
    d_a = tk.masked_backward_(dx2, x, dyb, a, 0.7, p, seed)
    assert d_a.dtype == torch.float32 and rel(d_a, 0.7 * dyb.float().T @ xd) < TOL[dtype]
    assert rel(dx2, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_in,ranks", [(70, 45, (5, 3)), (130, 200, (16, 16, 8)), (40, 64, (64, 16, 1))])
def test_masked_backward_siblings_is_one_pass_a_layer(dtype, T, n_in, ranks):
    """Two or three layers reading one x, each with its own mask, rank, scale and p: the shared pass
    gives dx plus every layer's share, and each dA, as `masked_backward_` one layer at a time does."""
    x, dx = rand(T, n_in, dtype=dtype), rand(T, n_in, dtype=dtype, seed=1)
    terms = [(rand(T, r, dtype=dtype, seed=10 + i), rand(r, n_in, dtype=dtype, seed=20 + i), 0.5 + i,
              (0.1, 0.3, 0.5)[i], 100 + i) for i, r in enumerate(ranks)]
    want_dx, want_da = dx.float().clone(), []
    for dyb, a, s, p, seed in terms:
        keep = tk.dropout_keep_mask((T, n_in), p, seed, DEVICE)
        want_dx += s * torch.where(keep, dyb.float() @ a.float() / (1 - p), 0.0)
        want_da.append(s * dyb.float().T @ torch.where(keep, x.float() / (1 - p), 0.0))
    got_da = tk.masked_backward_siblings_(dx, x, terms)
    assert rel(dx, want_dx) < TOL[dtype]
    for got, want in zip(got_da, want_da):
        assert got.dtype == torch.float32 and rel(got, want) < TOL[dtype]
    with pytest.raises(ValueError, match="2 or 3 layers"):
        tk.masked_backward_siblings_(dx, x, terms[:1])
    with pytest.raises(ValueError, match="ranks up to 64, got 80"):
        tk.masked_backward_siblings_(dx, x, [terms[0], (rand(T, 80), rand(80, n_in), 1.0, 0.1, 5)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_in,ranks", [(70, 45, (5, 3)), (130, 200, (16, 16, 8)), (40, 64, (64, 16, 1))])
def test_masked_shrink_siblings_is_one_pass_a_layer(dtype, T, n_in, ranks):
    """Two or three layers reading one x, each with its own mask, rank, scale and p: one pass gives
    each layer's h as `masked_shrink` does, and the rounded A copies asked for."""
    x = rand(T, n_in, dtype=dtype)
    a_s = [rand(r, n_in, seed=20 + i) for i, r in enumerate(ranks)]  # float32 adapters, rounded to x's dtype
    outs = [torch.full((r, n_in), float("nan"), dtype=dtype, device=DEVICE) if i != 1 else None
            for i, r in enumerate(ranks)]
    terms = [(a, 0.5 + i, (0.1, 0.3, 0.5)[i], 100 + i, out) for i, (a, out) in enumerate(zip(a_s, outs))]
    got = tk.masked_shrink_siblings(x, terms)
    for (a, s, p, seed, out), h in zip(terms, got):
        keep = tk.dropout_keep_mask((T, n_in), p, seed, DEVICE)
        want = s * torch.where(keep, x.float() / (1 - p), 0.0) @ a.to(dtype).float().T
        assert h.dtype == dtype and h.shape == (T, a.shape[0]) and rel(h, want) < TOL[dtype]
        assert rel(h, tk.masked_shrink(x, a, p, seed, s)) < TOL[dtype]
        if out is not None:
            assert torch.equal(out, a.to(dtype))
    with pytest.raises(ValueError, match="2 or 3 layers"):
        tk.masked_shrink_siblings(x, terms[:1])
    with pytest.raises(ValueError, match="ranks up to 64, got 80"):
        tk.masked_shrink_siblings(x, [terms[0], (rand(80, n_in), 1.0, 0.1, 5, None)])


@pytest.mark.parametrize("r", [4, 256, 300])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fused_function_with_kernels_matches_reference(p, r, monkeypatch):
    """A layer on the kernel route against the reference; at rank 256 the masked shrink runs at its
    narrow-k tile (MASKED_SHRINK_WIDE_CONFIG), and above tk.KERNEL_MAX_RANK no kernel runs at all."""
    calls = []  # the kernels launched (W + s·B·A: asked to use its kernel)
    for name in ("masked_shrink", "expand_add_", "masked_backward_", "build_w_eff_casts", "build_w_eff"):
        real = getattr(tk, name)

        def spy(*args, _real=real, _name=name, **kw):
            if kw.get("use_kernel", True) is not False:
                calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(tk, name, spy)
    masks = []  # masks made with torch ops
    real_mask = fused._keep_mask
    monkeypatch.setattr(fused, "_keep_mask", lambda *args: masks.append(1) or real_mask(*args))
    fused.use_kernels_on_cpu(True)
    try:
        x = rand(3, 7, 40, seed=4).requires_grad_(True)
        w, bias = rand(24, 40, seed=5), rand(24, seed=6)
        a, b = rand(r, 40, seed=7).requires_grad_(True), rand(24, r, seed=8).requires_grad_(True)
        y = fused.lora_linear(x, w, bias, a, b, 0.5, p, training=True, seed=77)
        mask = tk.dropout_keep_mask((21, 40), p, 77, DEVICE).reshape(x.shape).float() / (1 - p) if p else 1.0
        yr = ref.lora_linear(x, w, bias, a, b, 0.5) if not p else \
            torch.nn.functional.linear(x, w, bias) + ((x * mask) @ a.T @ b.T) * 0.5
        dy = torch.randn_like(yr)
        assert rel(y, yr) < 1e-5
        for g1, g2 in zip(torch.autograd.grad(y, (x, a, b), dy), torch.autograd.grad(yr, (x, a, b), dy)):
            assert rel(g1, g2) < 1e-5
    finally:
        fused.use_kernels_on_cpu(False)
    if r > tk.KERNEL_MAX_RANK:
        assert not calls
        assert len(masks) == (1 if p else 0)  # forward's mask, kept for backward
    else:
        assert ("masked_shrink" in calls) == bool(p) and ("build_w_eff_casts" in calls) == (not p)
        assert not masks


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("T,n,r", [(70, 45, 5), (200, 300, 16)])
def test_dropout_kernels_round_float32_factors_and_can_write_them(dtype, T, n, r):
    """The masked shrink and the in-place expand read float32 A and B as they are: the same
    result as casting them first, and with a_out / b_out they hand back those rounded copies."""
    x, a, b = rand(T, n, dtype=dtype, seed=1), rand(r, n, seed=2), rand(n, r, seed=3)
    h_pre = tk.masked_shrink(x, a.to(dtype), 0.25, 9, 0.5)
    a_out = torch.full((r, n), float("nan"), dtype=dtype, device=DEVICE)
    h = tk.masked_shrink(x, a, 0.25, 9, 0.5, a_out)
    assert torch.equal(h, h_pre) and torch.equal(a_out, a.to(dtype))
    y = rand(T, n, dtype=dtype, seed=4)
    y_pre = tk.expand_add_(y.clone(), h, b.to(dtype))
    b_out = torch.full((n, r), float("nan"), dtype=dtype, device=DEVICE)
    assert torch.equal(tk.expand_add_(y, h, b, b_out), y_pre) and torch.equal(b_out, b.to(dtype))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fused_half_forward_takes_float32_adapters_without_casts(p):
    """Half compute, float32 adapters: forward's A and B in the compute dtype come out of the
    kernels that read them (the W + s·B·A kernel; with dropout, the masked shrink and the expand),
    the same bits as .to(); the node's outputs and gradients match the reference within
    half-precision tolerance."""
    fused.use_kernels_on_cpu(True)
    try:
        ht = torch.float16
        x2, w = rand(21, 40, dtype=ht, seed=4), rand(24, 40, dtype=ht, seed=5)
        a, b = rand(4, 40, seed=7), rand(24, 4, seed=8)
        seed = tk.seed_tensor(77, DEVICE) if p else None
        y, h, a2, b2, w_eff = fused._forward(x2, w, None, a, b, 0.5, p, seed)
        assert a2.dtype == b2.dtype == ht and torch.equal(a2, a.to(ht)) and torch.equal(b2, b.to(ht))
        if not p:
            assert torch.equal(w_eff, tk.build_w_eff(w, a.to(ht), b.to(ht), 0.5))
        x = x2.reshape(3, 7, 40).detach().requires_grad_(True)
        a.requires_grad_(True), b.requires_grad_(True)
        y = fused.lora_linear(x, w, None, a, b, 0.5, p, training=True, seed=77)
        xd = x.detach().double().requires_grad_(True)
        ad, bd = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
        mask = tk.dropout_keep_mask((21, 40), p, 77, DEVICE).reshape(x.shape).double() / (1 - p) if p else 1.0
        yr = torch.nn.functional.linear(xd, w.double()) + ((xd * mask) @ ad.T @ bd.T) * 0.5
        dy = torch.randn(yr.shape, dtype=torch.float64, device=DEVICE)
        assert y.dtype == ht and rel(y, yr) < TOL[ht]
        got = torch.autograd.grad(y, (x, a, b), dy.to(ht))
        want = torch.autograd.grad(yr, (xd, ad, bd), dy)
        assert got[1].dtype == got[2].dtype == torch.float32
        for g1, g2 in zip(got, want):
            assert rel(g1, g2) < TOL[ht]
    finally:
        fused.use_kernels_on_cpu(False)


# 0.5·2¹⁶ is a whole number: the threshold's edge case; 1/3 and 1e-7 round in float32 before the test;
# odd widths (5, 129) end on half a pair
@pytest.mark.parametrize("p", [0.3, 0.5, 0.1, 1 / 3, 1e-7, 0.999])
@pytest.mark.parametrize("seed", [0, 5, 2**31 - 2])
def test_torch_mask_equals_kernel_mask(seed, p):
    for shape in [(300, 70), (1, 5), (64, 129)]:
        kernel = tk.dropout_keep_mask(shape, p, seed, DEVICE)
        torch_mask = tk.keep_mask_torch(shape, p, tk.seed_tensor(seed, DEVICE))
        assert torch.equal(kernel, torch_mask)


def gated_reference(g, u, act):
    fn = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
          "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[act]
    return fn(g) * u


@pytest.mark.parametrize("act", sorted(tk.GATED_KERNEL_ACTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_act(act, dtype):
    g, u = rand(70, 45, dtype=dtype), rand(70, 45, dtype=dtype, seed=1)
    got = tk.gated_act(g, u, act)
    assert got.dtype == dtype and got.shape == g.shape
    assert rel(got, gated_reference(g.double(), u.double(), act)) < TOL[dtype]


@pytest.mark.parametrize("act", sorted(tk.GATED_KERNEL_ACTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,width,r,p", [(70, 45, 5, 0.0), (70, 45, 5, 0.3), (130, 64, 16, 0.0), (200, 96, 1, 0.2),
                                         (90, 130, 64, 0.2)])  # r = 64 with dropout: the wide tile
def test_gated_backward_matches_autograd(act, dtype, T, width, r, p):
    """dg, du and dA = s·dyBᵀ·dropout(act(g)⊙u) from one pass, against float64 autograd with the kernels' mask;
    with dropout the kernel also adds LoRA's share s·(dyB·A)⊙mask/(1-p) to dz first."""
    seed, scale = 99, 0.7
    g = rand(T, width, dtype=dtype).requires_grad_(True)
    u = rand(T, width, dtype=dtype, seed=1).requires_grad_(True)
    dz, dyb = rand(T, width, dtype=dtype, seed=2), rand(T, r, dtype=dtype, seed=3)
    a = rand(r, width, dtype=dtype, seed=4) * 0.3
    g64, u64 = g.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    z = gated_reference(g64, u64, act)
    keep = (tk.dropout_keep_mask((T, width), p, seed, DEVICE) if p else torch.ones(T, width, dtype=torch.bool)).to(z.device)
    dz_total = dz.double() + (scale * torch.where(keep, dyb.double() @ a.double() / (1 - p), 0.0) if p else 0.0)
    want_dg, want_du = torch.autograd.grad(z, (g64, u64), dz_total)
    want_da = scale * dyb.double().T @ torch.where(keep, z.detach() / (1 - p), 0.0)
    dz_in = dz.clone()
    dg, du, da = tk.gated_backward(dz_in, g.detach(), u.detach(), dyb, act, scale, p, seed, a if p else None)
    assert dg.data_ptr() == dz_in.data_ptr()  # dg is written over dz
    assert dg.dtype == du.dtype == dtype and da.dtype == torch.float32 and da.shape == (r, width)
    assert rel(dg, want_dg) < TOL[dtype]
    assert rel(du, want_du) < TOL[dtype]
    assert rel(da, want_da) < TOL[dtype]


@pytest.mark.parametrize("act", sorted(tk.GATED_KERNEL_ACTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,width,rg,ru", [(70, 45, 5, 3), (130, 256, 16, 16), (33, 200, 1, 64)])
def test_gated_act_lora_folds_both_expands_into_the_activation(act, dtype, T, width, rg, ru):
    """act(g + hg·Bgᵀ) ⊙ (u + hu·Buᵀ) with g and u updated in place: the same values as two in-place
    expands and gated_act, and the rounded B copies written where asked (ranks of gate and up differ)."""
    g, u = rand(T, width, dtype=dtype), rand(T, width, dtype=dtype, seed=1)
    hg, hu = rand(T, rg, dtype=dtype, seed=2), rand(T, ru, dtype=dtype, seed=3)
    bg, bu = rand(width, rg, seed=4), rand(width, ru, seed=5)  # float32 adapters, rounded to g's dtype
    want_g = g.double() + hg.double() @ bg.to(dtype).double().T
    want_u = u.double() + hu.double() @ bu.to(dtype).double().T
    two_step_g, two_step_u = tk.expand_add_(g.clone(), hg, bg), tk.expand_add_(u.clone(), hu, bu)
    two_step_z = tk.gated_act(two_step_g, two_step_u, act)
    bg_out = torch.full(bg.shape, float("nan"), dtype=dtype, device=DEVICE) if dtype != torch.float32 else None
    bu_out = torch.full(bu.shape, float("nan"), dtype=dtype, device=DEVICE) if dtype != torch.float32 else None
    g_ptr = g.data_ptr()
    z = tk.gated_act_lora_(g, u, hg, bg, hu, bu, act, bg_out, bu_out)
    assert g.data_ptr() == g_ptr and z.dtype == dtype and z.shape == (T, width)
    assert rel(g, want_g) < TOL[dtype] and rel(u, want_u) < TOL[dtype]
    assert rel(z, gated_reference(want_g, want_u, act)) < TOL[dtype]
    # z comes from the rounded g and u, as the gated backward recomputes it
    assert rel(z, tk.gated_act(g, u, act)) < TOL[dtype] / 10
    for got, want in ((g, two_step_g), (u, two_step_u), (z, two_step_z)):
        assert rel(got, want) < TOL[dtype] / 10
    if bg_out is not None:
        assert torch.equal(bg_out, bg.to(dtype)) and torch.equal(bu_out, bu.to(dtype))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("trainable_w", [False, True])
def test_gated_down_with_kernels_matches_reference(act, p, trainable_w, monkeypatch):
    """The fused gated-MLP node on the kernel route (a trainable down weight takes the torch route)."""
    calls = []
    real = tk.gated_backward
    monkeypatch.setattr(tk, "gated_backward", lambda *args: calls.append(1) or real(*args))
    fused.use_kernels_on_cpu(True)
    try:
        g = rand(3, 7, 40, seed=4).requires_grad_(True)
        u = rand(3, 7, 40, seed=5).requires_grad_(True)
        w = rand(24, 40, seed=6).requires_grad_(trainable_w)
        a, b = rand(4, 40, seed=7).requires_grad_(True), rand(24, 4, seed=8).requires_grad_(True)
        y = fused.gated_down(g, u, act, w, None, a, b, 0.5, p, training=True, seed=77)
        z = gated_reference(g, u, act)
        mask = tk.dropout_keep_mask((21, 40), p, 77, DEVICE).reshape(z.shape).float() / (1 - p) if p else 1.0
        yr = torch.nn.functional.linear(z, w) + ((z * mask) @ a.T @ b.T) * 0.5
        dy = torch.randn_like(yr)
        assert rel(y, yr) < 1e-5
        inputs = (g, u, a, b) + ((w,) if trainable_w else ())
        for got, want in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(yr, inputs, dy)):
            assert rel(got, want) < 1e-5
        assert len(calls) == (0 if trainable_w else 1)
    finally:
        fused.use_kernels_on_cpu(False)


@pytest.mark.parametrize("ranks", [(4, 3, 4), (300, 3, 300)], ids=["narrow", "above-the-kernels-rank"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_whole_gated_mlp_node_with_kernels_matches_reference(p, ranks, monkeypatch):
    """gate, up and down as one node on the kernel route, against per-layer reference arithmetic;
    with dropout, gate's and up's expands go through the activation kernel (`gated_act_lora_`) and
    their backward dropout terms through one shared pass (`masked_backward_siblings_`). Where gate
    and down have ranks above tk.KERNEL_MAX_RANK, they take the torch ops, and the fold and the
    shared pass are not used."""
    folds, shared = [], []
    real = tk.gated_act_lora_
    monkeypatch.setattr(tk, "gated_act_lora_", lambda *args: folds.append(1) or real(*args))
    real_shared = tk.masked_backward_siblings_
    monkeypatch.setattr(tk, "masked_backward_siblings_", lambda *args: shared.append(1) or real_shared(*args))
    shrinks = []
    real_shrinks = tk.masked_shrink_siblings
    monkeypatch.setattr(tk, "masked_shrink_siblings", lambda *args: shrinks.append(1) or real_shrinks(*args))
    fused.use_kernels_on_cpu(True)
    try:
        x = rand(3, 7, 40, seed=4).requires_grad_(True)
        rg, ru, rd = ranks  # the ranks of gate and up differ
        parts = [(rand(64, 40, seed=5), None, rand(rg, 40, seed=6).requires_grad_(True),
                  rand(64, rg, seed=7).requires_grad_(True)),
                 (rand(64, 40, seed=8), None, rand(ru, 40, seed=9).requires_grad_(True),
                  rand(64, ru, seed=10).requires_grad_(True)),
                 (rand(24, 64, seed=11), None, rand(rd, 64, seed=12).requires_grad_(True),
                  rand(24, rd, seed=13).requires_grad_(True))]
        seeds = (77, 78, 79)
        y = fused.gated_mlp(x, "silu", parts, (0.5, 0.5, 0.5), (p, p, p), training=True, seeds=seeds)

        def layer(inp, part, seed):
            w, _, a, b = part
            mask = tk.dropout_keep_mask((21, inp.shape[-1]), p, seed, DEVICE).reshape(inp.shape).float() / (1 - p) \
                if p else 1.0
            return torch.nn.functional.linear(inp, w) + ((inp * mask) @ a.T @ b.T) * 0.5

        yr = layer(gated_reference(layer(x, parts[0], 77), layer(x, parts[1], 78), "silu"), parts[2], 79)
        leaves = [x] + [t for part in parts for t in part[2:]]
        dy = torch.randn_like(yr)
        assert rel(y, yr) < 1e-5
        for got, want in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(yr, leaves, dy)):
            assert rel(got, want) < 1e-5
        narrow = max(ranks) <= tk.KERNEL_MAX_RANK
        assert len(folds) == (1 if p and narrow else 0)
        assert len(shared) == (1 if p and narrow else 0)  # gate's and up's dropout terms in one pass over dx and x
        assert not shrinks  # two shrinks stay one a layer: the shared one was not faster at two
    finally:
        fused.use_kernels_on_cpu(False)


@pytest.mark.parametrize("ranks", [(4, 3, 5), (24, 3, 5), (80, 3, 5)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_shared_input_node_with_kernels_matches_reference(p, ranks, monkeypatch):
    """q, k and v as one node on the kernel route (biased, ranks and widths differing), against
    per-layer reference arithmetic; with dropout the three layers' shrinks and their backward
    dropout terms come from one shared pass each, unless a rank is above tk.SIBLINGS_ROUTE_MAX_RANK
    (then q's run alone and k's and v's in one pass)."""
    shared, shrinks = [], []
    real = tk.masked_backward_siblings_
    monkeypatch.setattr(tk, "masked_backward_siblings_", lambda *args: shared.append(1) or real(*args))
    real_shrinks = tk.masked_shrink_siblings
    monkeypatch.setattr(tk, "masked_shrink_siblings", lambda *args: shrinks.append(1) or real_shrinks(*args))
    fused.use_kernels_on_cpu(True)
    try:
        x = rand(3, 7, 40, seed=4).requires_grad_(True)
        parts = [(rand(out, 40, seed=10 + i), rand(out, seed=20 + i), rand(r, 40, seed=30 + i).requires_grad_(True),
                  rand(out, r, seed=40 + i).requires_grad_(True)) for i, (out, r) in enumerate(zip((40, 16, 16), ranks))]
        scales, seeds = (0.5, 0.7, 0.9), (77, 78, 79)
        ys = fused.shared_input_linears(x, parts, scales, (p, p, p), training=True, seeds=seeds)

        def layer(part, s, seed):
            w, bias, a, b = part
            mask = tk.dropout_keep_mask((21, 40), p, seed, DEVICE).reshape(x.shape).float() / (1 - p) if p else 1.0
            return torch.nn.functional.linear(x, w, bias) + ((x * mask) @ a.T @ b.T) * s

        yrs = [layer(part, s, seed) for part, s, seed in zip(parts, scales, seeds)]
        leaves = [x] + [t for part in parts for t in part[2:]]
        dys = [torch.randn_like(y) for y in yrs]
        assert all(rel(y, yr) < 1e-5 for y, yr in zip(ys, yrs))
        for got, want in zip(torch.autograd.grad(ys, leaves, dys), torch.autograd.grad(yrs, leaves, dys)):
            assert rel(got, want) < 1e-5
        assert len(shared) == (1 if p else 0)  # k's and v's at least
        # rank 24 runs a layer at a time: the shared passes are routed up to rank 16 (measured faster
        # a layer at a time at r = 64 on an H200; tk.SIBLINGS_ROUTE_MAX_RANK)
        assert tk.SIBLINGS_ROUTE_MAX_RANK == 16
        assert len(shrinks) == (1 if p and max(ranks) <= 16 else 0)
    finally:
        fused.use_kernels_on_cpu(False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,n_out,r", [(70, 45, 5), (130, 256, 16), (33, 200, 1)])
def test_expand_add_in_place(dtype, T, n_out, r):
    y, h, b = rand(T, n_out, dtype=dtype), rand(T, r, dtype=dtype, seed=1), rand(n_out, r, dtype=dtype, seed=2)
    want = y.double() + h.double() @ b.double().T
    out = tk.expand_add_(y, h, b)
    assert out.data_ptr() == y.data_ptr() and out.dtype == dtype
    assert rel(y, want) < TOL[dtype]
    # a row-strided output (every other row of a larger buffer) is updated where it lies, nothing else
    buf = rand(2 * T, n_out, dtype=dtype, seed=3)
    keep = buf[1::2].clone()
    want = buf[::2].double() + h.double() @ b.double().T
    tk.expand_add_(buf[::2], h, b)
    assert rel(buf[::2], want) < TOL[dtype] and torch.equal(buf[1::2], keep)


def test_dropout_forward_updates_y_in_place(monkeypatch):
    """Wherever the kernels run, the dropout forward adds the expand with the in-place kernel, eagerly
    and while torch.compile traces (the compiler's out-of-place addmm would copy y first); where they
    do not, with addmm_. Same values every way. (The interpreter cannot run under the compiler: the
    GPU test compiles the node with inductor.)"""
    calls = []
    real = tk.expand_add_
    monkeypatch.setattr(tk, "expand_add_", lambda *args: calls.append(1) or real(*args))
    x2, w = rand(21, 40, seed=4), rand(24, 40, seed=5)
    a, b, seed = rand(4, 40, seed=7), rand(24, 4, seed=8), tk.seed_tensor(77, DEVICE)
    y_torch, h_torch, *_ = fused._forward(x2, w, None, a, b, 0.5, 0.2, seed)
    assert not calls, "without the kernels the expand is torch's addmm_"
    fused.use_kernels_on_cpu(True)
    try:
        y_eager, h, *_ = fused._forward(x2, w, None, a, b, 0.5, 0.2, seed)
        assert len(calls) == 1, "the eager kernel forward did not take the in-place expand kernel"
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        y_traced, h2, *_ = fused._forward(x2, w, None, a, b, 0.5, 0.2, seed)
        assert len(calls) == 2, "the traced forward did not take the in-place expand kernel"
        assert torch.equal(h, h2) and torch.equal(y_traced, y_eager)
        assert rel(h, h_torch) < 1e-5 and rel(y_eager, y_torch) < 1e-5
        mask = tk.dropout_keep_mask((21, 40), 0.2, 77, DEVICE).float() / 0.8
        assert rel(y_traced, x2 @ w.T + ((x2 * mask) @ a.T @ b.T) * 0.5) < 1e-5
    finally:
        fused.use_kernels_on_cpu(False)


def test_host_helpers_match_triton():
    # The launch-grid helpers stand in for triton.cdiv and triton.next_power_of_2 (cheaper to call).
    for a in range(0, 300):
        for b in (1, 3, 16, 32, 64, 128):
            assert tk.cdiv(a, b) == triton.cdiv(a, b)
    for n in range(1, 1100):
        assert tk.next_power_of_2(n) == triton.next_power_of_2(n)


def test_as_dtype_and_seed_tensor_reuse_their_input():
    t = torch.randn(3)
    assert tk.as_dtype(t, torch.float32) is t and tk.as_dtype(t, torch.float64).dtype == torch.float64
    seed = fused.new_seed("cpu")
    assert tk.seed_tensor(seed, seed.device) is seed
    other = tk.seed_tensor(torch.tensor(7, dtype=torch.int32), "cpu")
    assert other.dtype == torch.int64 and other.shape == (1,) and int(other) == 7
