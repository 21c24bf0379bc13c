"""`lorakit params`: parameter accounting for any transformers config, without weights.

The model is built on the meta device (shapes only, no memory), LoRA is injected
exactly as training would, and the parameters are counted: LoRA parameters per
module type, trainable and total, and the percentage.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import count_parameters, inject, lora_layers
from lorakit.train import freeze_first, parse_method

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class ParamReport:
    """What `lorakit params` prints (and writes with --json)."""

    method: str
    base_params: int
    trainable_params: int
    total_params: int
    lora_params: int = 0
    lora_per_module_type: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params

    def to_dict(self) -> dict:
        return {**asdict(self), "trainable_percent": self.trainable_percent}

    def lines(self) -> list[str]:
        out = [f"Method: {self.method}"]
        if self.lora_per_module_type:
            out.append(f"{'LoRA module type':<20} {'modules':>8} {'each':>12} {'total':>14}")
            for name, row in self.lora_per_module_type.items():
                each = f"{row['each']:,}" if row["each"] >= 0 else "varies"
                out.append(f"{name:<20} {row['modules']:>8,} {each:>12} {row['total']:>14,}")
            out.append(f"{'LoRA parameters':<20} {'':>8} {'':>12} {self.lora_params:>14,}")
        out.append(f"Base model parameters: {self.base_params:,}")
        out.append(f"Total parameters: {self.total_params:,}")
        out.append(f"Trainable parameters: {self.trainable_params:,} ({self.trainable_percent:.2f}%)")
        return out


def load_config(path: str | Path, num_labels: int | None):
    """A transformers config from a config.json file or a directory holding one."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config {str(path)!r} does not exist: pass a config.json or a model directory")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a transformers config: {exc}") from None
    if num_labels is not None:
        config.num_labels = num_labels
    return config


def build_on_meta(config, task: str) -> nn.Module:
    """The model with shapes only; `task` is seq-cls, causal-lm or base."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM, "base": AutoModel}[task]
    with torch.device("meta"):
        try:
            return auto.from_config(config)
        except ValueError as exc:
            raise ValueError(f"cannot build a {task} model from this config ({type(config).__name__}): {exc}") from None


def account(config, *, method: str = "lora", r: int = 16, target_modules: list[str] | None = None,
            task: str = "causal-lm", layers_to_transform: list[int] | None = None) -> ParamReport:
    """Count parameters of `config`'s model under `method` (LoRA: rank r on target_modules)."""
    kind, n = parse_method(method)
    model = build_on_meta(config, task)
    base = count_parameters(model).total
    if kind == "full":
        return ParamReport(method, base, base, base)
    if kind == "freeze-first":
        freeze_first(model, n)
        return ParamReport(method, base, count_parameters(model).trainable, base)
    lora_config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules or DEFAULT_TARGETS.split(","),
                             task_type="SEQ_CLS" if task == "seq-cls" else None,
                             layers_to_transform=layers_to_transform)
    inject(model, lora_config)
    per_type: dict[str, dict[str, int]] = defaultdict(lambda: {"modules": 0, "each": 0, "total": 0})
    for name, layer in lora_layers(model):
        size = sum(p.numel() for p in layer.adapter_params("default"))
        row = per_type[name.rsplit(".", 1)[-1]]
        row["modules"] += 1
        row["each"] = size if row["modules"] == 1 or row["each"] == size else -1  # -1: sizes differ
        row["total"] += size
    lora = sum(row["total"] for row in per_type.values())
    # The trained copy of a saved head replaces the original: count the head once.
    return ParamReport(method, base, count_parameters(model).trainable, base + lora, lora, dict(per_type))


def parse_layers(text: str | None) -> list[int] | None:
    """"0-24" or "0,1,5" -> a list of block indices."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ValueError(f"--layers must look like 0-11 or 0,3,5; got {text!r}") from None
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a transformers config.json (or a model directory holding one)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--target-modules", default=DEFAULT_TARGETS, help=f"comma-separated (default {DEFAULT_TARGETS})")
    parser.add_argument("--num-labels", type=int, default=None,
                        help="count a sequence-classification model with this many labels (its bias-free head trains too)")
    parser.add_argument("--task", choices=["seq-cls", "causal-lm", "base"], default=None,
                        help="model head (default: seq-cls with --num-labels, else causal-lm)")
    parser.add_argument("--method", default="lora", help="lora, full or freeze-first:N (default lora)")
    parser.add_argument("--layers", default=None, help="only adapt these blocks, e.g. 0-24")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    task = args.task or ("seq-cls" if args.num_labels is not None else "causal-lm")
    config = load_config(args.config, args.num_labels)
    report = account(config, method=args.method, r=args.r, target_modules=[t for t in args.target_modules.split(",") if t],
                     task=task, layers_to_transform=parse_layers(args.layers))
    print("\n".join(report.lines()))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0
