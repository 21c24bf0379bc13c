"""Adapter files: round trips, bad files that leave the model untouched, and nothing unpickled."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import LLAMA_TARGETS, input_ids, llama_config, tiny_llama_causal

import lorakit
from lorakit import LoraConfig


def trained_adapter(tmp_path, **cfg):
    model = tiny_llama_causal()
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    kw.update(cfg)
    lorakit.inject(model, LoraConfig(**kw))
    path = tmp_path / "adapter"
    lorakit.save_adapter(model, path)
    return model, path


def snapshot(model):
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}, lorakit.list_adapters(model)


def assert_untouched(model, snap):
    text, state, adapters = snap
    assert repr(model) == text
    assert lorakit.list_adapters(model) == adapters
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_files_and_keys(tmp_path):
    _, path = trained_adapter(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = sorted(load_file(path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert len(keys) == 8
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]


def test_load_into_a_model_that_already_has_adapters(tmp_path):
    trained, path = trained_adapter(tmp_path)
    ids = input_ids()
    model = tiny_llama_causal()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "other")
    other_out = model(ids).logits
    lorakit.load_adapter(model, path, "loaded")
    assert lorakit.list_adapters(model) == ["other", "loaded"]
    assert torch.equal(model(ids).logits, other_out)
    lorakit.set_adapter(model, "loaded")
    torch.testing.assert_close(model(ids).logits, trained(ids).logits, rtol=0, atol=0)


def corrupt(path):
    (path / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)


def other_method(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def wrong_rank(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 2
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def drop_key(path):
    tensors = load_file(path / "adapter_model.safetensors")
    tensors.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(tensors, path / "adapter_model.safetensors")


def extra_key(path):
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path / "adapter_model.safetensors")


def missing_weights(path):
    (path / "adapter_model.safetensors").unlink()


def pickled_weights(path):
    (path / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")


def bad_json(path):
    (path / "adapter_config.json").write_text("{not json")


def missing_config(path):
    (path / "adapter_config.json").unlink()


def int_tensor(path):
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, path / "adapter_model.safetensors")


BAD = [
    (corrupt, ValueError, "not a readable safetensors file"),
    (other_method, ValueError, "found peft_type 'IA3'"),
    (wrong_rank, ValueError, r"model.layers.0.self_attn.q_proj.lora_A.weight has shape \(4, 32\) in the file, but the model needs \(2, 32\)"),
    (drop_key, ValueError, "1 missing key"),
    (extra_key, ValueError, "1 unexpected key"),
    (missing_weights, FileNotFoundError, "adapter_model.safetensors is missing"),
    (pickled_weights, FileNotFoundError, "never pickled"),
    (bad_json, ValueError, "not valid JSON"),
    (missing_config, FileNotFoundError, "adapter_config.json is missing"),
    (int_tensor, ValueError, "dtype torch.int32"),
]


@pytest.mark.parametrize("damage,exc,message", BAD, ids=[b[0].__name__ for b in BAD])
@pytest.mark.parametrize("existing", [False, True], ids=["bare", "with-adapter"])
def test_bad_files_raise_and_leave_the_model_exactly_as_it_was(tmp_path, damage, exc, message, existing):
    _, path = trained_adapter(tmp_path)
    damage(path)
    model = tiny_llama_causal()
    if existing:
        lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False), "keep")
    snap = snapshot(model)
    with pytest.raises(exc, match=message):
        lorakit.load_adapter(model, path, "new")
    assert_untouched(model, snap)


def test_shape_mismatch_from_another_model_names_module_and_shapes(tmp_path):
    _, path = trained_adapter(tmp_path)
    from transformers import LlamaForCausalLM

    bigger = LlamaForCausalLM(llama_config(hidden_size=48, num_attention_heads=4))
    snap = snapshot(bigger)
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 32\) in the file, but the model needs \(4, 48\)"):
        lorakit.load_adapter(bigger, path)
    assert_untouched(bigger, snap)


def test_missing_directory_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lorakit.load_adapter(tiny_llama_causal(), tmp_path / "nope")
    _, path = trained_adapter(tmp_path)
    for name in ["../x", "a/b", "a\\b"]:
        with pytest.raises(ValueError, match="adapter name"):
            lorakit.load_adapter(tiny_llama_causal(), path, name)
        with pytest.raises(ValueError, match="adapter name"):
            lorakit.save_adapter(tiny_llama_causal(), tmp_path / "out", name)


def test_a_name_already_taken_is_refused(tmp_path):
    model, path = trained_adapter(tmp_path)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lorakit.load_adapter(model, path)
    assert_untouched(model, snap)


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/lorakit-unpickled-marker", "w"))


def test_a_pickle_is_never_unpickled(tmp_path):
    import os

    marker = "/tmp/lorakit-unpickled-marker"
    if os.path.exists(marker):
        os.remove(marker)
    _, path = trained_adapter(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(pickle.dumps({"w": _Exploit()}))
    with pytest.raises(ValueError):
        lorakit.load_adapter(tiny_llama_causal(), path)
    assert not os.path.exists(marker)


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    model, path = trained_adapter(tmp_path)
    before = (path / "adapter_model.safetensors").read_bytes()
    import lorakit.checkpoint as ckpt

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_all_seven_projections_round_trip_in_bf16(tmp_path):
    model = tiny_llama_causal().to(torch.bfloat16)
    lorakit.inject(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    ids = input_ids()
    out = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    fresh = lorakit.load_adapter(tiny_llama_causal().to(torch.bfloat16), tmp_path)
    assert torch.equal(fresh(ids).logits, out)
