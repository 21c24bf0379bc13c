"""Block-level fusion for training: gated MLPs store g and u, not down_proj's input, q/k/v
run as one node, and under torch.compile norms are recomputed in backward.

A gated MLP computes down(act(gate(x)) ⊙ up(x)). With LoRA on down_proj, a per-layer
fused path must store down's input (tokens × the MLP width, the largest activation of
a block) for dA. When gate, up and down are all LoRA layers, lorakit runs the MLP as
gate, up, then one fused down node that stores g and u — which the MLP's backward
needs anyway — and recomputes act(g) ⊙ u in backward. Recognised MLPs: modules whose
class name ends in "MLP" with gate_proj, up_proj, down_proj and an act_fn that is SiLU
or GELU (Llama, Mistral, Qwen2/3, Gemma and their kin). Anything else keeps its own
forward.

LoRA layers named q_proj, k_proj and v_proj of one module (BERT: query, key and value) read
one input in every attention of that kind. The first of them, when called, computes all three
(or the two that carry an adapter) as one autograd node (`ops.fused.SharedInputFunction`: one
backward, dx accumulated in place, with dropout the masked shrinks of all of them from one
pass over x and their backward dropout terms from one pass over dx and x) and hands the others
their outputs when they are called next with that same input. A module that calls them in
another order or on different inputs (cross-attention) is seen at its first call, told
once in the log, and runs its layers one by one from then on.

Under torch.compile, a normalisation layer (LayerNorm, RMSNorm) beside the modules that hold LoRA
layers — a pre-norm block's input_layernorm / post_attention_layernorm, GPT-2's ln_1 / ln_2 — has
its output recomputed in backward instead of kept: LoRA's dA needs the normalised input that the
frozen model's own backward does not, and the compiler's partitioner otherwise keeps it (two
hidden-sized tensors a block, as much as 1 GiB of a Llama-3.2-1B step at 16 × 512), when the
norm's input, which it keeps anyway, and one pointwise pass give it back.
"""

from __future__ import annotations

import types
import weakref

import torch
import torch.utils.checkpoint
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
# or `set_whole_mlp_node(True, compiled=True)`), and never with the opaque custom ops
# (fused.COMPILE_AS_CUSTOM_OPS). On an H200 (benchmarks/RESULTS.md, twelfth set) four compiled
# Llama-1B-shaped blocks stepped in 21.7 ms with one node against 23.2 with three at dropout 0, but
# the whole 16-block model in 82.9 against 81.8 ms, in one run; in the fourteenth set four blocks
# took 20.36 against 19.97 ms at dropout 0 and 22.48 against 22.77 at 0.1: it does not pay.
WHOLE_MLP_NODE_COMPILED = env_flag("LORAKIT_WHOLE_MLP_NODE_COMPILED", default=False)


def set_whole_mlp_node(enabled: bool, compiled: bool | None = None) -> None:
    """Run gate, up and down of a gated MLP as one autograd node (see WHOLE_MLP_NODE); `compiled`,
    if given, sets whether that holds under torch.compile too (WHOLE_MLP_NODE_COMPILED)."""
    global WHOLE_MLP_NODE, WHOLE_MLP_NODE_COMPILED
    WHOLE_MLP_NODE = bool(enabled)
    if compiled is not None:
        WHOLE_MLP_NODE_COMPILED = bool(compiled)


# q/k/v as one node (see the module docstring). LORAKIT_SHARED_INPUT_NODE=0 or
# `set_shared_input_node(False)` turns it off; it is not used under torch.compile.
SHARED_INPUT_NODE = env_flag("LORAKIT_SHARED_INPUT_NODE", default=True)
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))  # Llama and its kin; BERT


def set_shared_input_node(enabled: bool) -> None:
    """Run q_proj, k_proj and v_proj as one autograd node (see SHARED_INPUT_NODE)."""
    global SHARED_INPUT_NODE
    SHARED_INPUT_NODE = bool(enabled)


# Norms recomputed in backward under torch.compile (see the module docstring).
# LORAKIT_RECOMPUTE_NORMS=0 or `set_recompute_norms(False)` keeps their outputs instead; so does
# turning the fast path off (LORAKIT_FAST_PATH=0).
RECOMPUTE_NORMS = env_flag("LORAKIT_RECOMPUTE_NORMS", default=True)
_NORM_MARK = "_lorakit_recomputed_norm"


def set_recompute_norms(enabled: bool) -> None:
    """Recompute normalisation layers' outputs in backward under torch.compile (see RECOMPUTE_NORMS)."""
    global RECOMPUTE_NORMS
    RECOMPUTE_NORMS = bool(enabled)


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
    and all three bases frozen plain linear layers. Under torch.compile only with WHOLE_MLP_NODE_COMPILED (off by default)
    and not with the opaque custom ops (fused.COMPILE_AS_CUSTOM_OPS)."""
    down = mlp.down_proj
    compiled_ok = WHOLE_MLP_NODE_COMPILED and not ops.fused.COMPILE_AS_CUSTOM_OPS  # custom ops stay opaque
    if (not WHOLE_MLP_NODE or (torch.compiler.is_compiling() and not compiled_ok)
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


class SharedInputGroup:
    """The q/k/v LoRA layers of one module: the first one's call computes all three as one node and
    holds the other two outputs for their calls with the same input (see the module docstring)."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...]) -> None:
        self.parent = weakref.ref(parent)
        self.names = names
        self.pending: list | None = None  # [x, x's version, outputs (taken ones set to None), A/B versions]
        self.off = False

    def _layers(self, layer: LoraLinear, x: Tensor, name: str) -> list[LoraLinear] | None:
        """The group's layers when they can run as one node for adapter `name` on x, else None."""
        parent = self.parent()
        if parent is None or self.off or not SHARED_INPUT_NODE or torch.compiler.is_compiling():
            return None
        layers = [parent._modules.get(n) for n in self.names]
        if layers[0] is not layer:
            return None
        for m in layers:
            if not (isinstance(m, LoraLinear) and m.route is None and not m.fan_in_fan_out and not _hooked(m)
                    and m.unmerged_active() == [name] and m.training == layer.training
                    and ops.fast_path_blocker(m.base_layer, x) is None and not m.base_layer.weight.requires_grad):
                return None
        return layers

    def forward(self, index: int, layer: LoraLinear, x: Tensor, name: str) -> Tensor | None:
        """The output of the group's layer `index` on x, or None where it must run alone."""
        if index == 0:
            if self.pending is not None:  # outputs from the last call still not taken: not called in turn
                self._turn_off()
            layers = self._layers(layer, x, name)
            if layers is None:
                return None
            parts = [(m.base_layer.weight, m.base_layer.bias, m.A_table[name], m.B_table[name]) for m in layers]
            outs = list(ops.fused_shared_input(x, parts, [m.scaling[name] for m in layers],
                                               [m.lora_dropout[name] for m in layers], layer.training))
            first, outs[0] = outs[0], None
            self.pending = [x, x._version, outs, [(a._version, b._version) for _, _, a, b in parts]]
            return first
        pending = self.pending
        if pending is None:
            return None
        x0, version, outs, versions = pending
        a, b = layer.A_table[name], layer.B_table[name]
        # In turn (k_proj, then v_proj), on the very input q_proj had, unchanged, with unchanged factors.
        in_turn = outs[index] is not None and not any(o is not None for o in outs[1:index])
        if in_turn and x0 is x and x._version == version and versions[index] == (a._version, b._version):
            out, outs[index] = outs[index], None
            if not any(o is not None for o in outs):
                self.pending = None
            return out
        self._turn_off()  # called on another input than its first sibling: not one shared input here
        return None

    def _turn_off(self) -> None:
        self.pending = None
        self.off = True
        ops.log_fallback_once(f"{'/'.join(self.names)} of a {type(self.parent()).__name__} are not called in turn on "
                              "one input; they run one by one")


def group_shared_inputs(model: nn.Module) -> int:
    """Give the q/k/v LoRA layers of each module (q_proj, k_proj, v_proj or BERT's query, key, value;
    two of them where the third carries no adapter) one SharedInputGroup; returns how many."""
    count = 0
    for module in model.modules():
        for names in _SIBLINGS:
            names = tuple(n for n in names if isinstance(module._modules.get(n), LoraLinear))
            layers = [module._modules[n] for n in names]
            if len(layers) >= 2 and not any(m.__dict__.get("_shared_input") for m in layers):
                group = SharedInputGroup(module, names)
                for i, m in enumerate(layers):
                    m._shared_input = (group, i)
                count += 1
    return count


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every recognised gated MLP with a LoRA down_proj the fused forward; returns how many."""
    count = 0
    for module in model.modules():
        if is_gated_mlp(module) and isinstance(module.down_proj, LoraLinear) and not getattr(module, _MARK, False):
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, _MARK, True)
            count += 1
    return count


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm: torch's own, or a model's class of that name (LlamaRMSNorm, T5LayerNorm)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _recomputed_norm_forward(self: nn.Module, *args, **kwargs):
    if RECOMPUTE_NORMS and torch.compiler.is_compiling() and torch.is_grad_enabled() and ops.fast_path_enabled():
        # A checkpointed region: the partitioner must recompute what is inside it for backward.
        return torch.utils.checkpoint.checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def recompute_norms(model: nn.Module) -> int:
    """Give every norm that is a direct child of a module holding LoRA layers in its other children
    the forward that torch.compile recomputes in backward; returns how many."""
    count = 0
    for module in model.modules():
        children = list(module._modules.values())
        if not any(isinstance(m, LoraLinear) for c in children if c is not None and not is_norm(c)
                   for m in c.modules()):
            continue
        for child in children:
            if child is not None and is_norm(child) and not child.__dict__.get(_NORM_MARK) and not _hooked(child):
                child.forward = types.MethodType(_recomputed_norm_forward, child)
                child.__dict__[_NORM_MARK] = True
                count += 1
    return count


def unfuse(model: nn.Module) -> None:
    """Restore every MLP's and norm's own forward and run q/k/v one by one."""
    for module in model.modules():
        module.__dict__.pop("_shared_input", None)
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
        if module.__dict__.pop(_NORM_MARK, False):
            del module.forward
