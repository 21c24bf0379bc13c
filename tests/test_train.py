"""The training loop (lorakit.train) on tiny models: schedule, accumulation, methods, run
directory, divergence, Ctrl-C and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import cli, train
from lorakit.train import TrainConfig, lr_at

SUMMARY_KEYS = {"method", "trainable_params", "total_params", "trainable_percent", "val_accuracy", "test_accuracy",
                "peak_memory_bytes", "tokens_per_second", "wall_seconds"}


def tiny_config(model_dir: Path, files: dict[str, Path], out: Path, **changes) -> TrainConfig:
    values = dict(model=str(model_dir), task="seq-cls", train_file=str(files["train"]),
                  validation_file=str(files["validation"]), test_file=str(files["test"]), labels=["ham", "spam"],
                  max_length=32, batch_size=8, lr=1e-2, warmup_ratio=0.0, r=4, lora_alpha=8,
                  target_modules=["query", "value"], checkpoint_every=100, eval_batch_size=16, out=str(out),
                  precision="fp32", threads=1)  # one thread: tiny tensors gain nothing from two
    values.update(changes)
    return TrainConfig(**values)


def adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def fresh_model(config: TrainConfig):
    torch.manual_seed(config.seed)  # the same head initialisation as the run's
    model, _ = train.load_model(config)
    return model


# -- the schedule -----------------------------------------------------------------------------


def test_warmup_then_linear_decay():
    c = TrainConfig(lr=1.0, warmup_steps=4, schedule="linear")
    lrs = [lr_at(s, 20, c) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # warmup reaches the full rate on its last step
    decay = lrs[4:]
    assert decay[0] == 1.0
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert all(abs((a - b) - 1 / 16) < 1e-12 for a, b in zip(decay, decay[1:]))  # a straight line
    assert lrs[-1] == pytest.approx(1 / 16)


def test_warmup_then_cosine_decay():
    c = TrainConfig(lr=2.0, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, c) for s in range(100)]
    assert lrs[9] == 2.0 and lrs[0] == pytest.approx(0.2)
    assert lrs[10 + 45] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway through the decay
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] > 0.2 - 1e-9  # never below min_lr_ratio · lr


def test_constant_schedule():
    c = TrainConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, 10, c) for s in range(10)} == {0.5}


# -- what trains --------------------------------------------------------------------------------


def test_gradient_accumulation_matches_one_large_batch(tmp_path, tiny_bert_dir, spam_files):
    big = train.run(tiny_config(tiny_bert_dir, spam_files, tmp_path / "a", batch_size=8, grad_accum=1))
    accum = train.run(tiny_config(tiny_bert_dir, spam_files, tmp_path / "b", batch_size=4, grad_accum=2))
    small = train.run(tiny_config(tiny_bert_dir, spam_files, tmp_path / "c", batch_size=4, grad_accum=1, max_steps=6))
    assert big.summary["steps"] == accum.summary["steps"] == 6
    a, b, c = (adapter_tensors(r.run_dir) for r in (big, accum, small))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(c[k], a[k], atol=1e-4) for k in a)  # the comparison can tell runs apart


def test_lora_changes_only_trainable_parameters(tmp_path, tiny_bert_dir, spam_files):
    config = tiny_config(tiny_bert_dir, spam_files, tmp_path / "run")
    result = train.run(config)
    before = dict(fresh_model(config).named_parameters())
    trained = dict(result.model.named_parameters())
    frozen = {n: p for n, p in trained.items() if not p.requires_grad}
    assert frozen and len(frozen) < len(trained)
    for name, p in frozen.items():
        original = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        assert torch.equal(p.cpu(), before[original]), name
    lora_b = [p for n, p in trained.items() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained
    head = result.model.classifier
    assert not torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)


def test_freeze_first_freezes_exactly_n_blocks(tmp_path, tiny_bert_dir, spam_files):
    config = tiny_config(tiny_bert_dir, spam_files, tmp_path / "run", method="freeze-first:1", lr=1e-3, max_steps=3)
    result = train.run(config)
    before = dict(fresh_model(config).named_parameters())
    for name, p in result.model.named_parameters():
        in_first_block = name.startswith("bert.encoder.layer.0.")
        assert p.requires_grad is not in_first_block, name
        assert torch.equal(p, before[name]) is in_first_block, name  # frozen stay, everything else moved
    assert (result.run_dir / "model" / "config.json").is_file()
    assert not (result.run_dir / "adapter").exists()


def test_full_trains_everything(tmp_path, tiny_bert_dir, spam_files):
    config = tiny_config(tiny_bert_dir, spam_files, tmp_path / "run", method="full", lr=1e-3, max_steps=3)
    result = train.run(config)
    assert result.summary["trainable_params"] == result.summary["total_params"]
    before = dict(fresh_model(config).named_parameters())
    for name, p in result.model.named_parameters():
        assert p.requires_grad and not torch.equal(p, before[name]), name


def test_find_blocks_in_common_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    assert train.find_blocks(llama) is llama.model.layers
    assert train.find_blocks(gpt2) is gpt2.transformer.h
    with pytest.raises(ValueError, match="more blocks than the model has"):
        train.apply_method(llama, TrainConfig(method="freeze-first:4"), "x")


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path, tiny_bert_dir, spam_files):
    plain = train.run(tiny_config(tiny_bert_dir, spam_files, tmp_path / "a", max_steps=3))
    ckpt = train.run(tiny_config(tiny_bert_dir, spam_files, tmp_path / "b", max_steps=3, gradient_checkpointing=True))
    a, b = adapter_tensors(plain.run_dir), adapter_tensors(ckpt.run_dir)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


# -- the run directory ----------------------------------------------------------------------------


def test_run_directory_contents(tmp_path, tiny_bert_dir, spam_files):
    result = train.run(tiny_config(tiny_bert_dir, spam_files, tmp_path / "run", eval_every=2, checkpoint_every=2,
                                   labels=None))
    run = result.run_dir
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["method"] == "lora"
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["peak_memory_bytes"] > 10 * 2**20 and summary["tokens_per_second"] > 0
    assert 0 <= summary["test_accuracy"] <= 1 and "test_before_accuracy" in summary
    config = json.loads((run / "config.json").read_text())
    assert config["labels"] == ["ham", "spam"] and config["out"] == str(run)  # resolved from the data
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))  # 48 examples, batch 8: one line per step
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4, 6]
    assert {"loss", "lr", "grad_norm", "tokens_per_second"} <= set(metrics[0])
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-00000006"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    with pytest.raises(FileExistsError, match="already holds a run"):
        train.run(tiny_config(tiny_bert_dir, spam_files, run))


def test_causal_lm_run(tmp_path, tiny_llama_dir, sft_files):
    config = tiny_config(tiny_llama_dir, sft_files, tmp_path / "run", task="causal-lm", labels=None,
                         target_modules=["q_proj", "v_proj"], max_length=48, lr=5e-3, epochs=2)
    result = train.run(config)
    assert result.tokenizer.pad_token_id == result.tokenizer.eos_token_id  # no pad token: EOS pads
    assert result.model.config.pad_token_id == result.tokenizer.eos_token_id
    s = result.summary
    assert {"val_loss", "val_perplexity", "test_loss", "test_perplexity"} <= set(s)
    assert s["test_loss"] < s["test_before_loss"]
    assert "val_accuracy" not in s


def test_bad_data_is_a_clear_error(tmp_path, tiny_bert_dir, spam_files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "ham"}\n{"text": "what", "label": "eggs"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: unknown label 'eggs'"):
        train.run(tiny_config(tiny_bert_dir, {**spam_files, "validation": bad}, tmp_path / "run"))


# -- divergence, Ctrl-C and resume -------------------------------------------------------------------


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, tiny_bert_dir, spam_files):
    # An absurd learning rate makes the weights overflow after one step.
    config = tiny_config(tiny_bert_dir, spam_files, tmp_path / "run", lr=1e30, checkpoint_every=1, max_grad_norm=0)
    with pytest.raises(train.TrainingDiverged, match=r"non-finite (loss|gradient norm) .* at step 2; .*step-00000001"):
        train.run(config)
    ckpt = train.latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt.name == "step-00000001"
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "trainable.safetensors")).values())
    assert not (tmp_path / "run" / "summary.json").exists()


KILL_SETTINGS = dict(epochs=15, checkpoint_every=4, lora_dropout=0.1, eval_before=False, lr=1e-3)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_bert_dir, spam_files):
    """An uninterrupted run; the interrupted ones must end with exactly its adapter."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train.run(tiny_config(tiny_bert_dir, spam_files, out, **KILL_SETTINGS))
    return result.run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ours, theirs = adapter_tensors(run_dir), adapter_tensors(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), f"{key} differs"  # bit for bit
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert losses == expected


def test_resume_after_sigkill_is_bit_identical(tmp_path, tiny_bert_dir, spam_files, reference_run):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_bert_dir, spam_files, run_dir, **KILL_SETTINGS)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in vars(config).items() if v is not None))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", "--recipe", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while train.latest_checkpoint(run_dir) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = train.latest_checkpoint(run_dir)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert killed_at is not None and not (run_dir / "summary.json").exists()  # really stopped midway
    result = train.run(TrainConfig(), resume=run_dir)
    assert result.summary["steps_this_session"] < result.summary["steps"] == 90
    assert_same_run(run_dir, reference_run)


def test_ctrl_c_checkpoints_and_resume_is_bit_identical(tmp_path, tiny_bert_dir, spam_files, reference_run,
                                                        capsys):
    run_dir = tmp_path / "run"
    config = tiny_config(tiny_bert_dir, spam_files, run_dir, **KILL_SETTINGS)

    def press_ctrl_c() -> None:
        while train.latest_checkpoint(run_dir) is None:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    recipe = tmp_path / "tiny.toml"
    recipe.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in vars(config).items() if v is not None))
    assert cli.main(["train", "--recipe", str(recipe)]) == 130
    err = capsys.readouterr().err
    assert f"lorakit train --resume {run_dir}" in err and "checkpoint saved" in err
    ckpt = train.latest_checkpoint(run_dir)
    assert ckpt is not None and not (run_dir / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    assert cli.main(["train", "--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, reference_run)


def test_lorakit_load_adapter_reads_the_run(tmp_path, tiny_bert_dir, spam_files):
    """The adapter directory is a plain lorakit/PEFT adapter."""
    config = tiny_config(tiny_bert_dir, spam_files, tmp_path / "run", max_steps=2)
    result = train.run(config)
    model = lorakit.load_adapter(fresh_model(config), result.run_dir / "adapter")
    batch = {"input_ids": torch.tensor([[101, 2054, 2003, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    result.model.eval()
    torch.testing.assert_close(model.eval()(**batch).logits, result.model(**batch).logits)


def test_modules_to_save_train_in_full_without_adapters_inside(tiny_bert_dir):
    config = TrainConfig(model=str(tiny_bert_dir), labels=["ham", "spam"], target_modules=["query", "dense"],
                         modules_to_save=["pooler"])
    model = fresh_model(config)
    train.apply_method(model, config, str(tiny_bert_dir))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "bert.pooler.modules_to_save.default.dense.weight" in trainable
    assert not any("pooler" in n and "lora" in n for n in trainable)  # dense matched, but pooler trains in full
    assert any("attention.output.dense.lora_A" in n for n in trainable)
