"""Adapter files in Hugging Face PEFT's format.

A directory holds `adapter_config.json` (LoraConfig with PEFT's field names and
"peft_type": "LORA") and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`
(`.lora_embedding_A` / `.lora_embedding_B` for embeddings) and, for modules trained in
full, `base_model.model.<module path>.<parameter>`. Only safetensors are read, so
loading never unpickles anything. Loading checks the whole file against the model
before touching it: a bad file raises and leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import (
    _state,
    check_adapter_name,
    delete_adapter,
    effective_modules_to_save,
    find_targets,
    has_adapters,
    inject,
    lora_layers,
)
from lorakit.layers import LoraEmbedding, LoraLayer, ModulesToSave, wrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


# -- the key layout ----------------------------------------------------------------------


def _lora_keys(path: str, layer_type: type[LoraLayer]) -> tuple[str, str]:
    if issubclass(layer_type, LoraEmbedding):
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def _bias_params(model: nn.Module, config: LoraConfig, adapted: set[str]) -> dict[str, nn.Parameter]:
    """Biases saved with the adapter: all of them, or those of adapted layers (by file key)."""
    if config.bias == "none":
        return {}
    out = {}
    for name, p in model.named_parameters():
        if not name.endswith("bias") or ".modules_to_save." in name or ".original_module." in name:
            continue  # biases of fully trained modules are saved with those modules
        owner = name.removesuffix(".bias").removesuffix(".base_layer")
        if config.bias == "all" or owner in adapted:
            # PEFT names an adapted layer's bias after its wrapped base layer.
            suffix = ".base_layer.bias" if owner in adapted else ".bias"
            out[PREFIX + owner + suffix] = p
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys (views of the live parameters)."""
    state = _state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {sorted(state.configs)}")
    config = state.configs[adapter_name]
    out: dict[str, torch.Tensor] = {}
    adapted = set()
    for path, layer in lora_layers(model):
        if adapter_name in layer.adapter_names:
            ka, kb = _lora_keys(path, type(layer))
            out[ka], out[kb] = layer.adapter_params(adapter_name)
            adapted.add(path)
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = value
    out.update(_bias_params(model, config, adapted))
    return out


def atomic_write(path: Path, write) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it to `path`: an interrupted
    write never leaves a partial file under the final name (and the temporary one is removed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter as `adapter_config.json` + `adapter_model.safetensors` (PEFT's format).

    `tensors` (PEFT's keys, as adapter_state_dict gives them) are written instead of the
    model's own when given: the full tensors gathered from a model whose parameters are
    FSDP2 shards. Each file is written to a temporary name and renamed, so an
    interrupted save never leaves a half-written file under the final name. Returns the
    directory.
    """
    check_adapter_name(adapter_name)
    own = adapter_state_dict(model, adapter_name)
    if tensors is None:
        tensors = own
    elif tensors.keys() != own.keys():
        differ = sorted(tensors.keys() ^ own.keys())
        raise ValueError(f"the tensors to save do not match adapter {adapter_name!r}'s keys: "
                         f"{len(differ)} differ, e.g. {differ[:3]}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    config = _state(model).configs[adapter_name]
    data = config.to_dict()
    data["modules_to_save"] = list(effective_modules_to_save(config)) or None
    if data.get("base_model_name_or_path") is None:
        data["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


# -- loading -------------------------------------------------------------------------------


def read_config(directory: str | os.PathLike) -> LoraConfig:
    """The LoraConfig stored in an adapter directory (lorakit's or PEFT's)."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    return LoraConfig.from_dict(read_json_object(path), source=str(path))


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold one object, with an error naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_model.safetensors`, read without unpickling anything."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        others = [p.name for p in Path(directory).glob("adapter_model.*")]
        hint = f" (found {others}; lorakit reads only safetensors, never pickled files)" if others else ""
        raise FileNotFoundError(f"{path} is missing{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None


def _expected(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """File key -> shape for everything an adapter of `config` has in `model`."""
    expected: dict[str, tuple[int, ...]] = {}
    adapted = set()
    for path, module in find_targets(model, config):
        layer = module if isinstance(module, LoraLayer) else wrap(module)  # a shape probe; the model is untouched
        a_shape, b_shape = layer.adapter_shapes(config.rank_for(path))
        ka, kb = _lora_keys(path, type(layer))
        expected[ka], expected[kb] = tuple(a_shape), tuple(b_shape)
        adapted.add(path)
    saved = effective_modules_to_save(config)
    for path, module in model.named_modules():
        if not path or not any(path == s or path.endswith("." + s) for s in saved):
            continue
        if isinstance(module, ModulesToSave):
            module = module.original_module
        for key, value in module.state_dict().items():
            expected[f"{PREFIX}{path}.{key}"] = tuple(value.shape)
    for key, p in _bias_params(model, config, adapted).items():
        expected[key] = tuple(p.shape)
    return expected


def _embedding_base_keys(model: nn.Module, config: LoraConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """PEFT also saves the base table of adapted embeddings: key -> (model path, shape)."""
    out = {}
    for path, module in find_targets(model, config):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(base, nn.Embedding):
            out[f"{PREFIX}{path}.base_layer.weight"] = (path, tuple(base.weight.shape))
    return out


def _check(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
           embedding_bases: dict, source: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(embedding_bases))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise ValueError(f"{source} does not fit this model: " + "; ".join(parts))
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            module = key.removeprefix(PREFIX)
            raise ValueError(f"{source}: {module} has shape {tuple(tensors[key].shape)} in the file, "
                             f"but the model needs {shape}")
    for key, (path, shape) in embedding_bases.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise ValueError(f"{source}: the base embedding {path} has shape {tuple(tensors[key].shape)} "
                             f"in the file, but the model's is {shape}")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: {key} has dtype {tensor.dtype}; adapter tensors are floating point")


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 *, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a lorakit or PEFT adapter directory into `model` as `adapter_name`.

    Injects the LoRA layers if the model has none for this adapter. Everything is
    checked first (config, keys, shapes, dtypes); a bad file raises ValueError or
    FileNotFoundError and leaves the model exactly as it was. Returns `model`.
    """
    check_adapter_name(adapter_name)
    config = read_config(directory)
    if has_adapters(model) and adapter_name in _state(model).configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; "
                         "load under another name or delete_adapter it first")
    tensors = read_tensors(directory)
    source = str(Path(directory) / WEIGHTS_NAME)
    expected = _expected(model, config)
    embedding_bases = _embedding_base_keys(model, config)
    _check(tensors, expected, embedding_bases, source)
    try:
        inject(model, config, adapter_name, adapter_dtype=adapter_dtype)
        with torch.no_grad():
            live = adapter_state_dict(model, adapter_name)
            for key, target in live.items():
                target.copy_(tensors[key])
            for key, (path, _) in embedding_bases.items():
                if key in tensors:
                    model.get_submodule(path).base_layer.weight.copy_(tensors[key])
    except BaseException:
        if has_adapters(model) and adapter_name in _state(model).configs:
            delete_adapter(model, adapter_name)
        raise
    return model
