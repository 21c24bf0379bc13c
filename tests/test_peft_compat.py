"""Golden tests against Hugging Face PEFT: files written by one load in the other.

For each model, with the same frozen base weights:
- lorakit → PEFT: an adapter trained (randomised) and saved by lorakit loads in
  `peft.PeftModel.from_pretrained` and gives the same logits;
- PEFT → lorakit: an adapter made by `peft.get_peft_model` and saved with
  `save_pretrained` loads with `lorakit.load_adapter` and gives the same logits;
- both libraries write the same tensor keys for the same config.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import (
    LLAMA_TARGETS,
    input_ids,
    tiny_bert_seq_cls,
    tiny_gpt2,
    tiny_llama_causal,
    tiny_llama_seq_cls,
)

import lorakit

peft = pytest.importorskip("peft")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}

CASES = {
    "llama-causal-7proj": (tiny_llama_causal, dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)),
    "llama-seqcls-score-saved": (tiny_llama_seq_cls, dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                          task_type="SEQ_CLS")),
    "bert-seqcls-classifier": (tiny_bert_seq_cls, dict(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"])),
    "bert-bias-rank-pattern": (tiny_bert_seq_cls, dict(r=4, lora_alpha=8, target_modules=["query", "key", "dense"],
                                                      bias="lora_only", rank_pattern={"key": 2},
                                                      alpha_pattern={"dense": 2}, use_rslora=True)),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                    fan_in_fan_out=True)),
    "llama-embedding": (tiny_llama_causal, dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])),
}
DTYPES = [torch.float32, torch.bfloat16]


def randomise(model, seed=5):
    """Give every trainable tensor (adapters, saved heads, biases) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_adapter_loads_in_peft(case, dtype, tmp_path):
    make, cfg = CASES[case]
    base = make().to(dtype)
    ids = input_ids()
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**cfg))
    randomise(model)
    expected = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), expected, **TOL[dtype])
    assert not torch.allclose(logits(base, ids), expected, **TOL[dtype])  # the adapter does something


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_lorakit(case, dtype, tmp_path):
    make, cfg = CASES[case]
    base = make().to(dtype)
    ids = input_ids()
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    randomise(peft_model)
    peft_model.eval()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(model, ids), expected, **TOL[dtype])
    assert not torch.allclose(logits(base, ids), expected, **TOL[dtype])


@pytest.mark.parametrize("case", list(CASES))
def test_same_keys_and_config_fields(case, tmp_path):
    make, cfg = CASES[case]
    lorakit.save_adapter(lorakit.inject(make(), lorakit.LoraConfig(**cfg)), tmp_path / "lk")
    peft.get_peft_model(make(), peft.LoraConfig(**cfg)).save_pretrained(tmp_path / "peft")
    lk = load_file(tmp_path / "lk" / "adapter_model.safetensors")
    pf = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # PEFT also stores the base embedding table when an embedding is adapted; lorakit leaves base weights alone.
    pf_keys = {k for k in pf if not k.endswith("embed_tokens.base_layer.weight")}
    assert set(lk) == pf_keys
    assert all(lk[k].shape == pf[k].shape for k in lk)
    lk_cfg = json.loads((tmp_path / "lk" / "adapter_config.json").read_text())
    pf_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(lk_cfg) <= set(pf_cfg)  # every field lorakit writes is one PEFT knows
    for field in ("r", "lora_alpha", "bias", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type", "task_type"):
        assert lk_cfg[field] == pf_cfg[field], field
    assert sorted(lk_cfg["target_modules"]) == sorted(pf_cfg["target_modules"])
    assert sorted(lk_cfg["modules_to_save"] or []) == sorted(pf_cfg["modules_to_save"] or [])
