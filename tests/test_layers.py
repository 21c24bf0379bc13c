"""Invariants of every LoRA layer type, table-driven over layer × dtype × rank × bias."""

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig

KINDS = ["linear", "conv1d", "embedding", "conv2d"]
DTYPES = [torch.float32, torch.bfloat16]
RANKS = [1, 4]
BIASES = [False, True]
# Embeddings have no bias; transformers' Conv1D always has one.
CASES = [c for c in itertools.product(KINDS, DTYPES, RANKS, BIASES)
         if not (c[0] == "embedding" and c[3]) and not (c[0] == "conv1d" and not c[3])]
IDS = [f"{k}-{str(d).split('.')[-1]}-r{r}-{'bias' if b else 'nobias'}" for k, d, r, b in CASES]
# merged vs unmerged: one rounding of W+ΔW vs a rounded base output plus a branch
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


class Net(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def make(kind: str, dtype: torch.dtype, bias: bool, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(12, 10, bias=bias)
    elif kind == "conv1d":
        layer = Conv1D(10, 12)  # nf=out, nx=in; weight (in, out)
        nn.init.normal_(layer.bias)
    elif kind == "embedding":
        layer = nn.Embedding(20, 10)
    else:
        layer = nn.Conv2d(3, 5, kernel_size=3, padding=1, stride=1, bias=bias)
    return Net(layer).to(dtype)


def make_input(kind: str, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, 20, (3, 7), generator=g)
    if kind == "conv2d":
        return torch.randn(2, 3, 6, 6, generator=g).to(dtype)
    return torch.randn(3, 7, 12, generator=g).to(dtype)


def config(r: int, init=True, **kw) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"], init_lora_weights=init, **kw)


@pytest.mark.parametrize("kind,dtype,r,bias", CASES, ids=IDS)
def test_zero_init_is_the_identity(kind, dtype, r, bias):
    model = make(kind, dtype, bias)
    x = make_input(kind, dtype)
    expected = model(x)
    lorakit.inject(model, config(r))
    with torch.no_grad():  # the reference path adds an exact zero
        assert torch.equal(model(x), expected)
    # With gradients on, linear layers take the fused path: W + s·B·A with B = 0 is W exactly, but
    # its one GEMM against [W_eff; A] may sum in another order than the base layer's own kernel.
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("kind,dtype,r,bias", CASES, ids=IDS)
def test_only_adapter_parameters_get_gradients(kind, dtype, r, bias):
    model = lorakit.inject(make(kind, dtype, bias), config(r, init=False))
    model(make_input(kind, dtype)).float().square().sum().backward()
    layer = model.layer
    assert layer.base_layer.weight.grad is None
    if bias:
        assert layer.base_layer.bias.grad is None
    a, b = layer.adapter_params("default")
    assert a.grad is not None and b.grad is not None
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("kind,dtype,r,bias", CASES, ids=IDS)
def test_merged_equals_unmerged_and_unmerge_restores_w(kind, dtype, r, bias):
    model = lorakit.inject(make(kind, dtype, bias), config(r, init=False))
    x = make_input(kind, dtype)
    w0 = model.layer.base_layer.weight.detach().clone()
    unmerged = model(x)
    lorakit.merge(model)
    assert not torch.equal(model.layer.base_layer.weight, w0)
    merged = model(x)
    torch.testing.assert_close(merged.float(), unmerged.float(), **TOL[dtype])
    lorakit.unmerge(model)
    assert torch.equal(model.layer.base_layer.weight, w0)  # bit for bit
    assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("kind,dtype,r,bias", CASES, ids=IDS)
def test_save_load_is_exact(kind, dtype, r, bias, tmp_path):
    model = lorakit.inject(make(kind, dtype, bias), config(r, init=False))
    x = make_input(kind, dtype)
    out = model(x)
    lorakit.save_adapter(model, tmp_path)
    fresh = lorakit.load_adapter(make(kind, dtype, bias), tmp_path)
    for p, q in zip(model.layer.adapter_params("default"), fresh.layer.adapter_params("default")):
        assert p.dtype == q.dtype and torch.equal(p, q)
    assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("kind,dtype,r,bias", CASES, ids=IDS)
def test_adapters_are_independent_and_disabled_is_base(kind, dtype, r, bias):
    model = make(kind, dtype, bias)
    x = make_input(kind, dtype)
    base = model(x)
    lorakit.inject(model, config(r, init=False), "one")
    out_one = model(x)
    lorakit.inject(model, config(r + 1, init=False), "two")
    assert torch.equal(model(x), out_one)  # adding "two" leaves "one" as it was
    lorakit.set_adapter(model, "two")
    out_two = model(x)
    assert not torch.equal(out_two, out_one)
    with torch.no_grad():  # training "two" must not move "one"
        for p in model.layer.adapter_params("two"):
            p.add_(1.0)
    lorakit.set_adapter(model, "one")
    assert torch.equal(model(x), out_one)
    with lorakit.disable_adapters(model):
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), out_one)


def test_adapter_dtype_float32_on_bf16_base_and_output_dtype():
    model = lorakit.inject(make("linear", torch.bfloat16, True), config(4, init=False))
    a, b = model.layer.adapter_params("default")
    assert a.dtype == b.dtype == torch.float32
    assert model(make_input("linear", torch.bfloat16)).dtype == torch.bfloat16
    same = lorakit.inject(make("linear", torch.bfloat16, True), config(4), adapter_dtype=torch.bfloat16)
    assert same.layer.lora_A["default"].dtype == torch.bfloat16


def test_dropout_touches_only_the_lora_branch():
    model = lorakit.inject(make("linear", torch.float32, True), config(4, lora_dropout=0.5))
    x = make_input("linear", torch.float32)
    base = model.layer.base_layer(x)
    model.train()
    assert torch.equal(model(x), base)  # B = 0: whatever dropout does, the base path is untouched
    with torch.no_grad():
        model.layer.lora_B["default"].normal_()
    torch.manual_seed(0)
    y1 = model(x)
    torch.manual_seed(1)
    y2 = model(x)
    assert not torch.equal(y1, y2)  # dropout active in training
    model.eval()
    assert torch.equal(model(x), model(x))


def test_keep_original_false_unmerges_within_rounding():
    model = lorakit.inject(make("linear", torch.float32, True), config(4, init=False))
    w0 = model.layer.base_layer.weight.detach().clone()
    lorakit.merge(model, keep_original=False)
    assert model.layer.original_weight is None
    lorakit.unmerge(model)
    torch.testing.assert_close(model.layer.base_layer.weight, w0, rtol=0, atol=1e-6)


def test_merge_twice_and_unmerge_unmerged_are_no_ops():
    model = lorakit.inject(make("linear", torch.float32, True), config(4, init=False))
    x = make_input("linear", torch.float32)
    w0 = model.layer.base_layer.weight.detach().clone()
    lorakit.unmerge(model)  # nothing merged: nothing happens
    assert torch.equal(model.layer.base_layer.weight, w0)
    lorakit.merge(model)
    once = model.layer.base_layer.weight.detach().clone()
    out = model(x)
    lorakit.merge(model)  # already merged: nothing happens
    assert torch.equal(model.layer.base_layer.weight, once)
    assert torch.equal(model(x), out)


def test_conv2d_with_groups_is_refused_clearly():
    model = Net(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1, found groups=2"):
        lorakit.inject(model, config(2))


@settings(max_examples=40, deadline=None)
@given(fan_in=st.integers(1, 24), fan_out=st.integers(1, 24), r=st.integers(1, 8),
       bf16=st.booleans(), seed=st.integers(0, 2**16), alpha=st.floats(0.5, 64))
def test_property_merge_unmerge_round_trip(fan_in, fan_out, r, bf16, seed, alpha):
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(seed)
    model = Net(nn.Linear(fan_in, fan_out).to(dtype))
    lorakit.inject(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["layer"], init_lora_weights=False))
    x = torch.randn(5, fan_in).to(dtype)
    w0 = model.layer.base_layer.weight.detach().clone()
    unmerged = model(x)
    lorakit.merge(model)
    delta = model.layer.delta_weight("default")
    # merge is (W + ΔW) formed in float32 and rounded once
    assert torch.equal(model.layer.base_layer.weight, (w0.float() + delta).to(dtype))
    torch.testing.assert_close(model(x).float(), unmerged.float(), **({"rtol": 3e-2, "atol": 3e-2 * (1 + alpha)} if bf16 else {"rtol": 1e-4, "atol": 1e-4}))
    lorakit.unmerge(model)
    assert torch.equal(model.layer.base_layer.weight, w0)


def test_deepcopy_of_injected_model_is_independent():
    model = lorakit.inject(make("linear", torch.float32, True), config(2, init=False))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.layer.lora_A["default"].zero_()
    assert model.layer.lora_A["default"].abs().sum() > 0
    assert lorakit.list_adapters(twin) == ["default"]
