"""The settings of a `lorakit train` run (TrainConfig), read from a recipe and the command line, and checked."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from lorakit import distributed

TASKS = ("seq-cls", "causal-lm")
SCHEDULES = ("linear", "cosine", "constant")
BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; a recipe (TOML) sets any of these and the command line overrides them."""

    recipe: str = "default"
    model: str = BUNDLED_MODEL  # hub name, local directory, or bundled:all-MiniLM-L6-v2
    task: str = "seq-cls"  # seq-cls or causal-lm
    # data
    dataset: str | None = None  # hub name, local directory, or bundled:spam
    dataset_config: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    labels: list[str] | None = None  # label names in id order; default: sorted training labels
    val_fraction: float = 0.1  # held out of train when there is no validation split
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int = 128
    # method
    method: str = "lora"  # lora, full or freeze-first:N
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # default: all linear layers but the head
    modules_to_save: list[str] | None = None  # trained in full next to the adapter (the head always is)
    layers_to_transform: list[int] | None = None
    # optimisation
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    schedule: str = "linear"  # linear, cosine or constant, after warmup
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    # evaluation, logging, checkpoints
    eval_every: int = 0  # steps; 0 evaluates at the end only
    eval_before: bool = True  # evaluate the test split before training too
    eval_batch_size: int = 64
    log_every: int = 1
    checkpoint_every: int = 100
    # runtime
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    precision: str = "auto"  # auto (bf16 autocast where the GPU or CPU has bf16 units), fp32 or bf16
    threads: int | None = None  # CPU threads; default: the cores this process may use
    gradient_checkpointing: bool = False
    strategy: str = "auto"  # under torchrun: ddp, fsdp (FSDP2) or auto (fsdp when the model does not fit one GPU)
    out: str | None = None  # default runs/<recipe>-<timestamp>


def check_keys(values: dict[str, Any], source: str) -> None:
    """Raise on a key that is not a TrainConfig field, suggesting the closest one."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ValueError(f"{source}: unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))


def config_from_dict(values: dict[str, Any], source: str) -> TrainConfig:
    """A TrainConfig from already-typed values (a run's config.json), checked."""
    check_keys(values, source)
    config = TrainConfig(**values)
    check_config(config, source)
    return config


def check_config(c: TrainConfig, source: str) -> None:
    problems = []
    if c.task not in TASKS:
        problems.append(f"task must be one of {TASKS}, got {c.task!r}")
    if c.schedule not in SCHEDULES:
        problems.append(f"schedule must be one of {SCHEDULES}, got {c.schedule!r}")
    if c.precision not in ("auto", "fp32", "bf16"):
        problems.append(f"precision must be auto, fp32 or bf16, got {c.precision!r}")
    if c.strategy not in distributed.STRATEGIES:
        problems.append(f"strategy must be one of {distributed.STRATEGIES}, got {c.strategy!r}")
    for name in ("batch_size", "grad_accum", "epochs", "max_length", "eval_batch_size", "log_every", "checkpoint_every"):
        if getattr(c, name) < 1:
            problems.append(f"{name} must be at least 1, got {getattr(c, name)}")
    if c.lr <= 0:
        problems.append(f"lr must be positive, got {c.lr}")
    try:
        parse_method(c.method)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def parse_method(method: str) -> tuple[str, int]:
    """("lora" | "full" | "freeze-first", N)."""
    if method in ("lora", "full"):
        return method, 0
    head, _, count = method.partition(":")
    if head == "freeze-first" and count.isdigit():
        return head, int(count)
    raise ValueError(f"method must be lora, full or freeze-first:N (N a number of blocks), got {method!r}")
