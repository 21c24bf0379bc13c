"""The fused training path against the reference, in float64 and float32 on the CPU."""

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_models import LLAMA_TARGETS, input_ids, tiny_bert_seq_cls, tiny_gpt2, tiny_llama_causal
from torch import nn

import lorakit
from lorakit import ops
from lorakit.ops import fused
from lorakit.ops import triton_kernels as tk

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def inputs(dtype, shape=(3, 5, 16), out=12, r=4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(out, shape[-1], generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    a = torch.randn(r, shape[-1], generator=g, dtype=dtype, requires_grad=True)
    bb = torch.randn(out, r, generator=g, dtype=dtype, requires_grad=True)
    return x, w, b, a, bb


def dropout_mask(shape, p, seed, device, dtype):
    """keep / (1 - p) for a (T, in) input from `seed`: the Triton kernels' mask made with torch ops,
    so a seed gives one mask on every device and in every code path (the oracle's dropout)."""
    keep = tk.keep_mask_torch(tuple(shape), p, tk.seed_tensor(seed, device))
    return keep.to(dtype) / (1.0 - p)


def reference_with_mask(x, w, b, a, bb, s, mask):
    return F.linear(x, w, b) + F.linear(F.linear(x * mask, a), bb) * s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,r", [((3, 5, 16), 4), ((7, 16), 1), ((2, 3, 4, 16), 16)])
def test_fused_matches_reference(dtype, p, bias, shape, r):
    x, w, b, a, bb = inputs(dtype, shape, r=r, bias=bias)
    seed = 1234
    y = fused.lora_linear(x, w, b, a, bb, 0.7, p, training=True, seed=seed)
    if p:
        mask = dropout_mask(torch.Size([x.numel() // shape[-1], shape[-1]]), p, seed, x.device, dtype)
        yr = reference_with_mask(x, w, b, a, bb, 0.7, mask.reshape(x.shape))
    else:
        yr = ops.lora_linear(x, w, b, a, bb, 0.7)
    dy = torch.randn_like(yr)
    got = torch.autograd.grad(y, (x, a, bb), dy)
    want = torch.autograd.grad(yr, (x, a, bb), dy)
    assert rel(y, yr) < TOL[dtype]
    for g1, g2 in zip(got, want):
        assert rel(g1, g2) < TOL[dtype]


@pytest.mark.parametrize("save", [True, False], ids=["w_eff-kept", "w_eff-rebuilt"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kept_w_eff_gives_the_same_gradients_and_is_built_once(save, dtype, monkeypatch):
    monkeypatch.setattr(fused, "SAVE_W_EFF", save)
    builds = []
    real = fused.tk._w_eff  # what build_w_eff and build_w_eff_casts both run
    monkeypatch.setattr(fused.tk, "_w_eff", lambda *a, **k: builds.append(1) or real(*a, **k))
    x, w, b, a, bb = inputs(dtype)
    g = torch.randn(3, 5, 20, dtype=dtype, requires_grad=True)
    u = torch.randn(3, 5, 20, dtype=dtype, requires_grad=True)
    wd = torch.randn(16, 20, dtype=dtype)
    ad = torch.randn(4, 20, dtype=dtype, requires_grad=True)
    bd = torch.randn(16, 4, dtype=dtype, requires_grad=True)
    y = fused.lora_linear(x, w, b, a, bb, 0.7) + fused.gated_down(g, u, "silu", wd, None, ad, bd, 0.7)[..., :12]
    yr = ops.lora_linear(x, w, b, a, bb, 0.7) + ops.lora_linear(F.silu(g) * u, wd, None, ad, bd, 0.7)[..., :12]
    dy = torch.randn_like(yr)
    got = torch.autograd.grad(y, (x, a, bb, g, u, ad, bd), dy)
    want = torch.autograd.grad(yr, (x, a, bb, g, u, ad, bd), dy)
    assert rel(y, yr) < TOL[dtype]
    for g1, g2 in zip(got, want):
        assert rel(g1, g2) < TOL[dtype]
    assert len(builds) == (2 if save else 4)  # one per node in forward, plus one per node in backward unless kept


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_half_compute_with_float32_adapters_gives_float32_gradients(p):
    x, w, b, a, bb = inputs(torch.float64, shape=(4, 9, 32), out=24, r=8)
    xh, wh, bh = x.detach().bfloat16().requires_grad_(), w.bfloat16(), b.bfloat16()
    a32, b32 = a.detach().float().requires_grad_(), bb.detach().float().requires_grad_()
    y = fused.lora_linear(xh, wh, bh, a32, b32, 0.5, p, training=True, seed=5)
    mask = 1.0
    if p:
        mask = dropout_mask(torch.Size([36, 32]), p, 5, x.device, torch.float64).reshape(x.shape)
    xr = xh.detach().double().requires_grad_()
    yr = reference_with_mask(xr, wh.double(), bh.double(), a, bb, 0.5, mask)
    dy = torch.randn_like(yr)
    got = torch.autograd.grad(y, (xh, a32, b32), dy.bfloat16())
    want = torch.autograd.grad(yr, (xr, a, bb), dy)
    assert y.dtype == torch.bfloat16 and got[1].dtype == got[2].dtype == torch.float32
    assert rel(y.double(), yr) < 1e-2
    for g1, g2 in zip(got, want):
        assert rel(g1.double(), g2) < 2e-2


def test_dropout_mask_is_reproducible_from_the_seed_and_drops_the_right_fraction():
    m1 = dropout_mask(torch.Size([256, 64]), 0.3, 7, torch.device("cpu"), torch.float32)
    m2 = dropout_mask(torch.Size([256, 64]), 0.3, 7, torch.device("cpu"), torch.float32)
    m3 = dropout_mask(torch.Size([256, 64]), 0.3, 8, torch.device("cpu"), torch.float32)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert abs(float((m1 == 0).float().mean()) - 0.3) < 0.02
    assert torch.allclose(m1[m1 > 0], torch.tensor(1 / 0.7))


def test_backward_uses_the_forward_mask():
    # If backward drew a different mask, dA would not match the reference built from the forward's mask.
    x, w, b, a, bb = inputs(torch.float64)
    y = fused.lora_linear(x, w, b, a, bb, 1.0, 0.5, training=True, seed=99)
    mask = dropout_mask(torch.Size([15, 16]), 0.5, 99, x.device, torch.float64).reshape(x.shape)
    yr = reference_with_mask(x, w, b, a, bb, 1.0, mask)
    assert torch.allclose(y, yr)
    ga, = torch.autograd.grad(y.sum(), a)
    gar, = torch.autograd.grad(yr.sum(), a)
    assert torch.allclose(ga, gar)


def test_trainable_base_weight_and_bias_get_correct_gradients():
    x, w, b, a, bb = inputs(torch.float64)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = fused.lora_linear(x, w, b, a, bb, 0.5)
    yr = ops.lora_linear(x, w, b, a, bb, 0.5)
    dy = torch.randn_like(y)
    for g1, g2 in zip(torch.autograd.grad(y, (w, b), dy), torch.autograd.grad(yr, (w, b), dy)):
        assert rel(g1, g2) < 1e-12


def test_non_contiguous_input():
    x, w, b, a, bb = inputs(torch.float64, shape=(5, 3, 16))
    xt = x.transpose(0, 1)  # (3, 5, 16), not contiguous
    y = fused.lora_linear(xt, w, b, a, bb, 0.5)
    yr = ops.lora_linear(xt, w, b, a, bb, 0.5)
    dy = torch.randn_like(y)
    for g1, g2 in zip(torch.autograd.grad(y, (x, a, bb), dy), torch.autograd.grad(yr, (x, a, bb), dy)):
        assert rel(g1, g2) < 1e-12


def train_step_grads(model, ids, fast: bool):
    ops.set_fast_path(fast)
    try:
        model.zero_grad(set_to_none=True)
        out = model(ids).logits
        out.float().square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        ops.set_fast_path(True)


@pytest.mark.parametrize("make,targets", [(tiny_llama_causal, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_whole_model_fast_equals_reference(make, targets):
    model = lorakit.inject(make(), lorakit.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.eval()  # the model's own dropout off; gradients are still enabled, so the fused path runs
    ids = input_ids()
    out_f, g_f = train_step_grads(model, ids, True)
    out_r, g_r = train_step_grads(model, ids, False)
    assert rel(out_f, out_r) < 1e-5
    assert g_f.keys() == g_r.keys() and len(g_f) == 2 * (14 if make is tiny_llama_causal else 8)
    for k in g_f:
        assert rel(g_f[k], g_r[k]) < 1e-4, k


def test_fallback_for_hooked_base_layers_is_logged_once(caplog):
    model = lorakit.inject(nn.Sequential(nn.Linear(8, 8)), lorakit.LoraConfig(r=2, target_modules=["0"]))
    model[0].base_layer.register_forward_hook(lambda m, i, o: o * 2)
    x = torch.randn(3, 8, requires_grad=True)
    ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="lorakit"):
        y1 = model(x)
        model(x)
    assert torch.allclose(y1, 2 * F.linear(x, model[0].base_layer.weight, model[0].base_layer.bias))  # the hook ran
    assert sum("forward hooks" in r.message for r in caplog.records) == 1


def test_fast_path_can_be_turned_off():
    assert ops.fast_path_blocker(nn.Linear(2, 2), torch.zeros(1, 2)) is None
    ops.set_fast_path(False)
    try:
        assert "turned off" in ops.fast_path_blocker(nn.Linear(2, 2), torch.zeros(1, 2))
    finally:
        ops.set_fast_path(True)


def test_gated_down_matches_reference_with_and_without_dropout():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    gate, up = torch.randn(2, 5, 24, generator=g, dtype=torch.float64), torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    gate.requires_grad_(True)
    up.requires_grad_(True)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    a = torch.randn(4, 24, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, 4, generator=g, dtype=torch.float64, requires_grad=True)
    act = nn.SiLU()
    for p in (0.0, 0.3):
        y = fused.gated_down(gate, up, "silu", w, None, a, b, 0.5, p, training=True, seed=5)
        z = act(gate) * up
        mask = dropout_mask(torch.Size([10, 24]), p, 5, x.device, torch.float64).reshape(z.shape) if p else 1.0
        yr = F.linear(z, w) + ((z * mask) @ a.T @ b.T) * 0.5
        dy = torch.randn_like(yr)
        got = torch.autograd.grad(y, (gate, up, a, b), dy)
        want = torch.autograd.grad(yr, (gate, up, a, b), dy)
        assert rel(y, yr) < 1e-12
        for g1, g2 in zip(got, want):
            assert rel(g1, g2) < 1e-12


def gated_mlp_case(dtype, bias, seed=11):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, grad=False: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    x = rnd(2, 5, 16, grad=True)
    parts = []
    for n_out, n_in, r in ((24, 16, 4), (24, 16, 3), (16, 24, 4)):  # gate, up, down; ranks may differ
        parts.append((rnd(n_out, n_in), rnd(n_out) if bias else None, rnd(r, n_in, grad=True), rnd(n_out, r, grad=True)))
    return x, parts


def gated_mlp_reference(x, parts, scales, p, seeds):
    def layer(inp, part, s, seed):
        w, b, a, bb = part
        mask = dropout_mask(torch.Size([inp.numel() // inp.shape[-1], inp.shape[-1]]), p, seed, inp.device,
                            inp.dtype).reshape(inp.shape) if p else 1.0
        return reference_with_mask(inp, w, b, a, bb, s, mask)

    z = F.silu(layer(x, parts[0], scales[0], seeds[0])) * layer(x, parts[1], scales[1], seeds[1])
    return layer(z, parts[2], scales[2], seeds[2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_whole_gated_mlp_node_matches_reference(dtype, p, bias):
    x, parts = gated_mlp_case(dtype, bias)
    scales, seeds = (0.5, 2.0, 0.7), (3, 4, 5)
    y = fused.gated_mlp(x, "silu", parts, scales, (p, p, p), training=True, seeds=seeds)
    assert type(y.grad_fn).__name__ == "GatedMLPFunctionBackward"
    yr = gated_mlp_reference(x, parts, scales, p, seeds)
    leaves = [x] + [t for part in parts for t in part if t is not None and t.requires_grad]
    dy = torch.randn_like(yr)
    assert rel(y, yr) < TOL[dtype]
    for got, want in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(yr, leaves, dy)):
        assert rel(got, want) < TOL[dtype]
    # not in training: no dropout, whatever the rates
    y_eval = fused.gated_mlp(x, "silu", parts, scales, (p, p, p), training=False)
    assert rel(y_eval, gated_mlp_reference(x, parts, scales, 0.0, seeds)) < TOL[dtype]


def test_llama_mlp_runs_as_one_node_unless_turned_off_or_only_down_is_adapted():
    from lorakit import fusion

    def run(model):
        torch.manual_seed(0)
        ids = input_ids()
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        params = [p for p in model.parameters() if p.requires_grad]
        return loss, torch.autograd.grad(loss, params)

    config = lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=0.1, init_lora_weights=False)
    model = lorakit.inject(tiny_llama_causal().double(), config)
    x = torch.randn(2, 3, 32, dtype=torch.float64, requires_grad=True)
    assert type(model.model.layers[0].mlp(x).grad_fn).__name__ == "GatedMLPFunctionBackward"
    loss, grads = run(model)
    fusion.set_whole_mlp_node(False)
    try:
        assert type(model.model.layers[0].mlp(x).grad_fn).__name__ == "GatedDownFunctionBackward"
        loss3, grads3 = run(model)  # three nodes, the same seeds drawn in the same order
    finally:
        fusion.set_whole_mlp_node(True)
    assert rel(loss, loss3) < 1e-12 and all(rel(a, b) < 1e-10 for a, b in zip(grads, grads3))
    down_only = lorakit.inject(tiny_llama_causal().double(), lorakit.LoraConfig(r=4, target_modules=["down_proj"]))
    assert type(down_only.model.layers[0].mlp(x).grad_fn).__name__ == "GatedDownFunctionBackward"


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["llama", "llama-q-v", "bert"])
def test_qkv_run_as_one_node_matching_one_by_one(p, kind):
    """q_proj, k_proj and v_proj of an attention (BERT: query, key, value; or only the two of them
    that carry an adapter) as one node: the same loss and gradients (float64) as the layers run
    alone, the same seeds drawn in the same order."""
    from lorakit import fusion

    if kind == "bert":
        model, targets = tiny_bert_seq_cls().double(), ["query", "key", "value", "dense"]
        batch = {"input_ids": input_ids(vocab=100), "labels": torch.tensor([0, 2])}
    else:
        model = tiny_llama_causal().double()
        targets = LLAMA_TARGETS if kind == "llama" else ["q_proj", "v_proj", "o_proj"]
        batch = {"input_ids": input_ids(), "labels": input_ids()}

    def run(model):
        torch.manual_seed(0)
        loss = model(**batch).loss
        return loss, torch.autograd.grad(loss, [q for q in model.parameters() if q.requires_grad])

    config = lorakit.LoraConfig(r=4, target_modules=targets, lora_dropout=p, init_lora_weights=False)
    model = lorakit.inject(model, config).train()
    calls = []
    real = ops.fused_shared_input
    ops.fused_shared_input = lambda *args: calls.append(len(args[1])) or real(*args)
    try:
        loss, grads = run(model)
    finally:
        ops.fused_shared_input = real
    assert calls == [2 if kind == "llama-q-v" else 3] * 2  # one node an attention, two attentions
    assert all(m.__dict__["_shared_input"][0].pending is None for m in model.modules() if "_shared_input" in m.__dict__)
    fusion.set_shared_input_node(False)
    try:
        loss1, grads1 = run(model)
    finally:
        fusion.set_shared_input_node(True)
    assert rel(loss, loss1) < 1e-12 and all(rel(a, b) < 1e-10 for a, b in zip(grads, grads1))


class _Attention(nn.Module):
    """q/k/v called in a given order on given inputs (self- or cross-attention)."""

    def __init__(self, order="qkv", cross=False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.order, self.cross = order, cross

    def forward(self, x, memory=None):
        src = {"q": x, "k": memory if self.cross else x, "v": memory if self.cross else x}
        outs = {c: getattr(self, f"{c}_proj")(src[c]) for c in self.order}
        return outs["q"].sum() + outs["k"].sum() * 2 + outs["v"].square().sum()


@pytest.mark.parametrize("order,cross", [("qkv", True), ("kqv", False), ("qvk", False)])
def test_qkv_called_otherwise_run_one_by_one_and_stay_right(order, cross, caplog, monkeypatch):
    """Cross-attention, or q/k/v in another order: the results stay those of the layers run alone,
    the group turns itself off at its first miss and says so once in the log."""
    monkeypatch.setattr(ops, "_logged", set())  # the log line is said once a process
    torch.manual_seed(0)
    model = lorakit.inject(_Attention(order, cross), lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"],
                                                                         init_lora_weights=False)).train()
    group = model.q_proj._shared_input[0]
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    params = [q for q in model.parameters() if q.requires_grad]
    with caplog.at_level(logging.INFO, logger="lorakit"):
        got = [torch.autograd.grad(model(x, memory), params) for _ in range(3)]
    ops.set_fast_path(False)
    try:
        want = torch.autograd.grad(model(x, memory), params)
    finally:
        ops.set_fast_path(True)
    for grads in got:
        assert all(rel(a, b) < 1e-5 for a, b in zip(grads, want))
    assert group.off and group.pending is None
    assert sum("not called in turn" in r.message for r in caplog.records) == 1


def test_qkv_node_not_reused_after_the_input_changes_in_place():
    """k_proj called on q_proj's input after an in-place change to it computes afresh."""
    torch.manual_seed(0)
    model = lorakit.inject(_Attention(), lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj"],
                                                            init_lora_weights=False)).train()
    x = torch.randn(2, 3, 8)
    model.q_proj(x)
    x.mul_(2)
    with torch.no_grad():
        want = model.k_proj.base_layer(x) + model.k_proj.delta_weight("default").matmul(x.unsqueeze(-1)).squeeze(-1)
    assert rel(model.k_proj(x), want) < 1e-5


@pytest.mark.parametrize("part", ["gate_proj", "up_proj", "down_proj"])
def test_a_hook_on_a_projection_of_a_fused_mlp_runs(part):
    model = lorakit.inject(tiny_llama_causal(), lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    mlp = model.model.layers[0].mlp
    seen = []
    getattr(mlp, part).register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 3, 32, requires_grad=True)
    y = mlp(x)
    ops.set_fast_path(False)
    try:
        want = mlp(x)
    finally:
        ops.set_fast_path(True)
    assert len(seen) == 2 and rel(y, want) < 1e-5


def saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


@pytest.mark.parametrize("whole", [True, False], ids=["one-node", "three-nodes"])
def test_gated_mlp_stores_no_tensor_of_downs_input_beyond_g_and_u(whole):
    from lorakit import fusion

    model = lorakit.inject(tiny_llama_causal(), lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 9, 32, requires_grad=True)
    fusion.set_whole_mlp_node(whole)
    try:
        fused_shapes = saved_shapes(lambda: mlp(x))
    finally:
        fusion.set_whole_mlp_node(True)
    ops.set_fast_path(False)
    try:
        plain_shapes = saved_shapes(lambda: mlp(x))
    finally:
        ops.set_fast_path(True)

    def wide(shapes):  # activations as wide as the tiny model's MLP, (2, 9, 64) or flattened (18, 64)
        return sum(1 for s in shapes if s[-1] == 64 and torch.Size(s).numel() == 2 * 9 * 64)

    assert wide(fused_shapes) == 2  # g and u
    assert wide(plain_shapes) > 2  # plus act(g) and/or down's input
    hidden = sum(1 for s in fused_shapes if s[-1] == 32 and torch.Size(s).numel() == 2 * 9 * 32)
    # x for gate's and up's adapter gradients: saved once by the one node, by each of two
    # nodes otherwise (the same tensor, so one copy in memory either way)
    assert hidden == (1 if whole else 2)


def test_unload_restores_the_mlp_forward():
    model = lorakit.inject(tiny_llama_causal(), lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    assert "forward" in vars(model.model.layers[0].mlp)
    plain = lorakit.unload(model)
    assert "forward" not in vars(plain.model.layers[0].mlp)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_layers_trace_without_graph_breaks(p):
    import torch._dynamo as dynamo

    model = lorakit.inject(tiny_llama_causal(), lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=p))
    model.train()
    explanation = dynamo.explain(model)(input_ids=input_ids())
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("make,targets,biased", [
    (tiny_qwen2, LLAMA_TARGETS, True),  # Qwen2's q/k/v carry biases
    (tiny_mistral, LLAMA_TARGETS, False),
    (tiny_bert_seq_cls, ["query", "key", "value", "dense"], True),
], ids=["qwen2", "mistral", "bert"])
def test_other_architectures_take_the_fast_path_and_match(make, targets, biased, caplog):
    model = lorakit.inject(make(), lorakit.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    if biased:
        assert any(layer.base_layer.bias is not None for _, layer in lorakit.lora_layers(model))
    ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="lorakit"):
        out_f, g_f = train_step_grads(model, input_ids(), True)
    assert not [r for r in caplog.records if "reference LoRA path" in r.message]  # no fallback
    out_r, g_r = train_step_grads(model, input_ids(), False)
    assert rel(out_f, out_r) < 1e-5
    for k in g_f:
        assert rel(g_f[k], g_r[k]) < 1e-4, k


# -- the custom-op route taken under torch.compile ------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_custom_ops_pass_opcheck(p, bias):
    x, w, b, a, bb = inputs(torch.float32, bias=bias)
    seed = fused._seed(p, 99, x.device)
    torch.library.opcheck(fused._lora_linear_op, (x, w, b, a, bb, 0.7, p, seed))
    g = torch.randn(3, 5, 16, requires_grad=True)
    u = torch.randn(3, 5, 16, requires_grad=True)
    torch.library.opcheck(fused._gated_down_op, (g, u, "silu", w, b, a, bb, 0.7, p, seed))


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("custom_ops", [True, False], ids=["custom-ops", "traced"])
def test_compiled_model_matches_eager(p, custom_ops, monkeypatch):
    """aot_eager runs the compiler's autograd partitioning without a C++ toolchain."""
    monkeypatch.setattr(fused, "COMPILE_AS_CUSTOM_OPS", custom_ops)
    model = lorakit.inject(tiny_llama_causal(), lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=p,
                                                                   init_lora_weights=False)).train()
    ids = input_ids()
    params = [q for q in model.parameters() if q.requires_grad]
    torch.manual_seed(5)
    loss = model(input_ids=ids, labels=ids).loss
    want = torch.autograd.grad(loss, params)
    calls = []
    real = fused._lora_linear_op

    def spy(*args):
        calls.append(1)
        return real(*args)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    fused._lora_linear_op = spy
    try:
        torch.manual_seed(5)
        loss_c = compiled(input_ids=ids, labels=ids).loss
    finally:
        fused._lora_linear_op = real
    got = torch.autograd.grad(loss_c, params)
    assert bool(calls) == custom_ops, "the compiled model did not take the route asked for"
    assert rel(loss_c.detach(), loss.detach()) < 1e-6
    for g1, g2 in zip(got, want):
        assert rel(g1, g2) < 1e-5


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_compiled_one_node_mlp_matches_eager(p, monkeypatch):
    """With WHOLE_MLP_NODE_COMPILED the compiler traces each gated MLP as one node: the same loss and
    A/B gradients as the eager model (which runs that node too)."""
    from lorakit import fusion

    model = lorakit.inject(tiny_llama_causal(), lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=p,
                                                                   init_lora_weights=False)).train()
    ids = input_ids()
    params = [q for q in model.parameters() if q.requires_grad]
    torch.manual_seed(5)
    loss = model(input_ids=ids, labels=ids).loss
    want = torch.autograd.grad(loss, params)
    calls = []
    real = ops.fused_gated_mlp

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "fused_gated_mlp", spy)
    monkeypatch.setattr(fusion, "WHOLE_MLP_NODE_COMPILED", True)
    torch._dynamo.reset()
    torch.manual_seed(5)
    loss_c = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=ids).loss
    got = torch.autograd.grad(loss_c, params)
    assert len(calls) == 2, "each of the two MLPs should have been traced as one node"
    assert rel(loss_c.detach(), loss.detach()) < 1e-6
    for g1, g2 in zip(got, want):
        assert rel(g1, g2) < 1e-5


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor's CPU code needs a C++ compiler")
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_inductor_cpu_nodes_match_eager(p):
    """Both nodes compiled by inductor for the CPU, handed one seed: the same output and gradients as
    eager. (Caught a miscompiled `add_(..., alpha=)` after a matmul in LoRA's share of dx.)"""
    gen = torch.Generator().manual_seed(3)

    def rand(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(grad)

    x, g, u = rand(2, 24, 32), rand(2, 24, 48), rand(2, 24, 48)
    w1, w2 = rand(40, 32, scale=0.2, grad=False), rand(32, 48, scale=0.2, grad=False)
    a1, b1, a2, b2 = rand(4, 32, scale=0.5), rand(40, 4, scale=0.5), rand(4, 48, scale=0.5), rand(32, 4, scale=0.5)
    seed = torch.tensor([1234])

    def f(x, g, u, a1, b1, a2, b2, seed):
        y1 = fused.lora_linear(x, w1, None, a1, b1, 2.0, p, training=True, seed=seed)
        y2 = fused.gated_down(g, u, "silu", w2, None, a2, b2, 2.0, p, training=True, seed=seed + 1)
        return y1.square().mean() + y2.square().mean()

    leaves = (x, g, u, a1, b1, a2, b2)
    want = torch.autograd.grad(f(*leaves, seed), leaves)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*leaves, seed), leaves)
    for name, g1, g2 in zip(("x", "g", "u", "A1", "B1", "A2", "B2"), got, want):
        assert rel(g1, g2) < 1e-5, name


def test_cpu_dropout_mask_is_made_once_and_kept_as_booleans(monkeypatch):
    """Where the kernels do not run, forward hashes the dropout mask once and keeps it (a byte an
    element) for backward, instead of hashing again; nothing float and input-sized beyond x is kept."""
    calls = []
    real = tk.keep_mask_torch
    monkeypatch.setattr(tk, "keep_mask_torch", lambda *args: calls.append(1) or real(*args))
    x, w, b, a, bb = inputs(torch.float32)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fused.lora_linear(x, w, b, a, bb, 0.7, 0.3, training=True, seed=21)
    torch.autograd.grad(y, (x, a, bb), torch.randn_like(y))
    assert len(calls) == 1
    tokens = x.numel() // x.shape[-1]
    assert ((tokens, x.shape[-1]), torch.bool) in saved
    assert [s for s in saved if s[0][-1] == x.shape[-1] and s[1] != torch.bool and s[0] != tuple(x.shape)] == [
        (tuple(w.shape), w.dtype), (tuple(a.shape), a.dtype)]  # the weight and A, no dropped copy of x


# -- what the compiled step keeps for backward ------------------------------------------------


def test_norms_beside_lora_layers_get_the_recomputed_forward_and_lose_it_on_unload():
    from lorakit import fusion

    llama = lorakit.inject(tiny_llama_causal(), lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    marked = [n for n, m in llama.named_modules() if m.__dict__.get(fusion._NORM_MARK)]
    assert marked == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                      "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]
    gpt2 = lorakit.inject(tiny_gpt2(), lorakit.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    assert [n for n, m in gpt2.named_modules() if m.__dict__.get(fusion._NORM_MARK)] == [
        "transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
        "transformer.ln_f"]
    bert = lorakit.inject(tiny_bert_seq_cls(), lorakit.LoraConfig(r=4, target_modules=["query", "value"]))
    assert not any(m.__dict__.get(fusion._NORM_MARK) for m in bert.modules())  # post-norm: beside no LoRA layer
    ids = input_ids()
    with torch.no_grad():
        before = llama(ids).logits
    plain = lorakit.unload(llama)
    assert not any("forward" in m.__dict__ or m.__dict__.get(fusion._NORM_MARK) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, before)


def _saved_for_backward(model, ids, monkeypatch) -> list[tuple[tuple, int]]:
    """(shape, bytes) of each activation a compiled step keeps for backward, as the partitioner that
    inductor runs (min-cut) chose it; parameters and inputs passed through are left out."""
    import torch._functorch.config as fconfig
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    monkeypatch.setattr(fconfig, "enable_autograd_cache", False)
    saved = []

    def partition(joint, inputs, **kwargs):
        fw, bw = min_cut_rematerialization_partition(joint, inputs, **kwargs)
        fw_nodes = {n.name: n for n in fw.graph.nodes}
        for node in bw.graph.nodes:
            val, source = node.meta.get("val"), fw_nodes.get(node.name)
            if (node.op == "placeholder" and not node.name.startswith("tangents") and isinstance(val, torch.Tensor)
                    and source is not None and source.op != "placeholder"):
                saved.append((tuple(val.shape), val.numel() * val.element_size()))
        return fw, bw

    def boxed(gm, _inputs):
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition))
    compiled(input_ids=ids, labels=ids).loss.backward()
    return saved


def test_compiled_step_keeps_what_the_frozen_model_keeps_plus_h(monkeypatch):
    """Compiled with inductor's partitioner, a LoRA step at p = 0 keeps no weight-sized W + s·B·A,
    no act(g)·u and no normalised input: the frozen model's saved activations, each layer's h
    (tokens × r), and on the CPU one hidden-sized tensor a block (o_proj's input: the CPU's
    attention output is laid out (batch, heads, seq, dim) and the copy into (tokens, hidden) is
    kept; on the GPU it is a view) and one for the whole model (the first block's input, kept in
    place of norm statistics). With the norms' outputs kept (fusion.RECOMPUTE_NORMS off) it keeps
    two hidden-sized tensors a block more, less that first block's input."""
    from lorakit import fusion

    cfg = dict(hidden_size=64, intermediate_size=256)
    ids = input_ids(batch=2, seq=24)  # 48 tokens: no activation of a weight's shape
    tokens, r, blocks = ids.numel(), 4, 2

    def make():
        from tiny_models import llama_config
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(llama_config(**cfg)).train()

    floor = make()
    floor.requires_grad_(False)
    floor.enable_input_require_grads()
    kept_floor = sum(b for _, b in _saved_for_backward(floor, ids, monkeypatch))
    lora = lorakit.inject(make(), lorakit.LoraConfig(r=r, target_modules=LLAMA_TARGETS, init_lora_weights=False)).train()
    kept = _saved_for_backward(lora, ids, monkeypatch)
    weight_shapes = {tuple(m.base_layer.weight.shape) for _, m in lorakit.lora_layers(lora)}
    assert not [s for s, _ in kept if s in weight_shapes], "a weight-sized tensor was kept for backward"
    h_bytes, hidden_bytes = 7 * blocks * tokens * r * 4, tokens * cfg["hidden_size"] * 4
    assert sum(b for _, b in kept) <= kept_floor + h_bytes + (blocks + 1) * hidden_bytes
    monkeypatch.setattr(fusion, "RECOMPUTE_NORMS", False)
    kept_norms = sum(b for _, b in _saved_for_backward(lora, ids, monkeypatch))
    assert kept_norms >= sum(b for _, b in kept) + (2 * blocks - 1) * hidden_bytes
