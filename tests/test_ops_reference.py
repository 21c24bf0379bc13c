"""The reference math agrees with the merged-weight formulas it stands for (float64)."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.ops import reference as ref

f64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("shape,r", [((3, 5, 7), 2), ((4, 7), 1), ((2, 2, 3, 7), 7)])
def test_lora_linear_equals_the_merged_weight(shape, r):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, **f64)
    w, b = torch.randn(6, 7, generator=g, **f64), torch.randn(6, generator=g, **f64)
    a, bb = torch.randn(r, 7, generator=g, **f64), torch.randn(6, r, generator=g, **f64)
    y = ref.lora_linear(x, w, b, a, bb, 0.75)
    torch.testing.assert_close(y, x @ (w + 0.75 * bb @ a).T + b, rtol=1e-12, atol=1e-12)
    assert torch.equal(ref.lora_delta(a, bb, 0.75), (bb.float() @ a.float()) * 0.75)


def test_lora_embedding_equals_the_merged_table():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(11, 5, generator=g, **f64)
    a, b = torch.randn(3, 11, generator=g, **f64), torch.randn(5, 3, generator=g, **f64)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    merged = w + 2.0 * (b @ a).T
    torch.testing.assert_close(ref.lora_embedding(ids, w, a, b, 2.0), merged[ids], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.embedding_delta(a, b, 2.0).double(), 2.0 * (b @ a).T, rtol=1e-6, atol=1e-6)


def test_lora_conv2d_branch_equals_a_conv_with_the_delta():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g, **f64)
    a, b = torch.randn(4, 3, 3, 3, generator=g, **f64), torch.randn(5, 4, 1, 1, generator=g, **f64)
    branch = ref.lora_conv2d_branch(x, a, b, 0.5, stride=2, padding=1, dilation=1)
    delta = 0.5 * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    torch.testing.assert_close(branch, F.conv2d(x, delta, stride=2, padding=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.lora_delta(a, b, 0.5).double(), delta, rtol=1e-6, atol=1e-6)


def test_dropout_applies_to_the_branch_only_and_only_in_training():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 7, generator=g)
    a, b = torch.randn(2, 7, generator=g), torch.randn(6, 2, generator=g)
    assert torch.equal(ref.lora_branch(x, a, b, 1.0, 0.5, training=False), ref.lora_branch(x, a, b, 1.0))
    torch.manual_seed(0)
    dropped = ref.lora_branch(x, a, b, 1.0, 0.5, training=True)
    torch.manual_seed(0)
    mask_x = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(dropped, mask_x @ a.T @ b.T)


def test_merge_weight_rounds_once_in_float32():
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    delta = torch.tensor([1e-3, 1e-3, 1e-3])  # below bf16's resolution at these magnitudes
    assert torch.equal(ref.merge_weight(w, delta), w)
    big = torch.tensor([0.5, 0.5, 0.5])
    assert torch.equal(ref.merge_weight(w, big), (w.float() + big).to(torch.bfloat16))
