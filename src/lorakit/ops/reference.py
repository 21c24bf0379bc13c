"""The LoRA math in plain PyTorch: the single source of truth.

Every faster implementation has the same signatures and is tested against these
functions. Conventions follow `torch.nn`: a linear weight is (out, in), so for
y = x·Wᵀ the adapter is lora_A: (r, in), lora_B: (out, r) and ΔW = s·B·A: (out, in).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def lora_delta(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """ΔW = s·B·A in float32, shaped like the base weight.

    Linear: A (r, in), B (out, r) -> (out, in).
    Conv2d: A (r, in, kh, kw), B (out, r, 1, 1) -> (out, in, kh, kw).
    Embedding (PEFT's layout): A (r, num_embeddings), B (dim, r) -> use `embedding_delta`.
    """
    a = lora_A.float().flatten(1)  # (r, in·kh·kw)
    b = lora_B.float().flatten(1)  # (out, r)
    delta = (b @ a) * scale  # (out, in·kh·kw)
    return delta.reshape(lora_B.shape[0], *lora_A.shape[1:])


def embedding_delta(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """ΔW for an embedding table in float32: (num_embeddings, dim)."""
    return (lora_B.float() @ lora_A.float()).T * scale


def lora_branch(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float = 0.0,
                training: bool = False) -> Tensor:
    """s·B·A·dropout(x) for a linear layer, computed in the adapter's dtype.

    x: (..., in) -> (..., out). Dropout touches only this branch, never the base path.
    """
    if dropout_p and training:
        x = F.dropout(x, dropout_p, training=True)
    h = F.linear(x.to(lora_A.dtype), lora_A)  # (..., r)
    return F.linear(h, lora_B) * scale  # (..., out)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scale: float, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """y = x·Wᵀ + b + s·B·A·dropout(x), returned in the base layer's dtype."""
    base = F.linear(x, weight, bias)
    return base + lora_branch(x, lora_A, lora_B, scale, dropout_p, training).to(base.dtype)


def lora_embedding(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                   padding_idx: int | None = None) -> Tensor:
    """E[ids] + s·(Aᵀ[ids])·Bᵀ with PEFT's embedding layout (A: (r, num), B: (dim, r))."""
    base = F.embedding(ids, weight, padding_idx)
    h = F.embedding(ids, lora_A.T, padding_idx)  # (..., r)
    return base + (h @ lora_B.T * scale).to(base.dtype)


def lora_conv2d_branch(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, stride, padding,
                       dilation, dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """The LoRA branch of a Conv2d: A is a conv with the base's geometry, B a 1×1 conv."""
    if dropout_p and training:
        x = F.dropout(x, dropout_p, training=True)
    h = F.conv2d(x.to(lora_A.dtype), lora_A, None, stride, padding, dilation)  # (N, r, H', W')
    return F.conv2d(h, lora_B) * scale  # (N, out, H', W')


def merge_weight(weight: Tensor, delta: Tensor, sign: float = 1.0) -> Tensor:
    """W ± ΔW computed in float32 and rounded once to W's dtype."""
    return (weight.float() + sign * delta.to(weight.device)).to(weight.dtype)
