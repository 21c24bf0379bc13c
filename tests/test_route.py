"""Mixed-adapter batches (`lorakit.route`) and the single-adapter inference path."""

import pytest
import torch
from tiny_models import LLAMA_TARGETS, input_ids, tiny_bert_seq_cls, tiny_gpt2, tiny_llama_causal

import lorakit
from lorakit import ops
from lorakit.ops import fused


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


@pytest.fixture(params=["dense", "dense-per-layer", "grouped", "grouped-per-layer", "torch", "kernels"])
def kernels(request, monkeypatch):
    """Each mixed-batch route: the few-token route (the tests' inputs are small) with its dense
    expand and with its Triton expand kernel (interpreted on a CPU), each with layers fed one input
    sharing their launches and with each layer alone; and with the few-token route turned off,
    the prefill shrink/expand ops through their torch path and through the Triton kernels."""
    if request.param in ("torch", "kernels"):
        monkeypatch.setattr(ops.multi, "DENSE_MAX_TOKENS", 0)
    monkeypatch.setattr(ops.multi, "DECODE_GROUPED", request.param.startswith("grouped"))
    monkeypatch.setattr(ops.multi, "DECODE_SIBLINGS", not request.param.endswith("per-layer"))
    fused.use_kernels_on_cpu(request.param in ("kernels", "grouped", "grouped-per-layer"))
    yield request.param
    fused.use_kernels_on_cpu(False)


def with_adapters(model, targets, ranks=(2, 8, 5), head=None):
    """Adapters a, b, c of different ranks, all non-zero; heads (modules to save) made distinct too."""
    for name, r in zip("abc", ranks):
        cfg = lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                                 modules_to_save=[head] if head else None)
        lorakit.inject(model, cfg, name)
    torch.manual_seed(7)
    with torch.no_grad():
        for holder in [m for m in model.modules() if isinstance(m, lorakit.ModulesToSave)]:
            for copy in holder.modules_to_save.values():
                for p in copy.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
    return model


def alone(model, name, **inputs):
    """The model's output for these inputs with adapter `name` alone (None: no adapter)."""
    if name is None:
        with lorakit.disable_adapters(model):
            return model(**inputs).logits
    lorakit.set_adapter(model, name)
    return model(**inputs).logits


ROWS = ["a", None, "c", "b", "a"]


@pytest.mark.parametrize("make,targets,head", [
    (tiny_llama_causal, LLAMA_TARGETS, None),
    (tiny_bert_seq_cls, ["query", "key", "value", "dense"], "classifier"),
    (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], None),
], ids=["llama", "bert-with-head", "gpt2-conv1d"])
@pytest.mark.parametrize("grad", [False, True])
def test_mixed_batch_equals_each_row_alone(make, targets, head, grad, kernels):
    model = with_adapters(make(), targets, head=head)
    ids = input_ids(batch=len(ROWS), seq=7)
    with torch.set_grad_enabled(grad):
        with lorakit.route(model, ROWS):
            mixed = model(input_ids=ids).logits
        for i, name in enumerate(ROWS):
            want = alone(model, name, input_ids=ids[i:i + 1])
            assert rel(mixed[i:i + 1], want) < 1e-5, (i, name)
    # the rows really differ by adapter: a wrong routing could not pass the check above
    assert rel(mixed[0], mixed[1]) > 1e-3 and rel(mixed[0], mixed[3]) > 1e-3


def test_mixed_batch_in_float64_is_exact_to_rounding():
    model = with_adapters(tiny_llama_causal().double(), LLAMA_TARGETS)
    ids = input_ids(batch=len(ROWS), seq=5)
    with torch.no_grad():
        with lorakit.route(model, ROWS):
            mixed = model(input_ids=ids).logits
        for i, name in enumerate(ROWS):
            assert rel(mixed[i:i + 1], alone(model, name, input_ids=ids[i:i + 1])) < 1e-12


def test_gradients_reach_each_adapter_from_its_own_rows_only():
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    layer = model.model.layers[0].self_attn.q_proj
    for t in (layer.lora_A, layer.lora_B):
        for p in t.values():
            p.requires_grad_(True)
    ids = input_ids(batch=3, seq=5)
    with lorakit.route(model, ["a", None, "a"]):
        model(input_ids=ids).logits.square().sum().backward()
    assert layer.lora_A["a"].grad is not None and layer.lora_A["a"].grad.abs().sum() > 0
    assert layer.lora_A["b"].grad is None and layer.lora_A["c"].grad is None


def test_generate_with_a_mixed_batch_equals_each_row_alone(kernels):
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    ids = input_ids(batch=3, seq=6)
    rows = ["b", None, "a"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with lorakit.route(model, rows):
        mixed = model.generate(input_ids=ids, **kw)
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disable_adapters(model):
                want = model.generate(input_ids=ids[i:i + 1], **kw)
        else:
            lorakit.set_adapter(model, name)
            want = model.generate(input_ids=ids[i:i + 1], **kw)
        assert torch.equal(mixed[i:i + 1], want), (i, name)


def test_decode_steps_share_one_launch_among_layers_fed_one_input(monkeypatch):
    """From the second call of a shape on, q/k/v and gate/up each take one grouped expand launch
    (with o and down: 4 a block instead of 7), and the outputs still equal each row alone."""
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    launches = []
    kernel = ops.multi._grouped_expand_kernel
    real = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **kw: launches.append(kw["MEMBERS"]) or real(*a, **kw))
    monkeypatch.setattr(ops.multi, "DECODE_GROUPED", True)
    fused.use_kernels_on_cpu(True)
    try:
        ids = input_ids(batch=len(ROWS), seq=1)
        blocks = len(model.model.layers)
        with torch.no_grad(), lorakit.route(model, ROWS):
            first = model(input_ids=ids).logits
            assert launches == [1] * 7 * blocks  # the first call finds the siblings
            launches.clear()
            second = model(input_ids=ids).logits
            assert launches == [3, 1, 2, 1] * blocks
            with lorakit.disable_adapters(model):  # outputs computed ahead are not taken by a disabled layer
                assert torch.equal(model(input_ids=ids).logits, alone(model, None, input_ids=ids))
            k_proj = model.model.layers[0].self_attn.k_proj
            k_proj.disabled = True  # one member off: its group's next step leaves it out
            launches.clear()
            model(input_ids=ids)
            assert launches == [2, 1, 2, 1] + [3, 1, 2, 1] * (blocks - 1)
            k_proj.disabled = False
            assert torch.equal(model(input_ids=ids).logits, second)
    finally:
        fused.use_kernels_on_cpu(False)
    assert torch.equal(first, second)
    with torch.no_grad():
        for i, name in enumerate(ROWS):
            assert rel(second[i:i + 1], alone(model, name, input_ids=ids[i:i + 1])) < 1e-5, (i, name)


def test_decode_steps_under_inference_mode_match_no_grad():
    """Inference-mode tensors keep no version counter; the sibling checks still hold there."""
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    ids = input_ids(batch=len(ROWS), seq=1)
    with torch.no_grad(), lorakit.route(model, ROWS):
        model(input_ids=ids)
        want = model(input_ids=ids).logits
    with torch.inference_mode(), lorakit.route(model, ROWS):
        model(input_ids=ids)
        got = model(input_ids=ids).logits  # the second call groups the siblings
    assert torch.equal(got, want)


def test_repeated_rows_take_their_source_rows_adapter():
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    ids = input_ids(batch=2, seq=5)
    with torch.no_grad(), lorakit.route(model, ["a", "c"]):
        twice = model(input_ids=ids.repeat_interleave(2, dim=0)).logits
        once = model(input_ids=ids).logits
    assert torch.allclose(twice[0::2], once, atol=1e-6) and torch.allclose(twice[1::2], once, atol=1e-6)


def test_route_errors_are_clear():
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    ids = input_ids(batch=3, seq=5)
    with pytest.raises(ValueError, match=r"no adapter named \['zzz'\]; the model has \['a', 'b', 'c'\]"):
        with lorakit.route(model, ["a", "zzz", None]):
            pass
    with pytest.raises(ValueError, match="one adapter name"):
        with lorakit.route(model, "a"):
            pass
    with pytest.raises(ValueError, match="names 2 rows .* but the batch has 3 rows"):
        with torch.no_grad(), lorakit.route(model, ["a", "b"]):
            model(input_ids=ids)
    with pytest.raises(RuntimeError, match="do not nest"):
        with lorakit.route(model, ["a"]), lorakit.route(model, ["b"]):
            pass
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    with pytest.raises(RuntimeError, match="merged adapters.*unmerge"):
        with lorakit.route(model, ["a", "b", None]):
            pass
    lorakit.unmerge(model)
    with torch.no_grad(), lorakit.route(model, ["a", "b", None]):  # the failed contexts left nothing behind
        model(input_ids=ids)
    assert all(layer.route is None for _, layer in lorakit.lora_layers(model))


def test_stacked_tables_follow_changes_to_an_adapter():
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    ids = input_ids(batch=2, seq=5)
    with torch.no_grad():
        with lorakit.route(model, ["a", "b"]):
            before = model(input_ids=ids).logits
        model.model.layers[0].self_attn.q_proj.lora_B["b"].mul_(3.0)
        with lorakit.route(model, ["a", "b"]):
            after = model(input_ids=ids).logits
        assert torch.allclose(before[0], after[0], atol=1e-6)
        assert rel(after[1:], alone(model, "b", input_ids=ids[1:])) < 1e-5
        assert not torch.allclose(before[1], after[1], atol=1e-4)


def test_hot_load_leaves_other_adapters_alone_and_delete_frees(tmp_path):
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    ids = input_ids(batch=3, seq=5)
    lorakit.set_adapter(model, "b")
    lorakit.save_adapter(model, tmp_path / "b", adapter_name="b")
    with torch.no_grad(), lorakit.route(model, ["a", "b", "c"]):
        before = model(input_ids=ids).logits
    lorakit.load_adapter(model, tmp_path / "b", adapter_name="b2")
    with torch.no_grad(), lorakit.route(model, ["a", "b2", "c"]):
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer._stacks
    lorakit.delete_adapter(model, "b2")
    assert "b2" not in layer.lora_A and not layer._stacks
    assert not any("b2" in n for n, _ in model.named_parameters())


def test_set_adapter_copies_no_weights():
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    lorakit.set_adapter(model, "c")
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tokens", [2, 4000], ids=["in-place-expand", "w-eff"])
def test_single_adapter_inference_path_matches_reference(dtype, tol, tokens):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, 24, generator=g, dtype=dtype)
    w = torch.randn(20, 24, generator=g, dtype=dtype)
    b = torch.randn(20, generator=g, dtype=dtype)
    a = torch.randn(4, 24, generator=g, dtype=dtype)
    bb = torch.randn(20, 4, generator=g, dtype=dtype)
    got = ops.lora_linear_inference(x, w, b, a, bb, 0.5)
    assert rel(got, ops.lora_linear(x, w, b, a, bb, 0.5)) < tol


def test_model_inference_takes_the_inference_path(monkeypatch):
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    lorakit.set_adapter(model, "b")
    ids = input_ids()
    calls = []
    real = ops.lora_linear_inference
    monkeypatch.setattr(ops, "lora_linear_inference", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = model(input_ids=ids).logits
    assert len(calls) == 14
    ops.set_fast_path(False)
    try:
        with torch.no_grad():
            slow = model(input_ids=ids).logits
    finally:
        ops.set_fast_path(True)
    assert len(calls) == 14 and rel(fast, slow) < 1e-5


def test_inference_under_autocast_matches_the_reference_path():
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    lorakit.set_adapter(model, "b")
    ids = input_ids(batch=3, seq=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        single = model(input_ids=ids).logits
        with lorakit.route(model, ["a", None, "c"]):
            mixed = model(input_ids=ids).logits
        ops.set_fast_path(False)
        try:
            want = model(input_ids=ids).logits
        finally:
            ops.set_fast_path(True)
    assert torch.equal(single, want)
    assert mixed.dtype == want.dtype


def test_prefill_checks_its_arguments_once_per_shape(monkeypatch):
    """A prefill-sized mixed batch checks each layer's tables and shapes on its first call of a
    shape; calls that repeat it skip the checks; the results are the same either way."""
    monkeypatch.setattr(ops.multi, "DENSE_MAX_TOKENS", 0)
    checks = []
    real = ops.multi._check_table
    monkeypatch.setattr(ops.multi, "_check_table", lambda *a: checks.append(a[0]) or real(*a))
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    ids = input_ids()
    assert ids.shape[0] == 2
    with torch.no_grad(), lorakit.route(model, ["a", "b"]):
        first = model(input_ids=ids).logits
        n_first = len(checks)
        again = model(input_ids=ids).logits
        n_again = len(checks) - n_first
        model(input_ids=ids[:, :-1])
        n_new_shape = len(checks) - n_first - n_again
    assert n_first > 0 and n_again == 0 and n_new_shape == n_first
    assert torch.equal(first, again)


@pytest.mark.parametrize("kernels_on", [False, True], ids=["torch", "kernels"])
def test_prefill_plans_carry_over_to_later_contexts_of_the_same_rows(monkeypatch, kernels_on):
    """A later context of the same rows reuses the layers' prefill plans and index tensors (no
    checks, nothing new on the device); other rows, or an adapter changed between the
    contexts, get new ones; each context's results equal each row run with its adapter alone."""
    monkeypatch.setattr(ops.multi, "DENSE_MAX_TOKENS", 0)
    fused.use_kernels_on_cpu(kernels_on)
    plans = []
    real = ops.multi.MixedLinear.__init__
    monkeypatch.setattr(ops.multi.MixedLinear, "__init__", lambda self, *a, **k: plans.append(self) or real(self, *a, **k))
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    n_layers = sum(isinstance(m, lorakit.LoraLayer) for m in model.modules())
    ids = input_ids()
    try:
        with torch.no_grad():
            outs = []
            for rows in (["a", "b"], ["a", "b"], ["b", None], ["a", "b"]):
                with lorakit.route(model, rows) as r:
                    outs.append((rows, model(input_ids=ids).logits, r.row_tensor(("a", "b", "c"), 2, ids.device)))
            counts = [len(plans)]
            before = {n: alone(model, n, input_ids=ids) for n in ("a", "b", None)}
            model.model.layers[0].self_attn.q_proj.lora_B["b"].mul_(3.0)
            with lorakit.route(model, ["a", "b"]):
                changed = model(input_ids=ids).logits
            counts.append(len(plans))
            want = {n: alone(model, n, input_ids=ids) for n in ("a", "b", None)}
    finally:
        fused.use_kernels_on_cpu(False)
    # contexts 1, 3 (other rows) and 4 (back to the first rows, whose plans context 3 replaced) built plans
    assert counts[0] == 3 * n_layers
    assert counts[1] - counts[0] == 1  # only the layer whose adapter changed
    assert outs[0][2] is outs[1][2] and outs[0][2] is not outs[2][2]  # the index tensor, shared by equal rows
    assert torch.equal(outs[0][1], outs[1][1])
    for (rows, out, _), i in ((outs[0], 0), (outs[0], 1), (outs[2], 0), (outs[2], 1), (outs[3], 1)):
        assert rel(out[i], before[rows[i]][i]) < 1e-5
    for i, name in enumerate(["a", "b"]):
        assert rel(changed[i], want[name][i]) < 1e-5
    assert not torch.allclose(changed[1], outs[3][1][1], atol=1e-4)


@pytest.mark.parametrize("kernels_on", [False, True], ids=["torch", "kernels"])
def test_prefill_layers_fed_one_input_share_one_shrink(monkeypatch, kernels_on):
    """From the second context on, q/k/v and gate/up each run one shrink for the group (learned
    from the first context), with results equal to each layer alone; turned off, none is shared."""
    monkeypatch.setattr(ops.multi, "DENSE_MAX_TOKENS", 0)
    fused.use_kernels_on_cpu(kernels_on)
    groups = []
    real = ops.multi.lora_shrink_group
    monkeypatch.setattr(ops.multi, "lora_shrink_group", lambda x2, a, *r, **k: groups.append(len(a)) or real(x2, a, *r, **k))
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS, ranks=(4, 8, 6))  # one padded rank, 16
    n_blocks = len(model.model.layers)
    ids = input_ids()
    try:
        with torch.no_grad():
            outs = []
            for shared in (True, True, False):
                monkeypatch.setattr(ops.multi, "PREFILL_SIBLINGS", shared)
                groups.clear()
                with lorakit.route(model, ["c", "a"]):
                    outs.append((model(input_ids=ids).logits, sorted(groups)))
            want = [alone(model, n, input_ids=ids)[i] for i, n in enumerate(["c", "a"])]
    finally:
        fused.use_kernels_on_cpu(False)
    # each block: one shrink for q/k/v and one for gate/up (o and down run their own)
    assert [g for g in outs[1][1] if g > 1] == [2] * n_blocks + [3] * n_blocks
    assert all(g == 1 for g in outs[0][1] + outs[2][1])
    for out, _ in outs:
        for i in range(2):
            assert rel(out[i], want[i]) < 1e-5
