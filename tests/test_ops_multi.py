"""Mixed-adapter LoRA (`lorakit.ops.multi`) against a per-row loop over `reference.lora_linear`.

Tolerances are relative Frobenius errors per batch row: ≤ 1e-12 in float64 (torch path),
≤ 1e-5 in float32 (torch path, and the Triton kernels: under TRITON_INTERPRET=1 on the CPU,
natively on a GPU), ≤ 2e-3 in float16 (kernels). bfloat16 is checked on a GPU only (the
interpreter does not model it), at Llama-3.2-1B shapes: ≤ 1e-2 against a float32 oracle.
"""

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops import fused, multi
from lorakit.ops import reference as ref
from lorakit.ops import triton_kernels as tk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_IN, N_OUT = 48, 40
RANKS, SCALES = (2, 8, 5), (0.5, 2.0, 1.5)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}
PATHS = [(torch.float64, "torch"), (torch.float32, "torch"), (torch.float32, "kernels"), (torch.float16, "kernels")]
KERNEL_PATHS = PATHS[2:]
PATH_IDS = [f"{str(dtype).removeprefix('torch.')}-{path}" for dtype, path in PATHS]
# (rows' adapters, adapter ranks, seq, in, out); "wide" takes several `in` steps and output blocks in the kernels
LAYOUTS = {
    "mixed-decode": ([0, -1, 2, 1, 0], RANKS, 1, N_IN, N_OUT),
    "mixed-seq3": ([0, -1, 2, 1, 0], RANKS, 3, N_IN, N_OUT),
    "mixed-seq17": ([0, -1, 2, 1, 0], RANKS, 17, N_IN, N_OUT),
    "all-base": ([-1] * 5, RANKS, 3, N_IN, N_OUT),
    "one-adapter": ([0, 0, -1, 0, 0], (8,), 17, N_IN, N_OUT),
    "wide": ([1, -1, 0], (20, 3), 5, 300, 200),
}


@pytest.fixture
def path(request):
    """'torch', or 'kernels': the Triton kernels (on the CPU through the interpreter)."""
    if request.param == "kernels":
        if not tk.triton_usable(torch.empty(1, device=DEVICE)):
            pytest.skip("needs a GPU or TRITON_INTERPRET=1")
        fused.use_kernels_on_cpu(True)
    yield request.param
    fused.use_kernels_on_cpu(False)


def make(dtype, rows, ranks, seq, n_in=N_IN, n_out=N_OUT, with_bias=True, seed=0):
    """x (n_rows, seq, in), W, bias, the adapters' A/B lists and the stacked tables, in `dtype` on DEVICE."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(DEVICE, dtype)

    x = rand(len(rows), seq, n_in)
    w = rand(n_out, n_in, std=n_in**-0.5)
    bias = rand(n_out) if with_bias else None
    a_list = [rand(r, n_in, std=n_in**-0.5) for r in ranks]
    b_list = [rand(n_out, r, std=r**-0.5) for r in ranks]
    a_stack, b_stack, R = multi.stack_adapters(a_list, b_list, SCALES[: len(ranks)], dtype, DEVICE)
    row_adapter = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    return x, w, bias, a_list, b_list, a_stack, b_stack, R, row_adapter


def per_row_reference(x, w, bias, a_list, b_list, scales, rows):
    """reference.lora_linear row by row with the row's adapter (F.linear for -1), in float32 or float64."""
    acc = torch.promote_types(x.dtype, torch.float32)
    w, bias = w.to(acc), None if bias is None else bias.to(acc)
    out = []
    for i, a in enumerate(rows):
        xi = x[i].to(acc)
        out.append(F.linear(xi, w, bias) if a < 0 else
                   ref.lora_linear(xi, w, bias, a_list[a].to(acc), b_list[a].to(acc), scales[a]))
    return torch.stack(out)


def row_errors(got, want) -> list[float]:
    """Relative Frobenius error of each batch row (first dimension)."""
    g, w = got.double().flatten(1), want.double().flatten(1)
    return ((g - w).norm(dim=1) / w.norm(dim=1).clamp_min(1e-30)).tolist()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype,path", PATHS, indirect=["path"], ids=PATH_IDS)
def test_multi_lora_linear_matches_per_row_reference(dtype, path, layout, with_bias):
    rows, ranks, seq, n_in, n_out = LAYOUTS[layout]
    x, w, bias, a_list, b_list, a_stack, b_stack, R, row_adapter = make(dtype, rows, ranks, seq, n_in, n_out,
                                                                        with_bias)
    if path == "kernels":
        assert multi.kernels_usable(x.reshape(-1, n_in), R)
    y = multi.multi_lora_linear(x, w, bias, a_stack, b_stack, row_adapter)
    assert y.shape == (len(rows), seq, n_out) and y.dtype == dtype
    want = per_row_reference(x, w, bias, a_list, b_list, SCALES, rows)
    assert max(row_errors(y, want)) <= TOL[dtype]
    # the adapters change their rows far beyond the tolerance, so a wrong or missing adapter fails
    base = F.linear(x.to(want.dtype), w.to(want.dtype), None if bias is None else bias.to(want.dtype))
    assert all(e > 0.05 for e, a in zip(row_errors(base, want), rows) if a >= 0)
    if seq == 1:  # decode: (n_rows, in) in, (n_rows, out) out
        y2 = multi.multi_lora_linear(x[:, 0], w, bias, a_stack, b_stack, row_adapter)
        assert y2.shape == (len(rows), n_out) and torch.equal(y2, y[:, 0])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype,path", KERNEL_PATHS, indirect=["path"], ids=PATH_IDS[2:])
def test_kernels_match_torch_ops(dtype, path, layout, with_bias):
    rows, ranks, seq, n_in, n_out = LAYOUTS[layout]
    x, _, bias, _, _, a_stack, b_stack, R, row_adapter = make(dtype, rows, ranks, seq, n_in, n_out, with_bias, seed=1)
    tol = TOL[dtype]
    x2 = x.reshape(-1, n_in)
    base_tok = (row_adapter < 0).repeat_interleave(seq)  # (T,) tokens of rows without an adapter

    h = multi.lora_shrink(x2, a_stack, row_adapter, seq)
    assert h.shape == (len(rows) * seq, R) and h.dtype == torch.float32
    assert max(row_errors(h, multi.lora_shrink_torch(x2, a_stack, row_adapter, seq))) <= tol
    assert not h[base_tok].any() and not h[:, max(ranks):].any()  # -1 rows and the rank padding are exact zeros

    # expand reads h only on rows with an adapter: give it nonzero values everywhere
    h = torch.randn(h.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    e = multi.lora_expand(h, b_stack, row_adapter, seq, bias, dtype)
    want = multi.lora_expand_torch(h, b_stack, row_adapter, seq, bias, dtype)
    assert e.shape == (len(rows) * seq, n_out) and e.dtype == dtype
    assert max(row_errors(e, want)) <= tol
    expected_base = torch.zeros(n_out, dtype=dtype, device=DEVICE) if bias is None else bias
    assert torch.equal(e[base_tok], expected_base.expand(int(base_tok.sum()), n_out))

    y = torch.randn(len(rows) * seq, n_out, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    got = multi.lora_expand_add_(y.clone(), h, b_stack, row_adapter, seq)
    want = multi.lora_expand_add_torch(y.clone(), h, b_stack, row_adapter, seq)
    assert max(row_errors(got, want)) <= tol
    assert torch.equal(got[base_tok], y[base_tok])  # untouched
    y_in = y.clone()
    assert multi.lora_expand_add_(y_in, h, b_stack, row_adapter, seq) is y_in

    # h as a column block of a wider tensor (row stride 3R): the kernels read it in place
    wide = torch.randn(h.shape[0], 3 * R, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    block = wide[:, R:2 * R]
    assert block.stride(0) == 3 * R
    assert max(row_errors(multi.lora_expand(block, b_stack, row_adapter, seq, bias, dtype),
                          multi.lora_expand_torch(block, b_stack, row_adapter, seq, bias, dtype))) <= tol
    assert max(row_errors(multi.lora_expand_add_(y.clone(), block, b_stack, row_adapter, seq),
                          multi.lora_expand_add_torch(y.clone(), block, b_stack, row_adapter, seq))) <= tol


@pytest.mark.parametrize("members", [2, 3])
@pytest.mark.parametrize("layout", ["mixed-seq17", "wide"])
@pytest.mark.parametrize("dtype,path", PATHS, indirect=["path"], ids=PATH_IDS)
def test_group_shrink_equals_each_members_shrink(dtype, path, layout, members):
    """One pass over x for two or three layers' A tables gives each layer's own shrink, side by side."""
    rows, ranks, seq, n_in, n_out = LAYOUTS[layout]
    tables = [make(dtype, rows, ranks, seq, n_in, n_out, seed=10 + i) for i in range(members)]
    x2, row_adapter = tables[0][0].reshape(-1, n_in), tables[0][-1]
    a_stacks = [t[5] for t in tables]
    R = a_stacks[0].shape[1]
    h = multi.lora_shrink_group(x2, a_stacks, row_adapter, seq)
    assert h.shape == (x2.shape[0], members * R)
    for m, a in enumerate(a_stacks):
        assert max(row_errors(h[:, m * R:(m + 1) * R], multi.lora_shrink_torch(x2, a, row_adapter, seq))) <= TOL[dtype]
    with pytest.raises(ValueError, match=r"a_stack 1: expected a contiguous table of a_stack 0's shape"):
        multi.lora_shrink_group(x2, [a_stacks[0], a_stacks[1][:, :8]], row_adapter, seq)
    with pytest.raises(ValueError, match=r"expected 1 to 3 A tables; found 4"):
        multi.lora_shrink_group(x2, a_stacks[:1] * 4, row_adapter, seq)


@pytest.mark.parametrize("dtype,path", KERNEL_PATHS, indirect=["path"], ids=PATH_IDS[2:])
def test_mixed_linear_plan_repeats_multi_lora_linear(dtype, path):
    """A `MixedLinear` plan built from one x gives `multi_lora_linear`'s output for other inputs of
    that shape (strided ones too), checks nothing when called, and takes an h computed elsewhere."""
    rows, ranks, seq, n_in, n_out = LAYOUTS["mixed-seq17"]
    x, w, bias, _, _, a_stack, b_stack, R, row_adapter = make(dtype, rows, ranks, seq, n_in, n_out, True, seed=5)
    plan = multi.MixedLinear(x, w, bias, a_stack, b_stack, row_adapter)
    tol = TOL[dtype]
    other = torch.randn(x.shape[0], x.shape[1], 2 * n_in, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    for xi in (x, other[..., ::2]):  # the second is strided
        want = multi.multi_lora_linear(xi.contiguous(), w, bias, a_stack, b_stack, row_adapter)
        assert max(row_errors(plan(xi).reshape(-1, n_out), want.reshape(-1, n_out))) <= tol
    h = multi.lora_shrink(x.reshape(-1, n_in), a_stack, row_adapter, seq)
    assert torch.equal(plan(x, h), plan(x))
    with pytest.raises(ValueError, match=r"weight: expected shape \(out, 48\)"):
        multi.MixedLinear(x, w[:, 1:], bias, a_stack, b_stack, row_adapter)


def test_stack_adapters_pads_with_zeros_and_scales_b():
    a_list = [torch.randn(2, 6), torch.randn(5, 6)]
    b_list = [torch.randn(4, 2), torch.randn(4, 5)]
    a_stack, b_stack, R = multi.stack_adapters(a_list, b_list, [0.5, 3.0], torch.float64, "cpu")
    assert R == 16 and a_stack.shape == (2, 16, 6) and b_stack.shape == (2, 4, 16) and a_stack.dtype == torch.float64
    for i, (a, b, s) in enumerate(zip(a_list, b_list, [0.5, 3.0])):
        r = a.shape[0]
        assert torch.equal(a_stack[i, :r], a.double()) and not a_stack[i, r:].any()
        assert torch.allclose(b_stack[i, :, :r], b.double() * s, rtol=1e-7, atol=0) and not b_stack[i, :, r:].any()
    assert multi.stack_adapters([torch.randn(17, 6)], [torch.randn(4, 17)], [1.0], torch.float32, "cpu")[2] == 32
    assert multi.stack_adapters([torch.randn(32, 6)], [torch.randn(4, 32)], [1.0], torch.float32, "cpu")[2] == 32


def test_shape_and_dtype_errors_say_what_was_expected():
    x, w, bias, _, _, a_stack, b_stack, R, rows = make(torch.float32, [0, -1, 2], RANKS, 3)
    x2 = x.reshape(-1, N_IN)
    h = multi.lora_shrink_torch(x2, a_stack, rows, 3)
    with pytest.raises(ValueError, match=r"equal, non-zero numbers .* found 1, 2 and 1"):
        multi.stack_adapters([torch.randn(2, 6)], [torch.randn(4, 2)] * 2, [1.0], torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"adapter 0: expected A \(r, 6\) and B \(4, r\).*found A \(2, 6\) and B \(4, 3\)"):
        multi.stack_adapters([torch.randn(2, 6)], [torch.randn(4, 3)], [1.0], torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"row_adapter: expected a 1-D int32 tensor .* torch.int64"):
        multi.lora_shrink(x2, a_stack, rows.long(), 3)
    with pytest.raises(ValueError, match=r"x2: expected shape \(n_rows·seq, ·\) = \(3·4, ·\).* found \(9, 48\)"):
        multi.lora_shrink(x2, a_stack, rows, 4)
    with pytest.raises(ValueError, match=r"a_stack: expected shape \(N >= 1, ·, 48\), torch.float32"):
        multi.lora_shrink(x2, a_stack.double(), rows, 3)
    with pytest.raises(ValueError, match=r"h: expected torch.float32 .* found torch.float16"):
        multi.lora_expand(h.half(), b_stack, rows, 3, None, torch.float32)
    with pytest.raises(ValueError, match=r"b_stack: expected shape \(N >= 1, ·, 8\)"):
        multi.lora_expand(h[:, :8], b_stack, rows, 3, None, torch.float32)
    with pytest.raises(ValueError, match=r"bias: expected shape \(40,\)"):
        multi.lora_expand(h, b_stack, rows, 3, bias[:5], torch.float32)
    with pytest.raises(ValueError, match=r"y2: expected shape \(9, 40\)"):
        multi.lora_expand_add_(torch.zeros(9, 41), h, b_stack, rows, 3)
    with pytest.raises(ValueError, match=r"x: expected \(n_rows, seq, in\) or \(n_rows, in\); found shape \(1, 3, 3, 48\)"):
        multi.multi_lora_linear(x[None], w, bias, a_stack, b_stack, rows)
    with pytest.raises(ValueError, match=r"weight: expected shape \(out, 48\) in torch.float32; found \(40, 47\)"):
        multi.multi_lora_linear(x, w[:, 1:], bias, a_stack, b_stack, rows)
    with pytest.raises(ValueError, match=r"b_stack: expected shape \(N >= 1, 39, ·\).* found \(3, 40, 16\)"):
        multi.multi_lora_linear(x, w[:39], bias, a_stack, b_stack, rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_rows,seq", [(16, 64), (64, 1)])
@pytest.mark.parametrize("n_out", [512, 2048, 8192])
def test_bf16_llama_shapes_match_float32(n_out, n_rows, seq):
    n_in, n_adapters, r, scale = 2048, 16, 16, 2.0
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, device="cuda", generator=g) * std

    x = rand(n_rows, seq, n_in).bfloat16()
    w = rand(n_out, n_in, std=0.02).bfloat16()
    a_list = [rand(r, n_in, std=0.02) for _ in range(n_adapters)]
    b_list = [rand(n_out, r, std=0.1) for _ in range(n_adapters)]
    a_stack, b_stack, _ = multi.stack_adapters(a_list, b_list, [scale] * n_adapters, torch.bfloat16, "cuda")
    rows = [i % (n_adapters + 1) - 1 for i in range(n_rows)]  # -1, 0, .., 15, -1, ..
    row_adapter = torch.tensor(rows, dtype=torch.int32, device="cuda")
    y = multi.multi_lora_linear(x, w, None, a_stack, b_stack, row_adapter)
    # float32 oracle from the same bf16 x and W, with the float32 factors
    want = per_row_reference(x, w, None, a_list, b_list, [scale] * n_adapters, rows)
    assert y.dtype == torch.bfloat16 and max(row_errors(y, want)) <= 1e-2


def decode_case(dtype, seq, n_in, n_out, seed, ranks=(2, 7, 4)):
    """Three adapters of `ranks` stacked in `dtype`, five rows (one without an adapter) of `seq`
    tokens, a y to add into, and the three-call dense route's result in float32."""
    g = torch.Generator().manual_seed(seed)
    a_list = [torch.randn(r, n_in, generator=g) for r in ranks]
    b_list = [torch.randn(n_out, r, generator=g) for r in ranks]
    a_stack, b_stack, R = multi.stack_adapters(a_list, b_list, [0.5, 1.0, 2.0], dtype, "cpu")
    a_cat, b_cat = multi.dense_tables(a_stack, b_stack)
    row_adapter = torch.tensor([2, -1, 0, 1, 2], dtype=torch.int32)
    x2 = torch.randn(5 * seq, n_in, generator=g).to(dtype)
    y0 = torch.randn(5 * seq, n_out, generator=g).to(dtype)
    mask = multi.dense_row_mask(row_adapter, seq, 3, R, dtype)
    want = multi.dense_expand_add_(y0.clone().float(), x2.float(), a_cat.float(), b_cat.float(), mask.float())
    return a_stack, b_stack, a_cat, row_adapter, x2, y0, want


def check_decode(out, want, y0, seq, dtype):
    assert out.dtype == dtype
    assert float((out.float() - want).norm() / want.norm()) < (1e-5 if dtype == torch.float32 else 3e-3)
    assert torch.equal(out[seq:2 * seq], y0[seq:2 * seq])  # the row without an adapter is left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seq", [1, 3])
@pytest.mark.parametrize("outs,bn,ranks", [
    ((24,), 128, (2, 7, 4)),  # one member, one column block
    ((600, 40, 200), 128, (2, 7, 4)),  # three members, several column blocks, the last ragged
    ((40, 72), 32, (2, 20, 4)),  # two members at padded rank 32
    ((40, 24, 56, 16), 64, (3, 1, 5)),  # four members: two expand launches
])
def test_grouped_decode_add_equals_the_dense_route(dtype, seq, outs, bn, ranks, monkeypatch):
    """The grouped decode route (one shrink GEMM for several layers fed one x, then the expand:
    one Triton launch whose programs each take one adapter's tokens, or dense) against the
    three-call dense route of each member: the kernel interpreted on a CPU, the dense expand with
    its tables handed in and built, and the kernel asked for where it cannot run (dense again)."""
    monkeypatch.setattr(multi, "GROUP_CONFIG", dict(BN=bn, num_warps=4))
    cases = [decode_case(dtype, seq, 300, n_out, 12 + i, ranks) for i, n_out in enumerate(outs)]
    x2, row_adapter = cases[0][4], cases[0][3]
    tokens = multi.adapter_tokens(row_adapter.tolist(), seq, 3, "cpu")
    a_group = multi.group_table([c[2] for c in cases])
    wants = []
    for a_stack, b_stack, a_cat, _, _, y0, _ in cases:  # each member's dense route on the shared x2
        mask = multi.dense_row_mask(row_adapter, seq, 3, a_stack.shape[1], dtype)
        b_cat = multi.dense_tables(a_stack, b_stack)[1]
        wants.append(multi.dense_expand_add_(y0.clone().float(), x2.float(), a_cat.float(), b_cat.float(),
                                             mask.float()))
    b_cats = [multi.dense_tables(c[0], c[1])[1] for c in cases]
    mask = multi.dense_row_mask(row_adapter, seq, 3, cases[0][0].shape[1], dtype)
    for on_kernels, kernel, tables in ((True, True, None), (True, False, (mask, b_cats)), (True, False, None),
                                       (False, True, None)):
        fused.use_kernels_on_cpu(on_kernels)
        try:
            ys = [c[5].clone() for c in cases]
            got = multi.grouped_decode_add_(ys, x2, a_group, [c[1] for c in cases], tokens, *(tables or ()),
                                            kernel=kernel)
        finally:
            fused.use_kernels_on_cpu(False)
        for out, y, want, c in zip(got, ys, wants, cases):
            assert out.data_ptr() == y.data_ptr()
            check_decode(out, want, c[5], seq, dtype)


def test_adapter_tokens_groups_tokens_by_adapter():
    t = multi.adapter_tokens([2, -1, 0, 2], 2, 3, "cpu")
    assert t.order.tolist() == [4, 5, 0, 1, 6, 7] and t.starts.tolist() == [0, 2, 2, 6] and t.max_tokens == 4
    with pytest.raises(ValueError, match=r"adapter indices in \[-1, 3\)"):
        multi.adapter_tokens([3], 1, 3, "cpu")


def test_grouped_decode_add_rejects_mismatched_tables():
    a_stack, b_stack, _ = multi.stack_adapters([torch.randn(4, 8)], [torch.randn(6, 4)], [1.0], torch.float32, "cpu")
    a_cat = multi.dense_tables(a_stack, b_stack)[0]
    x2, y2, rows = torch.randn(2, 8), torch.randn(2, 6), [0, -1]
    tokens = multi.adapter_tokens(rows, 1, 1, "cpu")
    with pytest.raises(ValueError, match="a_group: expected shape"):
        multi.grouped_decode_add_([y2], torch.randn(2, 9), a_cat, [b_stack], tokens)
    with pytest.raises(ValueError, match="a_group: expected shape"):  # two members need two members' rows
        multi.grouped_decode_add_([y2, y2], x2, a_cat, [b_stack, b_stack], tokens)
    with pytest.raises(ValueError, match="member 0: expected a contiguous b_stack"):
        multi.grouped_decode_add_([torch.randn(2, 7)], x2, a_cat, [b_stack], tokens)
    with pytest.raises(ValueError, match="b_stack 1: expected shape"):
        multi.grouped_decode_add_([y2, y2], x2, multi.group_table([a_cat, a_cat]), [b_stack, b_stack.double()],
                                  tokens)
    with pytest.raises(ValueError, match="equal, non-zero numbers"):
        multi.grouped_decode_add_([y2], x2, a_cat, [b_stack, b_stack], tokens)
