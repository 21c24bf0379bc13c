"""Batched inference in which each input row names its adapter: `lorakit predict` and `lorakit generate`.

Each input row (a JSON object per line) holds the text or prompt and, in its adapter
field, the name of an adapter given as NAME=PATH, or null / no field for the base model
alone. The rows are read and checked first; then the base model is loaded once, every
adapter into it by name, and the rows run in input order, `batch_size` per forward,
each batch inside `lorakit.route` so that one batch mixes adapters. Each output line is
the input row with the results added.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

import lorakit
from lorakit import data, train
from lorakit.checkpoint import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    atomic_write,
    read_config,
    read_json_object,
)
from lorakit.inject import SEQ_CLS_HEADS, check_adapter_name

log = logging.getLogger("lorakit")

TASK_TYPES = {"SEQ_CLS": "seq-cls", "CAUSAL_LM": "causal-lm"}  # adapter_config.json's task_type -> task
# The output layer of a classification head in an adapter file: classifier / score, or
# their out_proj in heads with a hidden layer (RoBERTa's).
HEAD_WEIGHT = re.compile(rf"{re.escape(PREFIX)}(?:.*\.)?(?:{'|'.join(SEQ_CLS_HEADS)})(?:\.out_proj)?\.weight")


@dataclass(frozen=True)
class Adapter:
    """One NAME=PATH, resolved to its adapter directory and what was recorded with it."""

    name: str
    directory: Path  # holds adapter_config.json and adapter_model.safetensors
    base: str | None  # the base model it was trained on, when recorded
    source: str  # the file `base` and `task` were read from
    task: str | None  # seq-cls or causal-lm, when recorded
    labels: list[str] | None  # label names in id order, from a run's config.json


@dataclass(frozen=True)
class Summary:
    """What a predict or generate call did."""

    rows: int
    per_adapter: dict[str | None, int]  # rows per adapter name (None: the base model alone)
    batches: int
    load_seconds: float
    run_seconds: float
    output: str | None

    def __str__(self) -> str:
        counts = ", ".join(f"{name or 'no adapter'}: {n}" for name, n in self.per_adapter.items())
        adapters = sum(name is not None for name in self.per_adapter)
        return (f"{self.rows} rows with {adapters} adapter{'s' * (adapters != 1)} ({counts}), "
                f"{self.batches} batch{'es' * (self.batches != 1)} in {self.run_seconds:.1f} s "
                f"(loading {self.load_seconds:.1f} s)" + (f"; wrote {self.output}" if self.output else ""))


# -- adapters and the base model ------------------------------------------------------------


def parse_adapter(spec: str) -> Adapter:
    """NAME=PATH, where PATH is an adapter directory or a `lorakit train` run directory."""
    name, sep, path_text = spec.partition("=")
    if not sep or not name or not path_text:
        raise ValueError(f"--adapter expects NAME=PATH (e.g. support=runs/support), got {spec!r}")
    check_adapter_name(name)
    path = Path(path_text)
    if not path.exists():
        raise FileNotFoundError(f"adapter {name!r}: {path} does not exist")
    if (path / CONFIG_NAME).is_file():
        config = read_config(path)
        found = Adapter(name, path, config.base_model_name_or_path, str(path / CONFIG_NAME),
                        TASK_TYPES.get(config.task_type or ""), None)
    elif (path / "config.json").is_file() and (path / "adapter").is_dir():
        c = _run_config(path / "config.json")
        read_config(path / "adapter")
        found = Adapter(name, path / "adapter", c.model, str(path / "config.json"), c.task, c.labels)
    else:
        full = (f"; it holds a fully trained model ({path / 'model'}), which `lorakit eval` runs"
                if (path / "model").is_dir() else "")
        raise FileNotFoundError(f"adapter {name!r}: {path} is neither an adapter directory ({CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}) nor a lorakit train run directory (config.json and adapter/){full}")
    if not (found.directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"adapter {name!r}: {found.directory / WEIGHTS_NAME} is missing")
    return found


def _run_config(path: Path) -> train.TrainConfig:
    return train.config_from_dict(read_json_object(path), str(path))


def resolve_adapters(specs: Sequence[str], task: str, command: str) -> list[Adapter]:
    """Each NAME=PATH parsed; names distinct; every adapter that records its task made for `task`."""
    if not specs:
        raise ValueError("no adapters: give at least one --adapter NAME=PATH")
    adapters: list[Adapter] = []
    for spec in specs:
        a = parse_adapter(spec)
        if any(b.name == a.name for b in adapters):
            raise ValueError(f"adapter name {a.name!r} is given twice; give each adapter its own name")
        if a.task is not None and a.task != task:
            other = "generate" if a.task == "causal-lm" else "predict"
            raise ValueError(f"adapter {a.name!r} is a {a.task} adapter ({a.source}); lorakit {command} runs "
                             f"{task} adapters, lorakit {other} runs {a.task} ones")
        adapters.append(a)
    return adapters


def _same_path(name: str) -> str:
    path = train.resolve_model(name)
    return str(Path(path).resolve()) if Path(path).exists() else path


def choose_base(adapters: Sequence[Adapter], model: str | None) -> str:
    """The base model to load: `model` when given, else the one base all adapters were trained on."""
    if model:
        return train.resolve_model(model)
    for a in adapters:
        if not a.base:
            raise ValueError(f"adapter {a.name!r}: {a.source} does not name its base model "
                             "(base_model_name_or_path); give --model")
    if len({_same_path(a.base) for a in adapters}) > 1:
        bases = "; ".join(f"{a.name}: {a.base} (from {a.source})" for a in adapters)
        raise ValueError(f"the adapters were trained on different base models ({bases}); "
                         "give adapters of one base model (or choose one with --model)")
    return train.resolve_model(adapters[0].base)


def _head_size(directory: Path) -> int | None:
    """Rows of the classification head's output weight in the adapter file (None: no head saved)."""
    path = directory / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            key = next((k for k in f.keys() if HEAD_WEIGHT.fullmatch(k)), None)
            return None if key is None else f.get_slice(key).get_shape()[0]
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None


def label_count(adapters: Sequence[Adapter]) -> int | None:
    """The number of labels the adapters' heads output (from a run's labels or the head's
    shape); None when no adapter records one. Adapters that disagree are an error."""
    counts = {}
    for a in adapters:
        n = len(a.labels) if a.labels else _head_size(a.directory)
        if n is not None:
            counts[a.name] = n
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise ValueError(f"the adapters' classification heads have different numbers of labels ({listed}); "
                         "one model has one head size, so give adapters with the same number of labels")
    return next(iter(counts.values()), None)


def load_model(base: str, adapters: Sequence[Adapter], task: str,
               num_labels: int | None = None) -> tuple[nn.Module, Any, bool]:
    """(model in eval mode with every adapter loaded by name, tokenizer, whether the
    classification head is newly initialized rather than read from `base`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama and GPT-2 ship without one; pads are masked out
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no load report or progress bar; predict reports a new head
    hf_logging.disable_progress_bar()
    try:
        if task == "seq-cls":
            size = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
            with torch.random.fork_rng(devices=[]):  # a new head comes out the same on every run,
                torch.manual_seed(0)  # and the caller's generator is left as it was
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    base, dtype=torch.float32, output_loading_info=True, **size)
            fresh = [k if isinstance(k, str) else k[0] for k in (*info["missing_keys"], *info["mismatched_keys"])]
            new_head = any(k.split(".")[0] in SEQ_CLS_HEADS for k in fresh)
        else:
            model, new_head = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), False
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification pools the last non-pad token
    for a in adapters:
        lorakit.load_adapter(model, a.directory, adapter_name=a.name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, new_head


# -- input and output ------------------------------------------------------------------------


def read_input(path: str | Path, field: str, adapter_field: str,
               known: Sequence[str]) -> tuple[list[dict[str, Any]], list[str | None]]:
    """(rows, each row's adapter name or None); a row without a string `field` or naming an
    adapter not in `known` is an error naming its file and line."""
    table = data.read_table(path, "input")
    if not table.rows:
        raise ValueError(f"{path}: no rows; expected one JSON object per line with a {field!r} field")
    names = []
    for i, row in enumerate(table.rows):
        if not isinstance(row.get(field), str):
            found = f"{row[field]!r}" if field in row else f"no such field (the row has {sorted(row)})"
            raise ValueError(f"{table.at(i)}: expected a string in field {field!r}, found {found}")
        name = row.get(adapter_field)
        if name is not None and name not in known:
            raise ValueError(f"{table.at(i)}: unknown adapter {name!r} in field {adapter_field!r}; the adapters "
                             f"given are {list(known)} (null or no field: the base model alone)")
        names.append(name)
    return table.rows, names


def check_output(output: str | Path | None) -> None:
    """Raise unless `output` (None: stdout) is a file path in an existing directory."""
    if output is None:
        return
    out = Path(output)
    if out.is_dir():
        raise IsADirectoryError(f"output {out} is a directory; give a file path")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory {out.parent} does not exist")


def run_batches(model: nn.Module, rows: list[dict[str, Any]], names: list[str | None], batch_size: int,
                output: str | Path | None, desc: str,
                step: Callable[[list[dict[str, Any]], list[str | None]], list[dict[str, Any]]]) -> int:
    """Run `step(rows, names)` (the new fields of each row) on each batch, in input order, inside
    lorakit.route; write each row with its new fields as a JSON line to `output` (written to a
    temporary file and renamed) or stdout. Returns the number of batches."""
    from tqdm.auto import tqdm

    starts = range(0, len(rows), batch_size)

    def write(f) -> None:
        for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=len(starts) < 2, file=sys.stderr):
            batch, batch_names = rows[start:start + batch_size], names[start:start + batch_size]
            with lorakit.route(model, batch_names), torch.no_grad():
                results = step(batch, batch_names)
            f.writelines(json.dumps({**row, **result}) + "\n" for row, result in zip(batch, results))

    if output is None:
        write(sys.stdout)
        sys.stdout.flush()
        return len(starts)
    def write_file(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)

    atomic_write(Path(output), write_file)  # renamed once complete: no half-written output
    return len(starts)


def _check_settings(**values: float) -> None:
    for name, value in values.items():
        if value < (0 if name == "temperature" else 1):
            least = "0 or more" if name == "temperature" else "at least 1"
            raise ValueError(f"--{name.replace('_', '-')} must be {least}, got {value}")


def _label_names(config: Any, n: int) -> list[str]:
    """The model config's label names; transformers' placeholders (LABEL_i) and gaps become the id."""
    id2label = config.id2label or {}
    return [str(id2label[i]) if i in id2label and id2label[i] != f"LABEL_{i}" else str(i) for i in range(n)]


def _per_adapter(adapters: Sequence[Adapter], names: list[str | None]) -> dict[str | None, int]:
    counts = Counter(names)
    return {name: counts[name] for name in [a.name for a in adapters] + [None] if counts[name]}


# -- the two commands --------------------------------------------------------------------------


def predict(adapters: Sequence[str], input_file: str | Path, output: str | Path | None = None, *,
            model: str | None = None, batch_size: int = 32, max_length: int = 256,
            text_field: str = "text", adapter_field: str = "adapter") -> Summary:
    """Classify each row's `text_field` with the adapter it names.

    Each output row is the input row plus "label" (the adapter's run labels, else the
    model config's label names, else the id as a string), "label_id" and "probs".
    """
    started = time.perf_counter()
    _check_settings(batch_size=batch_size, max_length=max_length)
    sources = resolve_adapters(adapters, "seq-cls", "predict")
    base = choose_base(sources, model)
    n_labels = label_count(sources)
    rows, names = read_input(input_file, text_field, adapter_field, [a.name for a in sources])
    check_output(output)
    net, tokenizer, new_head = load_model(base, sources, "seq-cls", n_labels)
    if new_head and None in names:
        print(f"lorakit predict: note: {base} has no trained classification head of this size; rows without "
              f"an adapter ({names.count(None)}) use a newly initialized one (from a fixed seed: the same on every "
              f"run, but untrained)", file=sys.stderr)
    default = _label_names(net.config, net.config.num_labels)
    labels = {None: default, **{a.name: a.labels or default for a in sources}}
    device = next(net.parameters()).device
    loaded = time.perf_counter()

    def step(batch: list[dict[str, Any]], batch_names: list[str | None]) -> list[dict[str, Any]]:
        enc = tokenizer([r[text_field] for r in batch], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        probs = net(**enc).logits.float().softmax(-1).cpu()  # (B, num_labels)
        ids = probs.argmax(-1).tolist()
        return [{"label": labels[n][i], "label_id": i, "probs": p}
                for n, i, p in zip(batch_names, ids, probs.tolist())]

    batches = run_batches(net, rows, names, batch_size, output, "predict", step)
    return Summary(len(rows), _per_adapter(sources, names), batches, loaded - started,
                   time.perf_counter() - loaded, str(output) if output is not None else None)


def _graphs_usable(device: torch.device) -> bool:
    """Whether generate decodes from CUDA graphs on `device` (a GPU)."""
    return device.type == "cuda"


def generate(adapters: Sequence[str], input_file: str | Path, output: str | Path | None = None, *,
             model: str | None = None, batch_size: int = 16, max_new_tokens: int = 64,
             prompt_field: str = "prompt", adapter_field: str = "adapter", temperature: float = 0.0,
             seed: int = 0, cuda_graphs: bool = True) -> Summary:
    """Continue each row's `prompt_field` with the adapter it names: greedy at temperature 0,
    else sampled (seeded by `seed`) by transformers' `generate`. Each output row is the input
    row plus "completion" (the new tokens only, decoded without special tokens).

    Greedy decoding on a GPU replays each step from a CUDA graph (`lorakit.graphed_generate`),
    unless `cuda_graphs` is False; a model it cannot run that way falls back to `generate`,
    with one log line saying why."""
    started = time.perf_counter()
    _check_settings(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature)
    sources = resolve_adapters(adapters, "causal-lm", "generate")
    base = choose_base(sources, model)
    rows, names = read_input(input_file, prompt_field, adapter_field, [a.name for a in sources])
    check_output(output)
    net, tokenizer, _ = load_model(base, sources, "causal-lm")
    tokenizer.padding_side = "left"  # every prompt of a batch then ends where generation starts
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    device = next(net.parameters()).device
    torch.manual_seed(seed)
    loaded = time.perf_counter()
    graphed = cuda_graphs and temperature == 0 and _graphs_usable(device)  # turned off by a failure

    def step(batch: list[dict[str, Any]], _: list[str | None]) -> list[dict[str, Any]]:
        nonlocal graphed
        enc = tokenizer([r[prompt_field] for r in batch], padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T), left-padded
        out = None
        if graphed:
            try:
                out = lorakit.graphed_generate(net, ids, mask, max_new_tokens=max_new_tokens,
                                               pad_token_id=tokenizer.pad_token_id)
            except Exception as exc:  # a model without static-cache support, say: decode it the usual way
                log.info("lorakit generate: CUDA-graph decoding failed (%s: %s); using transformers' generate",
                         type(exc).__name__, exc)
                graphed = False
        if out is None:
            out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id, **sampling)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        return [{"completion": t} for t in texts]

    batches = run_batches(net, rows, names, batch_size, output, "generate", step)
    return Summary(len(rows), _per_adapter(sources, names), batches, loaded - started,
                   time.perf_counter() - loaded, str(output) if output is not None else None)
