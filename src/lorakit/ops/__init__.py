"""LoRA math. `reference` is the oracle; this module picks the implementation layers call.

Faster implementations share the reference signatures and are selected here, in one
place, so every caller gets the same choice and every fast path has one oracle to
be tested against.

The fused training path (`fused.lora_linear`) is on by default. Turn it off with the
environment variable LORAKIT_FAST_PATH=0 or `lorakit.ops.set_fast_path(False)`.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from lorakit.ops import multi
from lorakit.ops.fused import env_flag, lora_linear_inference
from lorakit.ops.fused import gated_down as fused_gated_down
from lorakit.ops.fused import gated_mlp as fused_gated_mlp
from lorakit.ops.fused import lora_linear as fused_lora_linear
from lorakit.ops.fused import shared_input_linears as fused_shared_input
from lorakit.ops.reference import (
    embedding_delta,
    lora_branch,
    lora_conv2d_branch,
    lora_delta,
    lora_embedding,
    lora_linear,
    merge_weight,
)

__all__ = [
    "embedding_delta",
    "fast_path_blocker",
    "fast_path_enabled",
    "fused_gated_down",
    "fused_gated_mlp",
    "fused_lora_linear",
    "fused_shared_input",
    "log_fallback_once",
    "lora_branch",
    "lora_conv2d_branch",
    "lora_delta",
    "lora_embedding",
    "lora_linear",
    "lora_linear_inference",
    "merge_weight",
    "multi",
    "set_fast_path",
]

log = logging.getLogger("lorakit")
_enabled = env_flag("LORAKIT_FAST_PATH", default=True)
_logged: set[str] = set()


def set_fast_path(enabled: bool) -> None:
    """Turn the fused training path on or off for every LoRA layer."""
    global _enabled
    _enabled = bool(enabled)


def fast_path_enabled() -> bool:
    return _enabled


def fast_path_blocker(base: nn.Module, x: Tensor) -> str | None:
    """Why a linear LoRA layer cannot take the fused path (None: it can)."""
    if not _enabled:
        return "the fast path is turned off (LORAKIT_FAST_PATH=0 or set_fast_path(False))"
    if type(base) is not nn.Linear and type(base).__name__ != "Conv1D":
        return f"the base layer is a {type(base).__name__}, not a plain nn.Linear or Conv1D"
    if base._forward_hooks or base._forward_pre_hooks:
        return "the base layer has forward hooks, which the fused path would skip"
    if not x.is_floating_point():
        return f"the input has dtype {x.dtype}"
    return None


def log_fallback_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.info("lorakit: reference LoRA path used because %s", reason)
