"""Data-parallel training under torchrun (lorakit.distributed): 2 CPU processes with gloo train
what 1 process trains on the same global batch, with DDP and with FSDP2, and resume exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import cli, data, distributed, train
from lorakit.distributed import World
from lorakit.train import TrainConfig

# 41 examples in batches of 5, two per step: 5 steps, ranks split 5 rows 3 + 2, and the
# last micro-batch of the epoch holds 1 row, so rank 1 runs a filler row. Evaluation
# batches of 5 split the same way. A constant learning rate lets a run stopped by
# max_steps continue as if it had never stopped.
SETTINGS = dict(batch_size=5, grad_accum=2, max_train_examples=41, eval_batch_size=5, schedule="constant",
                warmup_steps=0, lr=1e-2, r=4, lora_alpha=8, target_modules=["query", "value"], max_length=32,
                labels=["ham", "spam"], device="cpu", precision="fp32", threads=1)  # CPU processes: gloo
# float32 sums in another order (per rank, then across ranks) differ in the last bits
RTOL, ATOL = 1e-4, 1e-6


def tiny_config(model_dir: Path, files: dict[str, Path], out: Path, **changes) -> TrainConfig:
    return TrainConfig(model=str(model_dir), train_file=str(files["train"]), validation_file=str(files["validation"]),
                       test_file=str(files["test"]), out=str(out), **{**SETTINGS, **changes})


def write_recipe(path: Path, config: TrainConfig) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in vars(config).items() if v is not None))
    return path


def launch(*args: str, nproc_flag: bool = False) -> subprocess.CompletedProcess:
    """`lorakit train ARGS` in 2 processes: through torchrun, or through `lorakit train --nproc 2`."""
    if nproc_flag:
        command = [sys.executable, "-m", "lorakit", "train", "--nproc", "2", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "lorakit", "train", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its workers (killing it would orphan them)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"timed out: {' '.join(command)}\n{err[-4000:]}")
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_bert_dir, spam_files) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "run"
    return train.run(tiny_config(tiny_bert_dir, spam_files, out)).run_dir


# -- two processes against one ------------------------------------------------------------------


@pytest.mark.parametrize("strategy, nproc_flag", [("ddp", True), ("fsdp", False)])
def test_two_processes_train_what_one_process_trains(strategy, nproc_flag, tmp_path, tiny_bert_dir, spam_files,
                                                     one_process_run):
    recipe = write_recipe(tmp_path / "tiny.toml", tiny_config(tiny_bert_dir, spam_files, tmp_path / "run"))
    result = launch("--recipe", str(recipe), "--strategy", strategy, nproc_flag=nproc_flag)
    assert result.stdout.count("lorakit train: recipe") == 1  # rank 0 alone prints
    assert f"strategy {strategy} over 2 processes: --strategy {strategy}" in result.stdout

    ours, theirs = adapter(tmp_path / "run"), adapter(one_process_run)
    assert ours.keys() == theirs.keys()
    assert any(v.abs().sum() > 0 for k, v in theirs.items() if "lora_B" in k)  # B starts at zero: it trained
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=RTOL, atol=ATOL, msg=key)
    # Loss and gradient norm of every step: the global loss, normalised over the global batch.
    for a, b in zip(metrics(tmp_path / "run"), metrics(one_process_run), strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=RTOL)
    s1 = json.loads((one_process_run / "summary.json").read_text())
    s2 = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s2["processes"], s2["strategy"], s1["processes"]) == (2, strategy, 1)
    for key in ("steps", "tokens", "trainable_params", "total_params", "test_accuracy", "val_accuracy"):
        assert s2[key] == s1[key], key
    for key in ("test_loss", "test_before_loss", "val_loss"):
        assert s2[key] == pytest.approx(s1[key], rel=RTOL), key


# -- resume --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_resumed_run_matches_an_uninterrupted_one(strategy, tmp_path, tiny_bert_dir, spam_files):
    # Dropout draws random numbers on every rank: an exact match needs each rank's generator back.
    changes = dict(lora_dropout=0.1, eval_before=False)
    whole = tiny_config(tiny_bert_dir, spam_files, tmp_path / "whole", **changes)
    launch("--recipe", str(write_recipe(tmp_path / "whole.toml", whole)), "--strategy", strategy)
    run_dir = tmp_path / "resumed"
    first = tiny_config(tiny_bert_dir, spam_files, run_dir, max_steps=2, **changes)
    launch("--recipe", str(write_recipe(tmp_path / "first.toml", first)), "--strategy", strategy)
    assert train.latest_checkpoint(run_dir).name == "step-00000002"
    # The run stopped by its max_steps; without it, it runs to the end of the epoch.
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**saved, "max_steps": None}))
    launch("--resume", str(run_dir))

    ours, theirs = adapter(run_dir), adapter(tmp_path / "whole")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), f"{key} differs"
    assert [m["loss"] for m in metrics(run_dir)] == [m["loss"] for m in metrics(tmp_path / "whole")]
    assert json.loads((run_dir / "summary.json").read_text())["steps_this_session"] == 3


# -- the pieces, in one process ------------------------------------------------------------------


def batch_of(lengths: list[int], causal: bool) -> dict[str, torch.Tensor]:
    examples = []
    for i, n in enumerate(lengths):
        ids = list(range(1, n + 1))
        examples.append({"input_ids": ids, "labels": [data.IGNORE_INDEX] * (n // 2) + ids[n // 2:]} if causal
                        else {"input_ids": ids, "label": i % 2})
    return data.collate(examples, pad_id=0)


@pytest.mark.parametrize("causal", [False, True])
def test_rank_shares_cover_the_batch_once(causal):
    batch = batch_of([3, 7, 2, 5, 4], causal)
    task = "causal-lm" if causal else "seq-cls"
    for size in (1, 2, 3, 5):
        shares = [distributed.share(batch, World(rank=r, size=size)) for r in range(size)]
        assert [len(s["input_ids"]) for s in shares] == [len(p) for p in torch.arange(5).tensor_split(size)]
        # trimmed to their own longest row, otherwise the batch's rows in order
        for s in shares:
            assert s["attention_mask"][:, -1].any()
        rows = torch.cat([s["input_ids"][i, :int(s["attention_mask"][i].sum())]
                          for s in shares for i in range(len(s["input_ids"]))])
        assert torch.equal(rows, batch["input_ids"][batch["attention_mask"].bool()])
        assert sum(train.n_targets(s, task) for s in shares) == train.n_targets(batch, task)


def test_a_rank_without_rows_gets_a_filler_that_counts_for_nothing():
    batch = batch_of([3, 6], causal=False)
    filler = distributed.share(batch, World(rank=2, size=3))
    assert torch.equal(filler["input_ids"], batch["input_ids"][:1, :3])
    assert (filler["labels"] == data.IGNORE_INDEX).all() and train.n_targets(filler, "seq-cls") == 0
    logits = torch.randn(1, 2, requires_grad=True)
    loss = train.loss_sum(logits, filler["labels"], "seq-cls")
    loss.backward()
    assert loss.item() == 0 and not logits.grad.any()


def test_world_from_torchrun_variables():
    assert distributed.world_from_env({}) == distributed.SINGLE
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    world = distributed.world_from_env(env)
    assert (world.rank, world.size, world.local_rank, world.local_size) == (3, 4, 1, 2)
    assert world.distributed and not world.is_main
    with pytest.raises(ValueError, match="LOCAL_RANK must be a non-negative integer .* got None"):
        distributed.world_from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="need RANK < WORLD_SIZE"):
        distributed.world_from_env({**env, "RANK": "4"})


def test_bad_settings_fail_before_the_processes_connect(monkeypatch, tmp_path, tiny_bert_dir, spam_files):
    monkeypatch.setattr(distributed, "process_group", None)  # reaching it would be a TypeError
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    config = tiny_config(tiny_bert_dir, spam_files, tmp_path / "run", batch_size=1, device="cuda:1")
    with pytest.raises(ValueError, match=r"batch_size is the global batch, split across the 2 processes; it must "
                                         r"be at least 2, got 1; .*device must be auto, cuda or cpu, got 'cuda:1'"):
        train.run(config)
    assert not (tmp_path / "run").exists()


def test_strategy_choice_on_cpu():
    model = torch.nn.Linear(2, 2)
    assert distributed.choose_strategy("auto", model, torch.device("cpu"))[0] == "ddp"
    assert distributed.choose_strategy("fsdp", model, torch.device("cpu")) == ("fsdp", "--strategy fsdp")
    with pytest.raises(ValueError, match=r"strategy must be one of \('auto', 'ddp', 'fsdp'\), got 'zero'"):
        cli.make_config({"strategy": "zero"}, "command line")


def test_nproc_passes_the_other_arguments_through():
    args = cli.build_parser().parse_args(["train", "--nproc", "2", "--recipe", "default", "--r", "16", "--lr", "1e-4",
                                          "--target-modules", "query,value", "--no-eval-before", "--strategy", "fsdp"])
    argv = cli.train_argv(args)
    assert "--nproc" not in argv and "--r" not in argv and "--lora-r" in argv  # torchrun's parser rejects --r
    again = cli.build_parser().parse_args(argv)
    assert cli.config_from_args(again) == cli.config_from_args(args)


def test_nproc_checks_settings_and_refuses_to_nest(monkeypatch, capsys):
    assert cli.main(["train", "--nproc", "2", "--lr", "-1"]) == 2  # checked before any process starts
    assert "lr must be positive, got -1.0" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--nproc", "2"]) == 2
    assert "--nproc starts torchrun itself" in capsys.readouterr().err
