"""`lorakit params` reproduces the primer's parameter figures from configs alone."""

import argparse
import json
from pathlib import Path

import pytest

from lorakit import params

GOLDEN = Path(__file__).parent / "golden"
LLAMA_1B = GOLDEN / "llama-3.2-1b-config.json"
LLAMA_7B = GOLDEN / "llama-7b-style-config.json"


def report(path, **kw):
    num_labels = kw.pop("num_labels", None)
    return params.account(params.load_config(path, num_labels), **kw)


def test_llama_3_2_1b_lora_r16_seven_projections_with_a_two_class_head():
    r = report(LLAMA_1B, num_labels=2, task="seq-cls", r=16)
    assert r.lora_params == 11_272_192
    assert r.base_params == 1_235_818_496  # bias-free score head: 2048 × 2
    assert r.trainable_params == 11_276_288  # LoRA + the head
    assert r.total_params == 1_235_818_496 + 11_272_192
    assert r.lora_per_module_type["q_proj"] == {"modules": 16, "each": 65_536, "total": 1_048_576}
    assert r.lora_per_module_type["k_proj"]["each"] == 16 * (2048 + 512)
    assert r.lora_per_module_type["down_proj"]["each"] == 16 * (8192 + 2048)


def test_llama_3_2_1b_first_12_blocks_frozen_and_full():
    r = report(LLAMA_1B, num_labels=2, task="seq-cls", method="freeze-first:12")
    assert r.trainable_params == 505_960_448 and r.total_params == 1_235_818_496
    assert f"{r.trainable_percent:.1f}" == "40.9"
    full = report(LLAMA_1B, num_labels=2, task="seq-cls", method="full")
    assert full.trainable_params == full.total_params == 1_235_818_496


def test_llama_7b_style_rank_8_on_100_square_layers():
    # 25 blocks × q, k, v, o = 100 layers of 4096 × 4096
    r = report(LLAMA_7B, task="causal-lm", r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               layers_to_transform=list(range(25)))
    assert all(row["each"] == 65_536 for row in r.lora_per_module_type.values())
    assert sum(row["modules"] for row in r.lora_per_module_type.values()) == 100
    assert r.lora_params == 6_553_600
    assert r.base_params == 6_738_415_616  # LLaMA-7B's own count
    assert round(r.trainable_percent, 2) == 0.10


def run_cli(argv, tmp_path):
    parser = argparse.ArgumentParser()
    params.add_arguments(parser)
    out = tmp_path / "report.json"
    assert params.run(parser.parse_args([*argv, "--json", str(out)])) == 0
    return json.loads(out.read_text())


def test_command_line_and_json(tmp_path, capsys):
    data = run_cli([str(LLAMA_1B), "--num-labels", "2"], tmp_path)
    printed = capsys.readouterr().out
    assert "Trainable parameters: 11,276,288 (0.90%)" in printed
    assert "LoRA parameters" in printed and "11,272,192" in printed
    assert data["trainable_params"] == 11_276_288 and data["lora_params"] == 11_272_192


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        params.load_config(tmp_path / "missing.json", None)
    with pytest.raises(ValueError, match="freeze-first:N"):
        params.parse_method("freeze-first:x")
    with pytest.raises(ValueError, match="more blocks than the model has"):
        report(LLAMA_1B, num_labels=2, task="seq-cls", method="freeze-first:40")
    with pytest.raises(ValueError, match="--layers"):
        params.parse_layers("a-b")
    assert params.parse_layers("0-2,5") == [0, 1, 2, 5]
