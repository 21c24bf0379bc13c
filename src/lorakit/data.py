"""Training data: read splits, check them, tokenize them and batch them.

Splits come from local JSONL / CSV / Parquet files, from a directory holding
`*train*`, `*validation*` (or `*val*`, `*dev*`) and `*test*` files, from the data
bundled with lorakit (`bundled:spam`), or from the Hugging Face hub by name through
`datasets.load_dataset`. Every row remembers where it came from, so a bad row is
reported as "file, line N: what was expected, what was found".

Examples are token-id lists; `collate` pads a batch to its longest example (dynamic
padding), so short batches cost less than `max_length` would.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

SPLITS = ("train", "validation", "test")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
IGNORE_INDEX = -100  # label value that cross-entropy skips: prompt and padding positions
# File-name words that mark each split, in the order they are tried.
_SPLIT_WORDS = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


@dataclass
class Table:
    """The rows of one split and, for each row, where it came from (for error messages)."""

    name: str
    source: str
    rows: list[dict[str, Any]]
    where: list[str]

    def at(self, i: int) -> str:
        return f"{self.source}, {self.where[i]}"

    def select(self, indices: Sequence[int], source: str | None = None) -> Table:
        return Table(self.name, source or self.source, [self.rows[i] for i in indices],
                     [self.where[i] for i in indices])


# -- reading -------------------------------------------------------------------------


def read_table(path: str | Path, name: str = "train") -> Table:
    """Read one local JSONL, CSV or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, name)
    if suffix == ".csv":
        return _read_csv(path, name)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # comes with `datasets`; only needed for Parquet

        rows = pq.read_table(path).to_pylist()
        return Table(name, str(path), rows, [f"row {i + 1}" for i in range(len(rows))])
    raise ValueError(f"{path}: unsupported data file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def _read_jsonl(path: Path, name: str) -> Table:
    rows, where = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, found {type(row).__name__}")
            rows.append(row)
            where.append(f"line {number}")
    return Table(name, str(path), rows, where)


def _read_csv(path: Path, name: str) -> Table:
    rows, where = [], []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for number, row in enumerate(reader, start=2):  # line 1 is the header
            # A short row leaves its last columns None: treat those as missing.
            rows.append({k: v for k, v in row.items() if k is not None and v is not None})
            where.append(f"row {number}")
    return Table(name, str(path), rows, where)


def bundled_dir() -> Path:
    return Path(str(resources.files("lorakit") / "bundled"))


def _split_files(directory: Path, prefix: str = "") -> dict[str, Path]:
    """{split: file} for the files in `directory` whose names mark a split (spam_train.jsonl, dev.csv)."""
    found: dict[str, Path] = {}
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in SUFFIXES and p.name.startswith(prefix))
    for split, words in _SPLIT_WORDS.items():
        for path in files:
            if set(re.split(r"[^a-z0-9]+", path.stem.removeprefix(prefix).lower())) & set(words):
                found.setdefault(split, path)
    return found


def load_splits(dataset: str | None = None, *, train_file: str | None = None,
                validation_file: str | None = None, test_file: str | None = None,
                dataset_config: str | None = None, label_column: str = "label") -> dict[str, Table]:
    """The splits named by a dataset (bundled, local directory or hub name) and/or files.

    Files given explicitly replace the dataset's split of the same name.
    """
    files: dict[str, Path] = {}
    tables: dict[str, Table] = {}
    if dataset and dataset.startswith("bundled:"):
        files = _split_files(bundled_dir(), dataset.removeprefix("bundled:") + "_")
        if "train" not in files:
            raise FileNotFoundError(f"no bundled dataset {dataset!r}; bundled files: "
                                    f"{sorted(p.name for p in bundled_dir().glob('*.jsonl'))}")
    elif dataset and Path(dataset).is_file():
        files["train"] = Path(dataset)
    elif dataset and Path(dataset).is_dir():
        files = _split_files(Path(dataset))
        if "train" not in files:
            raise FileNotFoundError(f"dataset directory {dataset!r} has no file named like *train*{SUFFIXES}")
    elif dataset:
        tables = load_hub(dataset, dataset_config, label_column)
    for split, given in zip(SPLITS, (train_file, validation_file, test_file)):
        if given:
            files[split] = Path(given)
    for split, path in files.items():
        tables[split] = read_table(path, split)
    if "train" not in tables:
        raise ValueError("no training data: set `dataset` (a hub name, a directory or bundled:NAME) or `train_file`")
    return tables


def load_hub(name: str, config_name: str | None, label_column: str) -> dict[str, Table]:
    """Splits of a Hugging Face hub dataset (`datasets.load_dataset(name)`), labels as names."""
    try:
        import datasets
    except ImportError:
        raise ImportError("loading a hub dataset needs the `datasets` package: pip install datasets") from None
    try:
        loaded = datasets.load_dataset(name, config_name)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name!r} is neither a local file or directory nor a dataset on the hub") from None
    except OSError as exc:  # ConnectionError when offline
        raise FileNotFoundError(f"could not load the hub dataset {name!r} ({exc}); for local data give a "
                                "directory or --train-file") from None
    tables: dict[str, Table] = {}
    for split, part in loaded.items():
        canonical = next((s for s, words in _SPLIT_WORDS.items() if split.lower() in words), None)
        if canonical is None:  # e.g. imdb's "unsupervised": no labels
            continue
        rows = part.to_list()
        feature = part.features.get(label_column)
        if isinstance(feature, datasets.ClassLabel):
            if rows and all(r[label_column] == -1 for r in rows):
                continue  # an unlabelled test split (GLUE marks it with -1)
            for r in rows:
                r[label_column] = feature.names[r[label_column]] if r[label_column] >= 0 else r[label_column]
        tables[canonical] = Table(canonical, f"{name} ({split} split)", rows, [f"row {i + 1}" for i in range(len(rows))])
    return tables


# -- shaping splits ---------------------------------------------------------------------


def carve_validation(train: Table, fraction: float, seed: int) -> tuple[Table, Table]:
    """Split `fraction` of the training rows off as validation, the same way for a given seed."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 to carve a validation split, got {fraction}")
    order = list(range(len(train.rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * fraction))
    if n_val >= len(order):
        raise ValueError(f"{train.source}: {len(order)} training rows are too few to hold out a validation split")
    val = train.select(sorted(order[:n_val]), f"{train.source} (held out as validation)")
    val.name = "validation"
    return train.select(sorted(order[n_val:])), val


def subsample(table: Table, limit: int | None, seed: int) -> Table:
    """At most `limit` rows, chosen by a seeded draw and kept in file order."""
    if limit is None or len(table.rows) <= limit:
        return table
    keep = sorted(random.Random(seed).sample(range(len(table.rows)), limit))
    return table.select(keep)


def check_rows(table: Table, columns: Sequence[str]) -> None:
    """Raise on an empty split or a row without one of `columns`, naming file and row."""
    if not table.rows:
        raise ValueError(f"{table.source}: the {table.name} split is empty (expected at least one row)")
    for i, row in enumerate(table.rows):
        for column in columns:
            if column not in row or row[column] is None:
                raise ValueError(f"{table.at(i)}: missing column {column!r} (the row has {sorted(row)})")


def resolve_labels(train: Table, label_column: str, labels: Sequence[Any] | None) -> list[str]:
    """The label names in id order: as configured, else the sorted distinct training labels."""
    if labels:
        return [str(v) for v in labels]
    values = {row[label_column] for row in train.rows}
    # Numbers sort as numbers (2 < 10); everything else as text.
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return [str(v) for v in sorted(values, key=(lambda v: v) if numeric else str)]


# -- tokenizing --------------------------------------------------------------------------


def encode_classification(table: Table, tokenizer, labels: Sequence[str], max_length: int,
                          text_column: str = "text", label_column: str = "label") -> list[dict[str, Any]]:
    """[{"input_ids": [...], "label": id}] for each row; an unknown label names its row."""
    check_rows(table, (text_column, label_column))
    ids = {name: i for i, name in enumerate(labels)}
    targets = []
    for i, row in enumerate(table.rows):
        key = str(row[label_column])
        if key not in ids:
            raise ValueError(f"{table.at(i)}: unknown label {row[label_column]!r}; expected one of {list(labels)}")
        targets.append(ids[key])
    texts = [str(row[text_column]) for row in table.rows]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": e, "label": y} for e, y in zip(encoded, targets)]


def encode_causal_lm(table: Table, tokenizer, max_length: int, text_column: str = "text",
                     prompt_column: str = "prompt", response_column: str = "response") -> list[dict[str, Any]]:
    """Token ids and per-token labels for language-model fine-tuning.

    Rows with prompt/response: the loss covers the response (and the end-of-sequence
    token) only, so the prompt's labels are IGNORE_INDEX. Rows with plain text: every
    token is a target. Prompt and response are tokenized separately so the boundary
    between them is exact.
    """
    first = table.rows[0] if table.rows else {}
    sft = prompt_column in first or response_column in first
    check_rows(table, (prompt_column, response_column) if sft else (text_column,))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    if not sft:
        for ids in tokenizer([str(r[text_column]) for r in table.rows], truncation=True, max_length=max_length)["input_ids"]:
            out.append({"input_ids": ids, "labels": list(ids)})
        return out
    prompts = tokenizer([str(r[prompt_column]) for r in table.rows])["input_ids"]
    responses = tokenizer([str(r[response_column]) for r in table.rows], add_special_tokens=False)["input_ids"]
    for prompt, response in zip(prompts, responses):
        ids = (prompt + response + eos)[:max_length]
        n_prompt = min(len(prompt), len(ids))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return out


# -- a run's splits (c: a lorakit.train.TrainConfig) ------------------------------


def read_splits(c: Any) -> dict[str, Table]:
    """Train / validation / test rows, validation carved from train if missing, subsampled."""
    tables = load_splits(c.dataset, train_file=c.train_file, validation_file=c.validation_file,
                         test_file=c.test_file, dataset_config=c.dataset_config, label_column=c.label_column)
    if "validation" not in tables:
        tables["train"], tables["validation"] = carve_validation(tables["train"], c.val_fraction, c.seed)
    tables["train"] = subsample(tables["train"], c.max_train_examples, c.seed)
    for name in ("validation", "test"):
        if name in tables:
            tables[name] = subsample(tables[name], c.max_eval_examples, c.seed)
    return tables


def encode_splits(c: Any, tables: dict[str, Table], tokenizer: Any) -> dict[str, list[dict]]:
    """Each split's examples, tokenized for the run's task."""
    if c.task == "seq-cls":
        return {name: encode_classification(t, tokenizer, c.labels or [], c.max_length, c.text_column,
                                            c.label_column) for name, t in tables.items()}
    return {name: encode_causal_lm(t, tokenizer, c.max_length, c.text_column, c.prompt_column,
                                   c.response_column) for name, t in tables.items()}


# -- batching -----------------------------------------------------------------------------


def collate(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of the batch (right padding); pad positions get no loss."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)  # (B,)
    else:
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
        batch["labels"] = labels
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of (seed, epoch) only, so a
    resumed run can rebuild it from the epoch number alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
