"""LoRA math. `reference` is the oracle; this module picks the implementation layers call.

Faster implementations share the reference signatures and are selected here, in one
place, so every caller gets the same choice and every fast path has one oracle to
be tested against.
"""

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
    "lora_branch",
    "lora_conv2d_branch",
    "lora_delta",
    "lora_embedding",
    "lora_linear",
    "merge_weight",
]
