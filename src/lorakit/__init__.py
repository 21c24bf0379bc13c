"""lorakit: Low-Rank Adaptation (LoRA) for PyTorch models.

    model = lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    ...train...
    lorakit.save_adapter(model, "my-adapter")     # PEFT's format
"""

from lorakit.checkpoint import adapter_state_dict, load_adapter, read_config, save_adapter
from lorakit.config import LoraConfig
from lorakit.decode import graphed_generate
from lorakit.inject import (
    ParameterCount,
    active_adapters,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    get_config,
    inject,
    list_adapters,
    lora_layers,
    merge,
    set_adapter,
    unload,
    unmerge,
)
from lorakit.layers import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from lorakit.route import route

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModulesToSave",
    "ParameterCount",
    "active_adapters",
    "adapter_state_dict",
    "add_weighted_adapter",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "get_config",
    "graphed_generate",
    "inject",
    "list_adapters",
    "load_adapter",
    "lora_layers",
    "merge",
    "read_config",
    "route",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge",
]
