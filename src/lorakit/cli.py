"""The `lorakit` command line: train, eval, merge, predict, generate (and params, explain when installed).

    lorakit train                                   # the bundled spam/ham run, offline, on a CPU
    lorakit train --recipe imdb-llama-3.2-1b --method full
    lorakit train --resume runs/default-20250101-120000
    lorakit train --recipe imdb-llama-3.2-1b --nproc 2    # 2 processes (GPUs) under torchrun
    lorakit eval RUN_DIR --data emails.jsonl
    lorakit merge RUN_DIR merged-model/
    lorakit predict --adapter spam=runs/spam --adapter topic=topic-adapter/ --input rows.jsonl --output out.jsonl
    lorakit generate --adapter sql=runs/sql --adapter chat=runs/chat --input prompts.jsonl

predict and generate run batches that mix adapters (lorakit.route). Each input line is a
JSON object with the text ("text" for predict, "prompt" for generate) and an "adapter"
field naming one of the --adapter NAMEs (null or no field: the base model alone); PATH is
an adapter directory or a `lorakit train` run directory. Each output line is the input
row plus "label", "label_id" and "probs" (predict) or "completion" (generate), in input
order, to --output or stdout.

Bad input (a missing file or column, an unknown label, a bad setting) is reported
on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit import data, distributed, serve, train
from lorakit.train import TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

# Sub-commands that live in modules which may be absent from an installation.
OPTIONAL_COMMANDS = {"params": "count trainable parameters of a model config under LoRA, full or freeze-first:N",
                     "explain": "the LoRA worked example, step by step"}

FIELD_HELP = {
    "model": "hub name, local directory, or bundled:all-MiniLM-L6-v2",
    "task": "seq-cls (sequence classification) or causal-lm (supervised fine-tuning)",
    "dataset": "hub dataset name (datasets.load_dataset), a local directory of split files, or bundled:spam",
    "dataset_config": "the hub dataset's configuration name",
    "train_file": "local JSONL / CSV / Parquet file (replaces the dataset's train split)",
    "labels": "label names in id order, comma-separated (default: the sorted training labels)",
    "val_fraction": "fraction of train held out when there is no validation split",
    "max_train_examples": "train on at most this many examples (a seeded, deterministic subsample)",
    "max_eval_examples": "evaluate on at most this many validation / test examples",
    "max_length": "truncate examples to this many tokens (batches are padded to their longest example)",
    "method": "lora, full, or freeze-first:N (train all but the first N transformer blocks)",
    "r": "LoRA rank",
    "target_modules": "comma-separated module names to adapt (default: all linear layers but the head)",
    "modules_to_save": "comma-separated modules trained in full with the adapter (the head always is)",
    "layers_to_transform": "comma-separated block numbers to adapt (default: all)",
    "max_steps": "stop after this many optimizer steps (overrides epochs)",
    "grad_accum": "micro-batches per optimizer step (gradient accumulation)",
    "schedule": "linear, cosine or constant decay after warmup",
    "max_grad_norm": "clip the gradient norm to this (0: no clipping)",
    "eval_every": "evaluate on the validation split every N steps (0: at the end only)",
    "eval_before": "evaluate on the test split before training too",
    "checkpoint_every": "write a checkpoint every N steps (and at the end)",
    "precision": "auto (bf16 autocast where the GPU or CPU has bf16 units, else fp32), fp32 or bf16",
    "threads": "CPU threads (default: the cores available)",
    "strategy": "under torchrun: ddp (a model copy per process), fsdp (FSDP2: weights sharded across processes) "
                "or auto (fsdp when the model does not fit one GPU)",
    "out": "run directory (default runs/<recipe>-<timestamp>)",
}

# Second spellings. torchrun's own parser reads `--r`, even after `-m lorakit`, as an
# ambiguous abbreviation of its options; under torchrun the rank is given as --lora-r.
ALIASES = {"r": "--lora-r"}


# -- settings from recipes and the command line ------------------------------------------


def coerce(name: str, value: Any, source: str) -> Any:
    """`value` (from TOML or a command-line string) converted to the type of TrainConfig.`name`."""
    kind = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(kind)
    optional = type(None) in args
    if optional:
        kind = next(a for a in args if a is not type(None))
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{source}: {name} needs a value")
    try:
        if typing.get_origin(kind) is list:
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            return [_scalar(typing.get_args(kind)[0], v) for v in items]
        return _scalar(kind, value)
    except (TypeError, ValueError):
        want = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, getattr(kind, "__name__", kind))
        raise ValueError(f"{source}: {name} must be {want}, got {value!r}") from None


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
        if isinstance(value, bool):
            return value
        return words[str(value).lower()] if str(value).lower() in words else _raise(value)
    if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
        raise TypeError(value)
    if kind is int:
        number = float(value)
        return int(number) if number.is_integer() else _raise(value)
    return kind(value)


def _raise(value: Any) -> Any:
    raise ValueError(value)


def make_config(values: dict[str, Any], source: str, base: TrainConfig | None = None) -> TrainConfig:
    """`base` (default: built-in defaults) with `values` applied and checked."""
    train.check_keys(values, source)
    changes = {k: coerce(k, v, source) for k, v in values.items()}
    config = dataclasses.replace(base or TrainConfig(), **changes)
    train.check_config(config, source)
    return config


def recipe_names() -> list[str]:
    folder = resources.files("lorakit").joinpath("recipes")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str = "default") -> TrainConfig:
    """A recipe by name (shipped in lorakit/recipes/) or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.is_file():
        path = Path(str(resources.files("lorakit").joinpath("recipes", f"{name_or_path}.toml")))
        if not path.is_file():
            raise FileNotFoundError(f"no recipe named {name_or_path!r}; give a .toml path or one of {recipe_names()}")
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    values.setdefault("recipe", path.stem)
    return make_config(values, str(path))


# -- sub-commands ------------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, metavar="NAME_OR_PATH",
                   help=f"TOML recipe: a path, or one of {recipe_names()} (default: default)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint, with its saved config")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (one per GPU) under torchrun; "
                        "the batch size stays the global batch")
    group = p.add_argument_group("settings (each overrides the recipe)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipe":
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        text = FIELD_HELP.get(f.name, "")
        default = f"default {f.default!r} unless the recipe says otherwise"
        flags = [flag, ALIASES[f.name]] if f.name in ALIASES else [flag]
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{text} ({default})".strip())
        else:
            text_kind = str(kind)
            metavar = ("A,B,..." if "list" in text_kind else "N" if "int" in text_kind
                       else "X" if "float" in text_kind else f.name.upper())
            group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                               help=f"{text} ({default})".strip())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe (default: "default") with the settings given on the command line applied."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"recipe"}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return make_config(overrides, "command line", load_recipe(args.recipe or "default"))


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        given = sorted(f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
                       if f.name in vars(args) and f.name != "recipe")
        if args.recipe or given:
            raise ValueError("--resume continues a run with the config it saved; give no --recipe or settings with it"
                             + (f" (got {', '.join(given)})" if given else ""))
    config = TrainConfig() if args.resume else config_from_args(args)  # bad settings fail before --nproc starts any
    if args.nproc is not None:
        distributed.relaunch(args.nproc, train_argv(args))
    train.run(config, resume=args.resume)
    return 0


def train_argv(args: argparse.Namespace) -> list[str]:
    """The `lorakit train` arguments that `args` were parsed from, less --nproc, spelled for torchrun."""
    argv = ["train"]
    for name in ("recipe", "resume"):
        if getattr(args, name):
            argv += [f"--{name}", getattr(args, name)]
    for f in dataclasses.fields(TrainConfig):
        if f.name in vars(args) and f.name != "recipe":
            flag, value = ALIASES.get(f.name, "--" + f.name.replace("_", "-")), getattr(args, f.name)
            argv += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, value]
    return argv


def load_run(run_dir: str | Path) -> tuple[nn.Module, Any, TrainConfig]:
    """(model, tokenizer, config) of a finished run: base model + its adapter, or its saved model."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: {path} is missing")
    c = train.config_from_dict(json.loads(path.read_text()), str(path))
    torch.manual_seed(c.seed)
    if train.parse_method(c.method)[0] == "lora":
        model, tokenizer = train.load_model(c)
        lorakit.load_adapter(model, run_dir / "adapter")
    else:
        if not (run_dir / "model").is_dir():
            raise FileNotFoundError(f"{run_dir / 'model'} is missing: the run has not finished")
        model, tokenizer = train.load_model(c, str(run_dir / "model"))
    return model.eval(), tokenizer, c


def cmd_eval(args: argparse.Namespace) -> int:
    model, tokenizer, c = load_run(args.run_dir)
    table = data.read_table(args.data, "evaluation")
    examples = data.encode_splits(c, {"evaluation": table}, tokenizer)["evaluation"]
    device, dtype = train.pick_device(c)
    metrics = train.evaluate(model.to(device), examples, c.task, tokenizer.pad_token_id,
                             args.batch_size or c.eval_batch_size, device, dtype)
    result = {"run": str(args.run_dir), "data": str(args.data), "examples": len(examples), **metrics}
    out = Path(args.json) if args.json else Path(args.run_dir) / f"eval-{Path(args.data).stem}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    shown = ", ".join(f"{k} {v:.2%}" if k == "accuracy" else f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"{args.data}: {len(examples)} examples, {shown} (wrote {out})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; give a new or empty directory")
    model, tokenizer, c = load_run(args.run_dir)
    if train.parse_method(c.method)[0] == "lora":
        model = lorakit.unload(model, merge=True)  # ΔW folded into the base weights: a plain transformers model
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    auto = "AutoModelForSequenceClassification" if c.task == "seq-cls" else "AutoModelForCausalLM"
    print(f"wrote the merged {type(model).__name__} to {out}; load it with transformers.{auto}.from_pretrained")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    summary = serve.predict(args.adapter, args.input, args.output, model=args.model, batch_size=args.batch_size,
                            max_length=args.max_length, text_field=args.text_field,
                            adapter_field=args.adapter_field)
    print(f"lorakit predict: {summary}", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    summary = serve.generate(args.adapter, args.input, args.output, model=args.model, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, prompt_field=args.prompt_field,
                             adapter_field=args.adapter_field, temperature=args.temperature, seed=args.seed,
                             cuda_graphs=args.cuda_graphs)
    print(f"lorakit generate: {summary}", file=sys.stderr)
    return 0


def add_serve_arguments(p: argparse.ArgumentParser, field: str, batch_size: int) -> None:
    """The options predict and generate share; `field` is the input's text field."""
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=PATH",
                   help="an adapter directory or a lorakit train run directory, served as NAME (repeatable)")
    p.add_argument("--input", required=True, metavar="FILE",
                   help=f"JSONL, one object per line with a {field!r} field and an adapter field")
    p.add_argument("--output", default=None, metavar="OUT", help="JSONL file to write (default: stdout)")
    p.add_argument("--model", default=None, metavar="M",
                   help="the base model (default: the one the adapters were trained on, the same for all of them)")
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                   help=f"rows per batch (default {batch_size})")
    p.add_argument("--adapter-field", default="adapter", metavar="NAME",
                   help="the field naming a row's adapter; null or absent: the base model (default adapter)")


# -- the parser --------------------------------------------------------------------------------


def _optional_command(name: str) -> Any:
    """lorakit.<name> if it is installed; None if that module does not exist."""
    try:
        return importlib.import_module(f"lorakit.{name}")
    except ImportError as exc:
        # Only the module's own absence makes the command optional; a broken import inside it is a bug to show.
        if isinstance(exc, ModuleNotFoundError) and exc.name in (f"lorakit.{name}", None):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-Rank Adaptation (LoRA) for PyTorch models.",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"lorakit {lorakit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="fine-tune a model (default: the bundled spam/ham classifier, on a CPU)",
                       description="Fine-tune a transformers model with LoRA, fully, or with the first N blocks frozen.",
                       allow_abbrev=False)
    add_train_arguments(p)
    p.set_defaults(handler=cmd_train)
    p = sub.add_parser("eval", help="evaluate a run's trained model on a local data file", allow_abbrev=False)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL / CSV / Parquet with the training columns")
    p.add_argument("--json", default=None, metavar="OUT", help="where to write the result (default RUN_DIR/eval-<FILE>.json)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    p.set_defaults(handler=cmd_eval)
    p = sub.add_parser("merge", help="fold a run's adapter into its base model and save a plain transformers model",
                       allow_abbrev=False)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.set_defaults(handler=cmd_merge)
    p = sub.add_parser("predict", help="classify JSONL rows, each with the adapter it names, in mixed batches",
                       allow_abbrev=False)
    add_serve_arguments(p, "text", 32)
    p.add_argument("--max-length", type=int, default=256, metavar="N",
                   help="truncate texts to this many tokens (default 256)")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the field holding the text (default text)")
    p.set_defaults(handler=cmd_predict)
    p = sub.add_parser("generate", help="continue JSONL prompts, each with the adapter it names, in mixed batches",
                       allow_abbrev=False)
    add_serve_arguments(p, "prompt", 16)
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate per row (default 64)")
    p.add_argument("--prompt-field", default="prompt", metavar="NAME",
                   help="the field holding the prompt (default prompt)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 (the default) is greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="decode with transformers' generate on a GPU too (by default greedy decoding on a GPU "
                        "replays each step from a CUDA graph, lorakit.graphed_generate)")
    p.set_defaults(handler=cmd_generate)
    for name, summary in OPTIONAL_COMMANDS.items():
        module = _optional_command(name)
        if module is not None:
            p = sub.add_parser(name, help=summary, allow_abbrev=False)
            module.add_arguments(p)
            p.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, OSError, ImportError) as exc:  # bad input: files, columns, labels, settings, models
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except train.TrainingDiverged as exc:
        print(f"lorakit {args.command}: stopped: {exc}", file=sys.stderr)
        return 1
    except train.Interrupted as exc:
        print(f"lorakit {args.command}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: aborted; an earlier checkpoint (if any) is kept, see --resume",
              file=sys.stderr)
        return 130
