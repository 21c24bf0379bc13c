"""LoraConfig: validation messages name the field; PEFT JSON round trips."""

import pytest

from lorakit import LoraConfig


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "r"),
    (dict(r=2.5), "r"),
    (dict(lora_alpha=-1), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(bias="some"), "bias"),
    (dict(init_lora_weights="uniform"), "init_lora_weights"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules="(unclosed"), "target_modules"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": "big"}), "alpha_pattern"),
    (dict(layers_to_transform=[-1]), "layers_to_transform"),
    (dict(layers_pattern="layers"), "layers_pattern"),
])
def test_bad_values_fail_at_construction_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraConfig\.{field}"):
        LoraConfig(**kwargs)


def test_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        LoraConfig(8)  # noqa
    cfg = LoraConfig(target_modules=["q_proj"])
    with pytest.raises(AttributeError):
        cfg.r = 4  # noqa


def test_lists_are_stored_as_tuples_and_written_back_as_lists():
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"], layers_to_transform=[0, 1])
    assert cfg.target_modules == ("q_proj", "v_proj")
    hash(cfg)
    d = cfg.to_dict()
    assert d["target_modules"] == ["q_proj", "v_proj"] and d["peft_type"] == "LORA"
    assert LoraConfig.from_dict(d) == cfg


def test_scales_and_patterns():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\..*q_proj": 64},
                     target_modules=["q_proj", "v_proj"])
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert cfg.scale_for("model.layers.0.self_attn.q_proj") == 2.0
    assert cfg.scale_for("model.layers.1.self_attn.q_proj") == 8.0
    assert cfg.scale_for("model.layers.0.self_attn.v_proj") == 4.0
    rs = LoraConfig(r=16, lora_alpha=32, use_rslora=True)
    assert rs.scale_for("x") == 32 / 4


def test_from_dict_rejects_other_methods_and_unsupported_options():
    with pytest.raises(ValueError, match="found peft_type 'IA3'"):
        LoraConfig.from_dict({"peft_type": "IA3", "target_modules": ["k"]})
    with pytest.raises(ValueError, match="use_dora=True"):
        LoraConfig.from_dict({"peft_type": "LORA", "use_dora": True, "target_modules": ["k"]})
    with pytest.raises(ValueError, match="adapter_config.json: LoraConfig.r"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": -3}, source="adapter_config.json")


def test_from_dict_ignores_peft_bookkeeping_fields():
    cfg = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q"], "revision": None,
                                "peft_version": "0.21.2", "auto_mapping": None, "use_dora": False})
    assert cfg.r == 4
