"""GPU numerics of the fused training path (run on a CUDA machine; skipped elsewhere).

Tolerances: relative Frobenius error against the reference path ≤ 1e-2 in bfloat16
for outputs and A/B gradients; the loss after 50 training steps within 2% between
the fused and the reference path on the same data.
"""

import math

import pytest
import torch

import lorakit
from lorakit import ops
from lorakit.ops import fused
from lorakit.ops import triton_kernels as tk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("p", [0.1, 0.5, 1 / 3])
def test_kernel_masks_equal_the_torch_mask_on_cuda(p):
    # Each kernel hashes its own tile shape and reshapes each pair's two draws into columns: the
    # code compiled for the GPU must give keep_mask_torch's bits, as the interpreter does (here the
    # mask kernel's 32 × 64 tiles and the masked shrink's 32 × 128).
    seed = tk.seed_tensor(2**31 - 5, "cuda")
    for shape in [(8192, 2048), (777, 129), (64, 8192)]:
        keep = tk.keep_mask_torch(shape, p, seed)
        assert torch.equal(tk.dropout_keep_mask(shape, p, seed, "cuda"), keep)
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(16, shape[1], device="cuda", dtype=torch.bfloat16)
        want = (torch.where(keep, x.float(), 0.0) @ a.float().T) / (1 - p)
        assert rel(tk.masked_shrink(x, a, p, seed), want) < 1e-2


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(4096, 2048, 2048), (4096, 2048, 512), (2048, 8192, 2048)])
def test_bf16_fused_matches_reference(p, shape):
    T, n_in, n_out = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, n_in, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(n_out, n_in, device="cuda", generator=g) * 0.02).bfloat16()
    a = (torch.randn(16, n_in, device="cuda", generator=g) * 0.02).requires_grad_(True)
    b = (torch.randn(n_out, 16, device="cuda", generator=g) * 0.02).requires_grad_(True)
    y = fused.lora_linear(x, w, None, a, b, 2.0, p, training=True, seed=11)
    if p:
        keep = tk.dropout_keep_mask((T, n_in), p, 11, "cuda")
        xd = torch.where(keep, x.float() / (1 - p), 0.0)
    else:
        xd = x.float()
    # float32 oracle from the same bf16 inputs
    yr = x.float() @ w.float().T + (xd @ a.T @ b.T) * 2.0
    dy = torch.randn_like(yr)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy.bfloat16())
    gxr, gar, gbr = torch.autograd.grad(yr, (x, a, b), dy)
    for got, want in [(y, yr), (gx, gxr), (ga, gar), (gb, gbr)]:
        assert rel(got, want) < 1e-2


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_whole_gated_mlp_node_matches_reference(p):
    T, hidden, width = 4096, 1024, 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape, s=0.02: torch.randn(*shape, device="cuda", generator=g) * s  # noqa: E731
    x = rnd(T, hidden, s=1.0).bfloat16().requires_grad_(True)
    parts = [(rnd(n_out, n_in).bfloat16(), None, rnd(16, n_in).requires_grad_(True), rnd(n_out, 16).requires_grad_(True))
             for n_out, n_in in ((width, hidden), (width, hidden), (hidden, width))]
    seeds = (21, 22, 23)
    y = fused.gated_mlp(x, "silu", parts, (2.0, 2.0, 2.0), (p, p, p), training=True, seeds=seeds)

    def layer(inp, part, seed):  # float32 oracle from the same bf16 inputs
        w, _, a, b = part
        xd = torch.where(tk.dropout_keep_mask(tuple(inp.shape), p, seed, "cuda"), inp / (1 - p), 0.0) if p else inp
        return inp @ w.float().T + (xd @ a.T @ b.T) * 2.0

    xf = x.float()
    yr = layer(torch.nn.functional.silu(layer(xf, parts[0], 21)) * layer(xf, parts[1], 22), parts[2], 23)
    leaves = [x] + [t for part in parts for t in part[2:]]
    dy = torch.randn_like(yr)
    assert rel(y, yr) < 1e-2
    for got, want in zip(torch.autograd.grad(y, leaves, dy.bfloat16()), torch.autograd.grad(yr, leaves, dy)):
        assert rel(got, want) < 1e-2


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_shared_input_node_matches_reference(p):
    """q, k and v (biased, as Qwen2's) as one node: outputs and x, A, B gradients against a float32
    oracle from the same bf16 inputs."""
    T, hidden = 4096, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape, s=0.02: torch.randn(*shape, device="cuda", generator=g) * s  # noqa: E731
    x = rnd(T, hidden, s=1.0).bfloat16().requires_grad_(True)
    parts = [(rnd(n_out, hidden).bfloat16(), rnd(n_out).bfloat16(), rnd(16, hidden).requires_grad_(True),
              rnd(n_out, 16).requires_grad_(True)) for n_out in (hidden, 512, 512)]
    seeds = (31, 32, 33)
    ys = fused.shared_input_linears(x, parts, (2.0, 2.0, 2.0), (p, p, p), training=True, seeds=seeds)

    def layer(part, seed):  # float32 oracle from the same bf16 inputs
        w, bias, a, b = part
        xf = x.float()
        xd = torch.where(tk.dropout_keep_mask((T, hidden), p, seed, "cuda"), xf / (1 - p), 0.0) if p else xf
        return xf @ w.float().T + bias.float() + (xd @ a.T @ b.T) * 2.0

    yrs = [layer(part, seed) for part, seed in zip(parts, seeds)]
    leaves = [x] + [t for part in parts for t in part[2:]]
    dys = [torch.randn_like(yr) for yr in yrs]
    assert all(rel(y, yr) < 1e-2 for y, yr in zip(ys, yrs))
    got = torch.autograd.grad(ys, leaves, [dy.bfloat16() for dy in dys])
    for g_, want in zip(got, torch.autograd.grad(yrs, leaves, dys)):
        assert rel(g_, want) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("r", [128, 256])
def test_wide_ranks_run_on_the_kernels(r, dtype):
    """Ranks above the shared passes' limit (tk.SIBLINGS_MAX_RANK) with dropout: a layer, q/k/v as one
    node and the gated MLP node run their kernels one layer at a time, within the stated tolerance
    of a float32 oracle (bf16; 1e-4 in float32)."""
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    T, hidden, p = 2048, 1024, 0.1
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape, s=0.02: torch.randn(*shape, device="cuda", generator=g) * s  # noqa: E731
    x = rnd(T, hidden, s=1.0).to(dtype).requires_grad_(True)
    parts = [(rnd(n_out, hidden).to(dtype), None, rnd(r, hidden).requires_grad_(True),
              rnd(n_out, r).requires_grad_(True)) for n_out in (hidden, 256, 256)]
    ys = fused.shared_input_linears(x, parts, (2.0, 2.0, 2.0), (p, p, p), training=True, seeds=(1, 2, 3))
    mlp = [(rnd(n_out, n_in).to(dtype), None, rnd(r, n_in).requires_grad_(True), rnd(n_out, r).requires_grad_(True))
           for n_out, n_in in ((2048, hidden), (2048, hidden), (hidden, 2048))]
    z = fused.gated_mlp(x, "silu", mlp, (2.0, 2.0, 2.0), (p, p, p), training=True, seeds=(4, 5, 6))

    def layer(inp, part, seed):  # float32 oracle from the same inputs
        w, _, a, b = part
        xd = torch.where(tk.dropout_keep_mask(tuple(inp.shape), p, seed, "cuda"), inp / (1 - p), 0.0)
        return inp @ w.float().T + (xd @ a.T @ b.T) * 2.0

    xf = x.float()
    want = [layer(xf, part, seed) for part, seed in zip(parts, (1, 2, 3))]
    want.append(layer(torch.nn.functional.silu(layer(xf, mlp[0], 4)) * layer(xf, mlp[1], 5), mlp[2], 6))
    got = [*ys, z]
    leaves = [x] + [t for part in parts + mlp for t in part[2:]]
    dys = [torch.randn_like(w_) for w_ in want]
    assert all(rel(a, b) < tol for a, b in zip(got, want))
    for g_, w_ in zip(torch.autograd.grad(got, leaves, [d.to(dtype) for d in dys]), torch.autograd.grad(want, leaves, dys)):
        assert rel(g_, w_) < tol


def test_training_curves_agree():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def run(fast: bool) -> list[float]:
        ops.set_fast_path(fast)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)
        with torch.device("cuda"):
            model = LlamaForSequenceClassification(cfg).bfloat16()
        lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        g = torch.Generator(device="cuda").manual_seed(1)
        ids = torch.randint(1, 1000, (32, 64), device="cuda", generator=g)
        labels = (ids[:, 0] > 500).long()  # a learnable rule
        losses = []
        for _ in range(50):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
        return losses

    try:
        fast, slow = run(True), run(False)
    finally:
        ops.set_fast_path(True)
    assert all(map(math.isfinite, fast)) and all(map(math.isfinite, slow)), (fast, slow)
    assert slow[-1] < 0.9 * slow[0]  # it learns
    for step in (9, 24, 49):
        assert abs(fast[step] - slow[step]) <= 0.05 * slow[step] + 0.01, (step, fast, slow)


@pytest.mark.parametrize("custom_ops", [True, False], ids=["custom-ops", "traced"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_compiled_nodes_match_eager_with_one_seed(p, custom_ops, monkeypatch):
    """Each fused node compiled by inductor, handed the same seed tensor as eager: same output and gradients."""
    monkeypatch.setattr(fused, "COMPILE_AS_CUSTOM_OPS", custom_ops)
    gen = torch.Generator(device="cuda").manual_seed(3)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).bfloat16().requires_grad_(True)

    x, g, u = rand(4, 256, 512), rand(4, 256, 1024), rand(4, 256, 1024)
    w1, w2 = (torch.randn(768, 512, device="cuda", generator=gen) * 0.02).bfloat16(), \
        (torch.randn(512, 1024, device="cuda", generator=gen) * 0.02).bfloat16()
    a1 = (torch.randn(16, 512, device="cuda", generator=gen) * 0.05).requires_grad_(True)
    b1 = (torch.randn(768, 16, device="cuda", generator=gen) * 0.05).requires_grad_(True)
    a2 = (torch.randn(16, 1024, device="cuda", generator=gen) * 0.05).requires_grad_(True)
    b2 = (torch.randn(512, 16, device="cuda", generator=gen) * 0.05).requires_grad_(True)
    seed = torch.tensor([1234], device="cuda")

    def f(x, g, u, a1, b1, a2, b2, seed):
        y1 = fused.lora_linear(x, w1, None, a1, b1, 2.0, p, training=True, seed=seed)
        y2 = fused.gated_down(g, u, "silu", w2, None, a2, b2, 2.0, p, training=True, seed=seed + 1)
        return y1.float().square().mean() + y2.float().square().mean()

    leaves = (x, g, u, a1, b1, a2, b2)
    want = torch.autograd.grad(f(*leaves, seed), leaves)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*leaves, seed), leaves)
    for name, g1, g2 in zip(("x", "g", "u", "A1", "B1", "A2", "B2"), got, want):
        assert rel(g1, g2) < 2e-2, name


@pytest.mark.parametrize("route", ["custom-ops", "traced", "traced-one-node"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_compiled_matches_eager(p, route, monkeypatch):
    """torch.compile (inductor), through the custom ops or traced: loss and A/B gradients as close
    to a float32 run of the same model as the eager bf16 run is.

    Compiled and eager bf16 round differently (the compiler fuses the norms and casts), so the
    two differ by about their distance to float32 each (measured: 0.021 relative for some A/B
    gradients at p = 0.1); a different dropout mask would put the compiled run near 1.
    "traced-one-node" traces each gated MLP as one node (fusion.WHOLE_MLP_NODE_COMPILED)."""
    import copy

    from lorakit import fusion

    monkeypatch.setattr(fused, "COMPILE_AS_CUSTOM_OPS", route == "custom-ops")
    monkeypatch.setattr(fusion, "WHOLE_MLP_NODE_COMPILED", route == "traced-one-node")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).cuda().bfloat16()
    lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, lora_dropout=p, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()
    exact = copy.deepcopy(model).float()  # the same (bf16-valued) weights, run in float32
    ids = torch.randint(0, 512, (4, 128), device="cuda")
    params = [q for q in model.parameters() if q.requires_grad]
    # Each layer draws its dropout seed when it runs; hand every layer of all runs one fixed
    # seed so that they drop the same elements. (With seeds counted in call order, compiled and
    # eager gradients differed at p = 0.1, a likely cause being a frame traced more than once,
    # each trace drawing again; each node compiled with one seed handed in matches eager, the
    # test above.)
    real_new_seed = fused.new_seed
    try:
        fused.new_seed = lambda device="cpu": torch.full((1,), 1234, device=device)
        loss_x = exact(input_ids=ids, labels=ids).loss
        oracle = torch.autograd.grad(loss_x, [q for q in exact.parameters() if q.requires_grad])
        loss = model(input_ids=ids, labels=ids).loss
        want = torch.autograd.grad(loss, params)
        loss_c = torch.compile(model, fullgraph=True)(input_ids=ids, labels=ids).loss
        got = torch.autograd.grad(loss_c, params)
    finally:
        fused.new_seed = real_new_seed
    assert abs(loss.item() - loss_x.item()) < 1e-2 * abs(loss_x.item())
    assert abs(loss_c.item() - loss_x.item()) < 1e-2 * abs(loss_x.item())
    for g_c, g_e, g_x in zip(got, want, oracle):
        eager_err, compiled_err = rel(g_e, g_x), rel(g_c, g_x)
        assert eager_err < 3e-2  # the bf16 run itself is near float32
        assert compiled_err < 1.5 * eager_err + 2e-3, (compiled_err, eager_err)


def mixed_llama():
    """A small bf16 Llama on the GPU with adapters a0..a3 of ranks 16, 8, 4 and 32 on all seven
    projections, and the rows of a mixed batch naming them (one without)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).cuda().bfloat16().eval()
    for i, r in enumerate((16, 8, 4, 32)):
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]), f"a{i}")
    return model, ["a0", None, "a3", "a1", "a2", "a0"]


def test_mixed_decode_replayed_from_a_cuda_graph_matches_eager(monkeypatch):
    """A few-token mixed forward captured in a CUDA graph (the grouped route with its Triton
    expand) and replayed gives the logits of the same forward run eagerly with the dense expand."""
    from lorakit.ops import multi

    model, rows = mixed_llama()
    ids = torch.randint(0, 512, (len(rows), 1), device="cuda")
    with torch.no_grad(), lorakit.route(model, rows):
        monkeypatch.setattr(multi, "DECODE_GROUPED", False)
        model(input_ids=ids)
        eager = model(input_ids=ids).logits.float()  # the second call groups the siblings
        monkeypatch.setattr(multi, "DECODE_GROUPED", True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(input_ids=ids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(input_ids=ids).logits
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
    assert rel(out.float(), eager) < 1e-2


@pytest.mark.parametrize("seq,decode", [(1, "dense"), (1, "dense-per-layer"), (1, "grouped"), (1, "grouped-per-layer"),
                                        (300, "dense"), (300, "dense-per-layer")])
def test_bf16_mixed_batch_matches_each_row_alone(seq, decode, monkeypatch):
    """seq 1: the few-token route with its dense expand and its Triton expand kernel, layers fed
    one input sharing their launches or each alone, on the second call of the shape, the one that
    groups them; seq 300: the prefill kernels, in a second context, whose layers fed one input
    share one shrink (learned in the first), or each alone."""
    from lorakit.ops import multi

    monkeypatch.setattr(multi, "DECODE_GROUPED", decode.startswith("grouped"))
    monkeypatch.setattr(multi, "DECODE_SIBLINGS", not decode.endswith("per-layer"))
    monkeypatch.setattr(multi, "PREFILL_SIBLINGS", not decode.endswith("per-layer"))
    model, rows = mixed_llama()
    ids = torch.randint(0, 512, (len(rows), seq), device="cuda")
    with torch.no_grad():
        for _ in range(2):
            with lorakit.route(model, rows):
                model(input_ids=ids)
                mixed = model(input_ids=ids).logits.float()
        for i, name in enumerate(rows):
            if name is None:
                with lorakit.disable_adapters(model):
                    want = model(input_ids=ids[i:i + 1]).logits.float()
            else:
                lorakit.set_adapter(model, name)
                want = model(input_ids=ids[i:i + 1]).logits.float()
            assert rel(mixed[i:i + 1], want) < 2e-2, (i, name)


def test_graphed_generate_replays_equal_its_eager_steps():
    """lorakit.graphed_generate on a mixed batch: the steps replayed from the CUDA graph give the
    very tokens of the same steps run eagerly (same kernels), and greedy decoding of the base
    model alone agrees with transformers' generate on most tokens (bf16, its own cache)."""
    model, rows = mixed_llama()
    ids = torch.randint(0, 512, (len(rows), 8), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row
    with lorakit.route(model, rows):
        graphed = lorakit.graphed_generate(model, ids, mask, max_new_tokens=24, pad_token_id=0, eos_token_id=[])
        eager = lorakit.graphed_generate(model, ids, mask, max_new_tokens=24, pad_token_id=0, eos_token_id=[],
                                         graphs=False)
    assert graphed.shape == (len(rows), 32) and torch.equal(graphed, eager)
    with lorakit.disable_adapters(model):
        ours = lorakit.graphed_generate(model, ids[:, :4], max_new_tokens=4, pad_token_id=0, eos_token_id=[])
        hf = model.generate(input_ids=ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert float((ours[:, 4:] == hf[:, 4:]).float().mean()) >= 0.75
