"""`LoraConfig`: what to adapt and how, with Hugging Face PEFT's field names.

The config is a frozen, keyword-only dataclass. Lists given by the user are stored
as tuples so a config can be hashed and shared; `to_dict()` turns them back into the
JSON that PEFT writes to `adapter_config.json`, and `from_dict()` reads that JSON.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

BiasMode = Literal["none", "all", "lora_only"]
InitMode = Literal[True, False, "gaussian"]

# Names of the container that holds numbered transformer blocks, tried in order when
# `layers_to_transform` is set and `layers_pattern` is not (the same set PEFT tries).
COMMON_LAYER_CONTAINERS = ("layers", "h", "block", "blocks", "layer")

# PEFT writes many fields for methods lorakit does not implement. These are accepted
# when reading a PEFT file as long as they hold their "off" value.
_PEFT_OFF_FIELDS: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "layer_replication": (None, [], ()),
    "loftq_config": ({}, None),
    "megatron_config": (None,),
    "eva_config": (None,),
    "corda_config": (None,),
    "use_qalora": (False, None),
    "trainable_token_indices": (None,),
    "target_parameters": (None, [], ()),
    "arrow_config": (None,),
    "alora_invocation_tokens": (None,),
    "use_bdlora": (None, False),
    "kasa_config": (None,),
    "lora_ga_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
}


def _as_tuple(value: str | Sequence[Any] | None) -> str | tuple[Any, ...] | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """How LoRA adapts a model: ΔW = (lora_alpha / r) · B·A on each targeted layer."""

    r: int = 8
    """Rank of the update: A is r×in, B is out×r."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / √r with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout probability applied to the LoRA branch's input only, during training."""
    target_modules: str | tuple[str, ...] | None = None
    """Names or name suffixes to adapt; a regex string matched against the whole name; or "all-linear"."""
    exclude_modules: str | tuple[str, ...] | None = None
    """Modules never adapted, matched like target_modules."""
    bias: BiasMode = "none"
    """Which biases train: none, all of them, or only those of adapted layers."""
    modules_to_save: tuple[str, ...] | None = None
    """Modules (e.g. a classification head) trained in full and saved with the adapter."""
    init_lora_weights: InitMode = True
    """True: Kaiming-uniform A, zero B (ΔW = 0); "gaussian": normal A, zero B; False: random A and B."""
    use_rslora: bool = False
    """Scale by lora_alpha / √r instead of lora_alpha / r (rank-stabilised LoRA)."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict, hash=False)
    """Per-module rank overrides: {name pattern: r}."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict, hash=False)
    """Per-module alpha overrides: {name pattern: lora_alpha}."""
    layers_to_transform: int | tuple[int, ...] | None = None
    """Only adapt modules inside these numbered blocks."""
    layers_pattern: str | tuple[str, ...] | None = None
    """Name of the block container used by layers_to_transform (default: layers, h, block, ...)."""
    fan_in_fan_out: bool = False
    """Base weight stored as (in, out), as GPT-2's Conv1D does; detected automatically for Conv1D."""
    task_type: str | None = None
    """PEFT's task type (e.g. "SEQ_CLS", "CAUSAL_LM"); SEQ_CLS also trains the classifier head."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; written to adapter_config.json."""
    inference_mode: bool = False
    """Written to adapter_config.json as PEFT does; True once saved for inference."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            set_(self, name, _as_tuple(getattr(self, name)))
        if isinstance(self.modules_to_save, str):
            set_(self, "modules_to_save", (self.modules_to_save,))
        else:
            set_(self, "modules_to_save", _as_tuple(self.modules_to_save))
        if isinstance(self.layers_to_transform, Sequence):
            set_(self, "layers_to_transform", tuple(self.layers_to_transform))
        set_(self, "rank_pattern", dict(self.rank_pattern or {}))
        set_(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise ValueError(
                f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}"
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                _check_regex(name, value)
            elif value is not None and not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"LoraConfig.{name} must be a string or a list of non-empty strings, got {value!r}")
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ValueError("LoraConfig.target_modules is empty: name at least one module, or use 'all-linear'")
        if self.modules_to_save is not None and not all(isinstance(v, str) and v for v in self.modules_to_save):
            raise ValueError(f"LoraConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        for key, rank in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            if not _is_int(rank) or rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            if not _is_number(alpha) or alpha <= 0:
                raise ValueError(f"LoraConfig.alpha_pattern[{key!r}] must be a positive number, got {alpha!r}")
        layers = self.layers_to_transform
        if layers is not None:
            items = (layers,) if _is_int(layers) else layers
            if not all(_is_int(i) and i >= 0 for i in items):
                raise ValueError(f"LoraConfig.layers_to_transform must be non-negative integers, got {layers!r}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern only has an effect with layers_to_transform; set both")

    # -- per-module values -------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on `module_name` (rank_pattern first, then r)."""
        key = match_pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """lora_alpha for `module_name` (alpha_pattern first, then lora_alpha)."""
        key = match_pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scale_for(self, module_name: str) -> float:
        """The factor s in ΔW = s·B·A for `module_name`."""
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / r**0.5 if self.use_rslora else alpha / r

    # -- (de)serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, with PEFT's field names and "peft_type": "LORA"."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if isinstance(out["rank_pattern"], Mapping):
            out["rank_pattern"] = dict(out["rank_pattern"])
            out["alpha_pattern"] = dict(out["alpha_pattern"])
        out["peft_type"] = "LORA"
        out["lora_bias"] = False
        out["use_dora"] = False
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> LoraConfig:
        """Read a lorakit or PEFT adapter_config.json; reject other PEFT methods and unsupported options."""
        peft_type = data.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"{source}: expected a LoRA adapter (peft_type 'LORA'), found peft_type {peft_type!r}")
        for key, off_values in _PEFT_OFF_FIELDS.items():
            if key in data and data[key] not in off_values:
                raise ValueError(
                    f"{source}: the adapter uses {key}={data[key]!r}, which lorakit does not support "
                    f"(expected one of {list(off_values)!r})"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def match_pattern_key(patterns: Mapping[str, Any], module_name: str) -> str | None:
    """The first key of `patterns` that matches the end of `module_name` at a dot boundary."""
    for key in patterns:
        if re.match(rf"(?:.*\.)?(?:{key})$", module_name):
            return key
    return None


def _check_regex(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"LoraConfig.{field_name}: {pattern!r} is not a valid regular expression ({exc})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
