"""Injection, target matching and adapter management on tiny transformers models."""

import pytest
import torch
from tiny_models import (
    LLAMA_TARGETS,
    input_ids,
    tiny_bert_seq_cls,
    tiny_gpt2,
    tiny_llama_causal,
    tiny_llama_seq_cls,
)
from torch import nn

import lorakit
from lorakit import LoraConfig, LoraLayer


def names_of(model):
    return sorted(n for n, _ in lorakit.lora_layers(model))


def test_targets_by_suffix_regex_and_all_linear():
    m = lorakit.inject(tiny_llama_causal(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert names_of(m) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    m = lorakit.inject(tiny_llama_causal(), LoraConfig(target_modules=r"model\.layers\.1\.mlp\.(up|down)_proj"))
    assert names_of(m) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    m = lorakit.inject(tiny_llama_causal(), LoraConfig(target_modules="all-linear"))
    assert len(names_of(m)) == 14 and "lm_head" not in names_of(m)


def test_exclude_and_layers_to_transform():
    m = lorakit.inject(tiny_llama_causal(), LoraConfig(target_modules=LLAMA_TARGETS, exclude_modules=["down_proj"],
                                                       layers_to_transform=[1]))
    assert names_of(m) == sorted(f"model.layers.1.{p}" for p in
                                 ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj"])


def test_a_target_that_matches_nothing_lists_what_it_could_have_meant():
    with pytest.raises(ValueError) as err:
        lorakit.inject(tiny_llama_causal(), LoraConfig(target_modules=["q_prj", "v_proj"]))
    msg = str(err.value)
    assert "['q_prj']" in msg and "q_proj" in msg and "Did you mean" in msg and "gate_proj" in msg


def test_a_target_of_an_unsupported_type_is_refused():
    with pytest.raises(ValueError, match="LlamaAttention"):
        lorakit.inject(tiny_llama_causal(), LoraConfig(target_modules=["self_attn"]))


def test_failed_inject_leaves_the_model_untouched():
    model = tiny_llama_causal()
    before = repr(model)
    with pytest.raises(ValueError):
        lorakit.inject(model, LoraConfig(target_modules=["q_proj", "nope"]))
    assert repr(model) == before and lorakit.list_adapters(model) == []


def test_freezing_and_modules_to_save():
    m = lorakit.inject(tiny_llama_seq_cls(), LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert all(".lora_" in n or n.startswith("score.modules_to_save.default.") for n in trainable)
    assert "score.modules_to_save.default.weight" in trainable
    assert not m.score.original_module.weight.requires_grad


def test_frozen_lm_head_on_sliced_hidden_states_runs_one_gemm():
    # With its weight frozen, torch would run the head on hidden_states[:, -1:, :] as a
    # batched GEMM over one copy of the weight per row; injection keeps the single GEMM.
    model = tiny_llama_causal().eval()
    ids = input_ids()
    with torch.no_grad():
        want = model(input_ids=ids, logits_to_keep=1).logits

    head_shape = [model.lm_head.in_features, model.lm_head.out_features]

    def head_runs_batched():
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            got = model(input_ids=ids, logits_to_keep=1).logits
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        return any(e.name == "aten::bmm" and list(e.input_shapes[1][-2:]) == head_shape for e in prof.events())

    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert not model.lm_head.weight.requires_grad and not head_runs_batched()
    lorakit.unload(model)
    assert not model.lm_head._forward_pre_hooks
    model.requires_grad_(False)  # the same frozen model without the guard: the batched route
    assert head_runs_batched()


def test_injected_layers_keep_the_model_s_eval_mode():
    # A model put in eval mode before injection must not train-mode its new layers: dropout
    # would then apply at inference. Here dropout 0.5 would change the output if it did.
    model = tiny_llama_seq_cls().eval()
    ids = input_ids()
    lorakit.inject(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=0.5, task_type="SEQ_CLS",
                                     init_lora_weights=False))
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        first, second = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(first, second)
    assert all(m.training for m in model.train().modules())


@pytest.mark.parametrize("mode,expected", [("none", 0), ("lora_only", 4), ("all", None)])
def test_bias_modes(mode, expected):
    m = lorakit.inject(tiny_bert_seq_cls(), LoraConfig(r=2, target_modules=["query", "value"], bias=mode))
    trainable_biases = [n for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias")]
    if expected is None:
        assert len(trainable_biases) == sum(1 for n, _ in m.named_parameters() if n.endswith("bias"))
    else:
        assert len(trainable_biases) == expected


def test_rank_and_alpha_patterns_shape_the_layers():
    m = lorakit.inject(tiny_llama_causal(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 2}))
    attn = m.model.layers[0].self_attn
    assert attn.v_proj.lora_A["default"].shape == (2, 32) and attn.v_proj.scaling["default"] == 4.0
    assert attn.q_proj.lora_A["default"].shape == (4, 32) and attn.q_proj.scaling["default"] == 0.5


def test_gpt2_conv1d_targets_and_merge():
    m = lorakit.inject(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    layer = m.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.lora_A["default"].shape == (4, 32) and layer.lora_B["default"].shape == (96, 4)
    ids = input_ids()
    out = m(ids).logits
    lorakit.merge(m)
    torch.testing.assert_close(m(ids).logits, out, rtol=1e-4, atol=1e-4)


def test_set_adapter_copies_no_weights_and_switches():
    m = tiny_llama_causal()
    ids = input_ids()
    lorakit.inject(m, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lorakit.inject(m, LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "b")
    assert lorakit.list_adapters(m) == ["a", "b"] and lorakit.active_adapters(m) == ["a"]
    ptrs = {n: p.data_ptr() for n, p in m.named_parameters()}
    out_a = m(ids).logits
    lorakit.set_adapter(m, "b")
    assert {n: p.data_ptr() for n, p in m.named_parameters()} == ptrs
    assert not torch.equal(m(ids).logits, out_a)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)
    with pytest.raises(ValueError, match="no adapter named"):
        lorakit.set_adapter(m, "c")


def test_delete_adapter_frees_and_unwraps():
    m = tiny_llama_causal()
    base = m(input_ids()).logits
    lorakit.inject(m, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.inject(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "b")
    lorakit.delete_adapter(m, "b")
    assert isinstance(m.model.layers[0].self_attn.q_proj, LoraLayer)
    assert isinstance(m.model.layers[0].self_attn.v_proj, nn.Linear)  # only "b" had it: unwrapped
    assert lorakit.list_adapters(m) == ["a"]
    lorakit.delete_adapter(m, "a")
    assert not list(lorakit.lora_layers(m)) and lorakit.list_adapters(m) == []
    assert torch.equal(m(input_ids()).logits, base)


def test_merged_models_refuse_switching_disabling_and_deleting():
    m = tiny_llama_causal()
    lorakit.inject(m, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "a")
    lorakit.inject(m, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "b")
    lorakit.merge(m)
    with pytest.raises(ValueError, match="unmerge"):
        lorakit.set_adapter(m, "b")
    with pytest.raises(ValueError, match="unmerge"):
        with lorakit.disable_adapters(m):
            pass
    with pytest.raises(ValueError, match="unmerge"):
        lorakit.delete_adapter(m, "a")
    lorakit.unmerge(m)
    lorakit.set_adapter(m, "b")


def test_unload_returns_the_plain_model():
    m = tiny_llama_seq_cls()
    ids = input_ids()
    lorakit.inject(m, LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False, task_type="SEQ_CLS"))
    with torch.no_grad():
        m.score.modules_to_save["default"].weight.normal_()
    out = m(ids).logits
    plain = lorakit.unload(m, merge=True)
    assert not any(isinstance(x, (LoraLayer, lorakit.ModulesToSave)) for x in plain.modules())
    torch.testing.assert_close(plain(ids).logits, out, rtol=1e-5, atol=1e-5)
    base = tiny_llama_seq_cls()
    m2 = lorakit.inject(tiny_llama_seq_cls(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    plain2 = lorakit.unload(m2, merge=False)
    assert torch.equal(plain2(ids).logits, base(ids).logits)


def test_count_parameters_and_summary():
    m = tiny_llama_causal()
    total = sum(p.numel() for p in m.parameters())
    lorakit.inject(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    count = lorakit.count_parameters(m)
    lora = 2 * (4 * (32 + 32) + 4 * (32 + 16))  # per layer: q 32->32, v 32->16 (2 KV heads × 8)
    assert count.trainable == lora and count.total == total + lora
    assert count.summary() == f"Trainable parameters: {lora:,} ({100 * lora / (total + lora):.2f}%) of {total + lora:,}"


def test_count_parameters_on_the_meta_device():
    with torch.device("meta"):
        m = tiny_llama_causal()
    lorakit.inject(m, LoraConfig(r=4, target_modules=["q_proj"]))
    assert lorakit.count_parameters(m).trainable == 2 * 4 * (32 + 32)


@pytest.mark.parametrize("name", ["a/b", "..", "", "a.b", "with space"])
def test_adapter_names_are_checked(name):
    with pytest.raises(ValueError, match="adapter name"):
        lorakit.inject(tiny_llama_causal(), LoraConfig(target_modules=["q_proj"]), name)


def test_add_weighted_adapter_methods():
    m = tiny_llama_causal()
    ids = input_ids()
    lorakit.inject(m, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    lorakit.inject(m, LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj"], init_lora_weights=False), "b")

    def delta(name, path="model.layers.0.self_attn.q_proj"):
        return m.get_submodule(path).delta_weight(name)

    target = 0.7 * delta("a") - 0.4 * delta("b")
    lorakit.add_weighted_adapter(m, {"a": 0.7, "b": -0.4}, "cat", method="cat")
    torch.testing.assert_close(delta("cat"), target, rtol=1e-5, atol=1e-6)
    assert m.model.layers[0].self_attn.q_proj.r["cat"] == 5
    lorakit.add_weighted_adapter(m, {"a": 0.7, "b": -0.4}, "svd", method="svd", rank=5)
    torch.testing.assert_close(delta("svd"), target, rtol=1e-4, atol=1e-5)
    lorakit.add_weighted_adapter(m, {"a": 0.3}, "lin", method="linear")
    torch.testing.assert_close(delta("lin"), 0.3 * delta("a"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta("lin", "model.layers.1.self_attn.v_proj"),
                               0.3 * delta("a", "model.layers.1.self_attn.v_proj"), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="equal ranks"):
        lorakit.add_weighted_adapter(m, {"a": 1.0, "b": 1.0}, "bad", method="linear")
    assert "bad" not in lorakit.list_adapters(m)
    # the combined adapter runs like any other
    lorakit.set_adapter(m, "cat")
    m(ids)


def test_add_weighted_adapter_saves_and_reloads_with_rank_pattern(tmp_path):
    m = tiny_llama_causal()
    ids = input_ids()
    lorakit.inject(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    lorakit.inject(m, LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights=False), "b")
    lorakit.add_weighted_adapter(m, {"a": 1.0, "b": 1.0}, "ab", method="cat")
    lorakit.set_adapter(m, "ab")
    out = m(ids).logits
    lorakit.save_adapter(m, tmp_path, "ab")
    fresh = lorakit.load_adapter(tiny_llama_causal(), tmp_path)
    torch.testing.assert_close(fresh(ids).logits, out, rtol=1e-5, atol=1e-5)
