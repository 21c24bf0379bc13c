"""Put LoRA into a model and manage its adapters.

`inject` finds the target layers, wraps them in place and freezes everything else.
The other functions add, switch, disable, merge, combine and remove adapters. The
model keeps its own class and forward; lorakit only swaps child modules and records
its adapters' configs on the model.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from copy import deepcopy
from typing import Literal, NamedTuple

import torch
from torch import nn

from lorakit import ops
from lorakit.config import COMMON_LAYER_CONTAINERS, LoraConfig
from lorakit.fusion import fuse_gated_mlps, group_shared_inputs, recompute_norms, unfuse
from lorakit.layers import SUPPORTED_TYPES, LoraLayer, ModulesToSave, is_conv1d, is_supported, wrap

_STATE_ATTR = "_lorakit_state"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")
# Heads that PEFT trains in full for sequence classification when task_type is SEQ_CLS.
SEQ_CLS_HEADS = ("classifier", "score")


class _State:
    """What lorakit records on a model: each adapter's config and the active adapters."""

    def __init__(self) -> None:
        self.configs: dict[str, LoraConfig] = {}
        self.active: list[str] = []
        # lorakit.route's index tensors, kept for later contexts of the same rows (route.Route)
        self.route_tensors: OrderedDict = OrderedDict()


def check_adapter_name(name: str) -> str:
    """Adapter names become state-dict keys and directory names: keep them plain."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"adapter name must be letters, digits, '_' or '-' (no dots, spaces or path separators); got {name!r}"
        )
    return name


def _state(model: nn.Module) -> _State:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no lorakit adapters; call lorakit.inject(model, config) first")
    return state


def has_adapters(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def get_config(model: nn.Module, adapter_name: str = "default") -> LoraConfig:
    """The LoraConfig an adapter was created with."""
    state = _state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(state.configs)}")
    return state.configs[adapter_name]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


# -- finding targets -------------------------------------------------------------------


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _layer_index(name: str, patterns: Sequence[str]) -> int | None:
    for pattern in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, not descending into lorakit's own wrappers."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name)
        if name:
            yield name, module


def effective_modules_to_save(config: LoraConfig) -> tuple[str, ...]:
    names = tuple(config.modules_to_save or ())
    if config.task_type == "SEQ_CLS":
        names += tuple(h for h in SEQ_CLS_HEADS if h not in names)
    return names


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `config` adapts in `model`; raises if a target matches nothing."""
    spec = config.target_modules
    if spec is None:
        raise ValueError("LoraConfig.target_modules is not set: name the layers to adapt, e.g. "
                         "['q_proj', 'v_proj'], or use 'all-linear'")
    saved = effective_modules_to_save(config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    all_linear = spec == ("all-linear",) or spec == "all-linear"
    patterns = config.layers_pattern or COMMON_LAYER_CONTAINERS
    layers = config.layers_to_transform
    layers = {layers} if isinstance(layers, int) else set(layers) if layers is not None else None
    targets, used = [], set()
    for name, module in _candidates(model):
        inner = module.base_layer if isinstance(module, LoraLayer) else module
        if all_linear:
            hit = (isinstance(inner, nn.Linear) or is_conv1d(inner)) and inner is not head and not _matches(name, saved)
        else:
            hit = _matches(name, spec)
        if hit and not isinstance(spec, str) and not all_linear:
            used.update(s for s in spec if name == s or name.endswith("." + s))
        if not hit or (config.exclude_modules and _matches(name, config.exclude_modules)):
            continue
        if not is_supported(inner):
            raise ValueError(f"target {name!r} is a {type(inner).__name__}; lorakit adapts {SUPPORTED_TYPES}. "
                             "Name the linear layers inside it instead")
        if layers is not None and _layer_index(name, patterns) not in layers:
            continue
        targets.append((name, module))
    missing = [s for s in spec if s not in used] if not isinstance(spec, str) and not all_linear else []
    if missing or not targets:
        raise ValueError(_no_match_message(model, spec, missing))
    return targets


def _no_match_message(model: nn.Module, spec, missing: list[str]) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in _candidates(model)
                    if is_supported(m.base_layer if isinstance(m, LoraLayer) else m)})
    what = f"target_modules entries {missing}" if missing else f"target_modules {spec!r}"
    msg = f"LoraConfig.{what} matched no adaptable module of {type(model).__name__}."
    msg += f" Its adaptable layers ({SUPPORTED_TYPES}) are named: {', '.join(names) or '(none)'}."
    close = sorted({c for s in missing for c in difflib.get_close_matches(s, names, n=3)})
    if close:
        msg += f" Did you mean {', '.join(close)}?"
    return msg


# -- injecting and switching -------------------------------------------------------------


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _adapter_dtype(module: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    weight = module.base_weight
    # Half-precision bases get float32 adapters: the optimizer then updates A and B
    # without bf16 rounding swallowing small steps (PEFT does the same by default).
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default", *,
           adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap `config`'s targets in LoRA layers in place and freeze everything but adapters.

    The first adapter becomes active. Called again with another name, it adds a second
    adapter (inactive until `set_adapter`). Adapters of half-precision layers are kept
    in float32 unless `adapter_dtype` says otherwise. Returns `model`.
    """
    check_adapter_name(adapter_name)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"expected a lorakit.LoraConfig, found {type(config).__name__}")
    state = getattr(model, _STATE_ATTR, None) or _State()
    if adapter_name in state.configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; pick another name "
                         "or delete_adapter it first")
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError("the model has merged adapters; unmerge(model) before adding another")
    targets = find_targets(model, config)
    _unguard_output_head(model)  # put back below; a head targeted by this adapter gets wrapped bare
    saved = [(n, m) for n, m in _candidates(model) if _matches(n, effective_modules_to_save(config))
             and not any(n.startswith(t + ".") for t, _ in targets)]
    for name, module in targets:
        layer = module if isinstance(module, LoraLayer) else wrap(module)
        layer.add_adapter(adapter_name, config.rank_for(name), config.alpha_for(name), config.scale_for(name),
                          config.lora_dropout, config.init_lora_weights, _adapter_dtype(layer, adapter_dtype))
        if layer is not module:
            _set_child(model, name, layer)
    for name, module in saved:
        holder = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        holder.add_adapter(adapter_name)
        if holder is not module:
            _set_child(model, name, holder)
    state.configs[adapter_name] = config
    setattr(model, _STATE_ATTR, state)
    set_adapter(model, state.active or [adapter_name])
    fuse_gated_mlps(model)
    group_shared_inputs(model)
    recompute_norms(model)
    _guard_output_head(model)
    return model


_HEAD_HOOK = "_lorakit_contiguous_input"


def _contiguous_input(module: nn.Module, args: tuple):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() >= 3 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def _guard_output_head(model: nn.Module) -> None:
    """Feed the frozen output layer contiguous inputs.

    transformers slices the hidden states before the LM head (`logits_to_keep`, and every
    prompt prefill in `generate`). For a non-contiguous 3-D input and a weight that does
    not require grad, torch's matmul expands the weight to one copy per batch row and runs
    a batched GEMM: on Llama-3.2-1B (vocabulary 128,256) that is 0.5 GB copied per row, 2.6 ms
    of a 16 × 512 prefill. A trainable weight takes the single-GEMM route, so the model as
    loaded never pays this; once injection freezes the head it would. Copying the sliced
    input (batch × kept positions × hidden) keeps the single GEMM.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is nn.Linear and not hasattr(head, _HEAD_HOOK):
        setattr(head, _HEAD_HOOK, head.register_forward_pre_hook(_contiguous_input))


def _unguard_output_head(model: nn.Module) -> None:
    for module in model.modules():
        handle = module.__dict__.pop(_HEAD_HOOK, None)
        if handle is not None:
            handle.remove()


def _forget(model: nn.Module) -> None:
    """Drop lorakit's record, fused MLP forwards and head guard from a model with no adapter left."""
    delattr(model, _STATE_ATTR)
    unfuse(model)
    _unguard_output_head(model)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters the model holds, in the order they were added."""
    return list(_state(model).configs) if has_adapters(model) else []


def active_adapters(model: nn.Module) -> list[str]:
    return list(_state(model).active)


def set_adapter(model: nn.Module, name: str | Sequence[str]) -> None:
    """Make `name` (or several names, summed) the active adapter(s), and the trainable ones.

    No weights are copied: each layer only changes which of its adapters it applies.
    """
    state = _state(model)
    names = [name] if isinstance(name, str) else list(name)
    unknown = [n for n in names if n not in state.configs]
    if unknown or not names:
        raise ValueError(f"no adapter named {unknown or names}; the model has {sorted(state.configs)}")
    if any(layer.merged_adapters for _, layer in lora_layers(model)) and names != state.active:
        raise ValueError("the model has merged adapters; unmerge(model) before switching adapters")
    state.active = names
    for _, layer in lora_layers(model):
        layer.set_active(names)
    for _, holder in _saved_modules(model):
        holder.active_adapter = next((n for n in names if n in holder.modules_to_save), None)
    _mark_trainable(model, state)


def _mark_trainable(model: nn.Module, state: _State) -> None:
    """Freeze everything, then unfreeze the active adapters, their saved modules and biases."""
    for p in model.parameters():
        p.requires_grad_(False)
    bias_modes = {state.configs[n].bias for n in state.active}
    if "all" in bias_modes:
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    for _, layer in lora_layers(model):
        if "lora_only" in bias_modes and layer.active_adapters and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
        for n in layer.active_adapters:
            for p in layer.adapter_params(n):
                p.requires_grad_(True)
    for _, holder in _saved_modules(model):
        if holder.active_adapter is not None:
            holder.modules_to_save[holder.active_adapter].requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter and free its memory; layers left with no adapter are unwrapped."""
    state = _state(model)
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(state.configs)}")
    for _, layer in lora_layers(model):
        if name in layer.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge(model) before deleting it")
    for layer_name, layer in list(lora_layers(model)):
        if name in layer.adapter_names:
            layer.delete_adapter(name)
            if not layer.adapter_names:
                _set_child(model, layer_name, layer.base_layer)
    for holder_name, holder in list(_saved_modules(model)):
        if name in holder.modules_to_save:
            del holder.modules_to_save[name]
            if len(holder.modules_to_save) == 0:
                _set_child(model, holder_name, holder.original_module)
    del state.configs[name]
    state.active = [n for n in state.active if n != name]
    if not state.configs:
        _forget(model)
        return
    set_adapter(model, state.active or next(iter(state.configs)))


@contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes exactly what the base model does."""
    _state(model)
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged_adapters for layer in layers):
        raise ValueError("the model has merged adapters; unmerge(model) before disabling adapters")
    holders = [h for _, h in _saved_modules(model)]
    for m in layers + holders:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers + holders:
            m.disabled = False


# -- merging -------------------------------------------------------------------------------


def merge(model: nn.Module, adapter_name: str | Sequence[str] | None = None, *, keep_original: bool = True) -> None:
    """Add ΔW of the active adapter(s) (or `adapter_name`) into the base weights.

    The sum is formed in float32 and rounded once to the weight's dtype. With
    `keep_original=True` (the default) each merged layer keeps a copy of its weight, so
    `unmerge` restores W bit for bit; that costs the merged weights' size in memory
    again, on their device. With `keep_original=False` unmerge subtracts ΔW in float32
    instead, which restores W to within rounding. Merging an adapter that is already
    merged does nothing.
    """
    state = _state(model)
    names = state.active if adapter_name is None else [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"no adapter named {unknown}; the model has {sorted(state.configs)}")
    for _, layer in lora_layers(model):
        layer.merge([n for n in names if n in layer.adapter_names], keep_original=keep_original)


def unmerge(model: nn.Module) -> None:
    """Undo `merge` on every layer. On a model with nothing merged it does nothing."""
    _state(model)
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """The plain model with no lorakit module left.

    merge=True folds the active adapters (and their trained copies of saved modules)
    into the base model; merge=False restores the base model as it was.
    """
    state = _state(model)
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge([n for n in state.active if n in layer.adapter_names], keep_original=False)
        else:
            layer.unmerge()
        _set_child(model, name, layer.base_layer)
    for name, holder in list(_saved_modules(model)):
        keep = holder.modules_to_save[holder.active_adapter] if merge and holder.active_adapter else holder.original_module
        _set_child(model, name, keep)
    _forget(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# -- counting ------------------------------------------------------------------------------


class ParameterCount(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        """"Trainable parameters: 11,276,290 (0.91%) of 1,247,090,690" """
        return f"Trainable parameters: {self.trainable:,} ({self.percent:.2f}%) of {self.total:,}"

    def __str__(self) -> str:
        return self.summary()


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters, each tensor counted once (works on the meta device)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return ParameterCount(trainable, total)


# -- combining adapters --------------------------------------------------------------------


def add_weighted_adapter(model: nn.Module, weights: Mapping[str, float], new_name: str,
                         method: Literal["linear", "cat", "svd"] = "linear", *, rank: int | None = None) -> None:
    """Add an adapter built from others: ΔW_new ≈ Σ wᵢ·ΔWᵢ.

    - "cat": stacks the factors, rank Σ rᵢ; ΔW_new = Σ wᵢ·ΔWᵢ exactly.
    - "svd": forms Σ wᵢ·ΔWᵢ in float32 and keeps its best rank-`rank` approximation
      (default: the largest rᵢ); exact when `rank` reaches the sum's rank.
    - "linear": adds the factors, A = Σ √|wᵢsᵢ|·sign(wᵢ)·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ, all ranks equal.
      Cheap and rank-preserving, but cross terms mean ΔW_new equals Σ wᵢ·ΔWᵢ only for a
      single adapter or adapters that share their subspaces; prefer "cat" or "svd".
    The new adapter has scale 1 and is not activated.
    """
    state = _state(model)
    check_adapter_name(new_name)
    if new_name in state.configs:
        raise ValueError(f"the model already has an adapter named {new_name!r}")
    unknown = [n for n in weights if n not in state.configs]
    if unknown or not weights:
        raise ValueError(f"add_weighted_adapter needs existing adapters; unknown {unknown or weights}, "
                         f"the model has {sorted(state.configs)}")
    if method not in ("linear", "cat", "svd"):
        raise ValueError(f"method must be 'linear', 'cat' or 'svd', got {method!r}")
    first = state.configs[next(iter(weights))]
    ranks: dict[str, int] = {}
    for name, layer in lora_layers(model):
        present = [n for n in weights if n in layer.adapter_names]
        if not present:
            continue
        a, b = _combine(layer, {n: float(weights[n]) for n in present}, method, rank)
        layer.add_adapter(new_name, a.shape[0], float(a.shape[0]), 1.0, 0.0, True, a.dtype)
        with torch.no_grad():
            layer.A_table[new_name].copy_(a.reshape(layer.A_table[new_name].shape))
            layer.B_table[new_name].copy_(b.reshape(layer.B_table[new_name].shape))
        ranks[name] = a.shape[0]
    for _, holder in _saved_modules(model):
        src = next((n for n in weights if n in holder.modules_to_save), None)
        if src is not None:
            holder.modules_to_save[new_name] = deepcopy(holder.modules_to_save[src])
    base_r = next(iter(ranks.values()))
    pattern = {re.escape(n): r for n, r in ranks.items() if r != base_r}
    state.configs[new_name] = first.replace(
        r=base_r, lora_alpha=float(base_r), lora_dropout=0.0, use_rslora=False, init_lora_weights=True,
        rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()})
    _mark_trainable(model, state)


def _combine(layer: LoraLayer, weights: dict[str, float], method: str, rank: int | None):
    """Factors (A, B) of the combined update, A flattened to (r, fan_in), B to (out, r).

    Works in each layer's own factor layout (B·A), which for embeddings is PEFT's
    transposed one; the product structure is the same, so no case is special.
    """
    dtype = layer.A_table[next(iter(weights))].dtype
    if method == "svd":
        delta = sum(w * ops.lora_delta(layer.A_table[n], layer.B_table[n], layer.scaling[n]).flatten(1)
                    for n, w in weights.items())  # (out, fan_in), in each layer's own B·A layout
        k = rank or max(layer.r[n] for n in weights)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(k, s.numel())
        root = s[:k].sqrt()
        return (root[:, None] * vh[:k]).to(dtype), (u[:, :k] * root).to(dtype)
    parts_a, parts_b = [], []
    for n, w in weights.items():
        a = layer.A_table[n].float().flatten(1)
        b = layer.B_table[n].float().flatten(1)
        root = math.sqrt(abs(w * layer.scaling[n]))
        parts_a.append(math.copysign(root, w) * a)
        parts_b.append(root * b)
    if method == "cat":
        a, b = torch.cat(parts_a, 0), torch.cat(parts_b, 1)
    else:
        if len({p.shape for p in parts_a}) != 1:
            raise ValueError(f"method 'linear' needs equal ranks; found {[layer.r[n] for n in weights]}; use 'cat' or 'svd'")
        a, b = sum(parts_a), sum(parts_b)
    return a.to(dtype), b.to(dtype)
