"""Block-level fusion for training: gated MLPs store g and u, not down_proj's input.

A gated MLP computes down(act(gate(x)) ⊙ up(x)). With LoRA on down_proj, a per-layer
fused path must store down's input (tokens × the MLP width, the largest activation of
a block) for dA. When gate, up and down are all LoRA layers, lorakit runs the MLP as
gate, up, then one fused down node that stores g and u — which the MLP's backward
needs anyway — and recomputes act(g) ⊙ u in backward. Recognised MLPs: modules whose
class name ends in "MLP" with gate_proj, up_proj, down_proj and an act_fn that is SiLU
or GELU (Llama, Mistral, Qwen2/3, Gemma and their kin). Anything else keeps its own
forward.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from lorakit import ops
from lorakit.layers import LoraLinear
from lorakit.ops.fused import env_flag

_MARK = "_lorakit_gated_mlp"
_PARTS = ("gate_proj", "up_proj", "down_proj")

# Run a recognised MLP whose three projections all carry LoRA as one autograd node
# (`ops.fused.GatedMLPFunction`) instead of three. LORAKIT_WHOLE_MLP_NODE=0 or
# `set_whole_mlp_node(False)` turns it off.
WHOLE_MLP_NODE = env_flag("LORAKIT_WHOLE_MLP_NODE", default=True)

# Under torch.compile the MLP runs as three nodes unless this is on (LORAKIT_WHOLE_MLP_NODE_COMPILED=1
# or `set_whole_mlp_node(compiled=True)`).
WHOLE_MLP_NODE_COMPILED = env_flag("LORAKIT_WHOLE_MLP_NODE_COMPILED", default=False)


def set_whole_mlp_node(enabled: bool, compiled: bool | None = None) -> None:
    """Run gate, up and down of a gated MLP as one autograd node (see WHOLE_MLP_NODE); `compiled`,
    if given, sets whether that holds under torch.compile too (WHOLE_MLP_NODE_COMPILED)."""
    global WHOLE_MLP_NODE, WHOLE_MLP_NODE_COMPILED
    WHOLE_MLP_NODE = bool(enabled)
    if compiled is not None:
        WHOLE_MLP_NODE_COMPILED = bool(compiled)


def activation_kind(act: object) -> str | None:
    """The GATED_ACTIVATIONS name of an activation module, or None if the fused node cannot run it."""
    if isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU"):
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return None


def is_gated_mlp(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("MLP") and activation_kind(getattr(module, "act_fn", None)) is not None
            and all(isinstance(getattr(module, n, None), nn.Module) for n in _PARTS))


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run forward hooks, which the fused forwards, calling the
    projections' math directly, would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _one_node_parts(mlp: nn.Module, name: str, x: Tensor):
    """((weight, bias, A, B) of gate, up, down) when the whole MLP can run as one node with
    adapter `name`, else None. `_fused_forward` has checked down_proj already; gate and up must
    be LoRA layers like it, each with `name` alone active, no hooks, in down's training mode,
    and all three bases frozen plain linear layers. Under torch.compile only with WHOLE_MLP_NODE_COMPILED."""
    down = mlp.down_proj
    if (not WHOLE_MLP_NODE or (torch.compiler.is_compiling() and not WHOLE_MLP_NODE_COMPILED)
            or down.base_layer.weight.requires_grad):
        return None
    for layer in (mlp.gate_proj, mlp.up_proj):
        if not (isinstance(layer, LoraLinear) and layer.route is None and not layer.fan_in_fan_out and not _hooked(layer)
                and layer.unmerged_active() == [name] and layer.training == down.training
                and ops.fast_path_blocker(layer.base_layer, x) is None and not layer.base_layer.weight.requires_grad):
            return None
    return [(m.base_layer.weight, m.base_layer.bias, m.A_table[name], m.B_table[name])
            for m in (mlp.gate_proj, mlp.up_proj, down)]


def _fused_forward(self: nn.Module, x: Tensor) -> Tensor:
    down = self.down_proj
    if (isinstance(down, LoraLinear) and down.route is None and torch.is_grad_enabled() and not down.fan_in_fan_out
            and not _hooked(down)):
        active = down.unmerged_active()
        if len(active) == 1 and ops.fast_path_blocker(down.base_layer, x) is None:
            name = active[0]
            parts = _one_node_parts(self, name, x)
            if parts is not None:
                layers = (self.gate_proj, self.up_proj, down)
                return ops.fused_gated_mlp(x, activation_kind(self.act_fn), parts,
                                           [m.scaling[name] for m in layers], [m.lora_dropout[name] for m in layers],
                                           down.training)
            g, u = self.gate_proj(x), self.up_proj(x)
            return ops.fused_gated_down(g, u, activation_kind(self.act_fn), down.base_layer.weight, down.base_layer.bias,
                                        down.A_table[name], down.B_table[name], down.scaling[name],
                                        down.lora_dropout[name], down.training)
    return type(self).forward(self, x)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every recognised gated MLP with a LoRA down_proj the fused forward; returns how many."""
    count = 0
    for module in model.modules():
        if is_gated_mlp(module) and isinstance(module.down_proj, LoraLinear) and not getattr(module, _MARK, False):
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, _MARK, True)
            count += 1
    return count


def unfuse(model: nn.Module) -> None:
    """Restore every MLP's own forward."""
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
