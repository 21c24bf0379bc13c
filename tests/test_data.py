"""Data loading, checking, tokenizing and batching (lorakit.data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lorakit import data


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="module")
def llama_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


ROWS = [{"text": "hello there", "label": "ham"}, {"text": "win cash now", "label": "spam"},
        {"text": "lunch?", "label": "ham"}]


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_read_table_formats(tmp_path, suffix):
    table = data.read_table(write(tmp_path / f"train{suffix}", ROWS))
    assert table.rows == ROWS
    assert table.source == str(tmp_path / f"train{suffix}")
    assert len(table.where) == 3


# -- bad data: every error names the file and the row ----------------------------------------


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.read_table(tmp_path / "nope.jsonl")


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "ham"}\n\n{"text": "b", "label": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON"):
        data.read_table(path)


def test_missing_column_names_file_and_row(tmp_path, tokenizer):
    rows = ROWS + [{"text": "no label here"}]
    table = data.read_table(write(tmp_path / "t.jsonl", rows))
    with pytest.raises(ValueError, match=r"t\.jsonl, line 4: missing column 'label'"):
        data.encode_classification(table, tokenizer, ["ham", "spam"], 32)


def test_missing_csv_column_names_file_and_row(tmp_path, tokenizer):
    table = data.read_table(write(tmp_path / "t.csv", [{"body": r["text"], "label": r["label"]} for r in ROWS]))
    with pytest.raises(ValueError, match=r"t\.csv, row 2: missing column 'text'"):
        data.encode_classification(table, tokenizer, ["ham", "spam"], 32)


def test_unknown_label_names_file_and_row(tmp_path, tokenizer):
    rows = ROWS + [{"text": "x", "label": "hamm"}]
    table = data.read_table(write(tmp_path / "v.jsonl", rows))
    with pytest.raises(ValueError, match=r"v\.jsonl, line 4: unknown label 'hamm'; expected one of \['ham', 'spam'\]"):
        data.encode_classification(table, tokenizer, ["ham", "spam"], 32)


def test_empty_split_names_file(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the train split is empty"):
        data.encode_classification(data.read_table(path), tokenizer, ["ham", "spam"], 32)


def test_non_object_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('["text", "label"]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl, line 1: expected a JSON object, found list"):
        data.read_table(path)


# -- tokenizing and batching ------------------------------------------------------------------


def test_classification_examples(tmp_path, tokenizer):
    table = data.read_table(write(tmp_path / "t.jsonl", ROWS))
    examples = data.encode_classification(table, tokenizer, ["ham", "spam"], max_length=4)
    assert [e["label"] for e in examples] == [0, 1, 0]
    assert all(len(e["input_ids"]) <= 4 for e in examples)
    assert examples[0]["input_ids"][0] == tokenizer.cls_token_id


def test_collate_pads_to_longest_in_batch():
    examples = [{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}]
    batch = data.collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_prompt_and_padding_are_masked(tmp_path, llama_tokenizer):
    rows = [{"prompt": "what is two plus two?", "response": "four."},
            {"prompt": "say hi", "response": "hi there, how are you today?"}]
    table = data.read_table(write(tmp_path / "sft.jsonl", rows))
    examples = data.encode_causal_lm(table, llama_tokenizer, max_length=64)
    batch = data.collate(examples, pad_id=llama_tokenizer.pad_token_id or 0)
    for i, row in enumerate(rows):
        n_prompt = len(llama_tokenizer(row["prompt"])["input_ids"])
        response = llama_tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [llama_tokenizer.eos_token_id]
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        n_real = int(mask.sum())
        assert n_real == n_prompt + len(response)
        expected = torch.full_like(labels, data.IGNORE_INDEX)
        expected[n_prompt:n_real] = ids[n_prompt:n_real]
        assert torch.equal(labels, expected)  # -100 exactly on prompt and pad positions
        assert ids[n_prompt:n_real].tolist() == response
    assert (batch["attention_mask"] == 0).any()  # the shorter example really was padded


def test_plain_text_causal_lm_targets_every_token(tmp_path, llama_tokenizer):
    table = data.read_table(write(tmp_path / "lm.jsonl", [{"text": "one two three"}, {"text": "four"}]))
    examples = data.encode_causal_lm(table, llama_tokenizer, max_length=64)
    assert all(e["labels"] == e["input_ids"] for e in examples)


def test_causal_lm_truncation_keeps_alignment(tmp_path, llama_tokenizer):
    table = data.read_table(write(tmp_path / "sft.jsonl", [{"prompt": "a b c d e f", "response": "g h i j k l"}]))
    (example,) = data.encode_causal_lm(table, llama_tokenizer, max_length=10)
    n_prompt = len(llama_tokenizer("a b c d e f")["input_ids"])
    assert len(example["input_ids"]) == len(example["labels"]) == 10
    assert example["labels"][:n_prompt] == [data.IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]


# -- splits -----------------------------------------------------------------------------------


def test_carve_validation_is_deterministic_and_disjoint(tmp_path):
    rows = [{"text": f"t{i}", "label": "ham"} for i in range(50)]
    table = data.read_table(write(tmp_path / "train.jsonl", rows))
    train_a, val_a = data.carve_validation(table, 0.2, seed=3)
    train_b, val_b = data.carve_validation(table, 0.2, seed=3)
    assert val_a.rows == val_b.rows and train_a.rows == train_b.rows
    assert len(val_a.rows) == 10 and len(train_a.rows) == 40
    assert not {r["text"] for r in val_a.rows} & {r["text"] for r in train_a.rows}
    assert val_a.name == "validation" and "held out" in val_a.source


def test_subsample_is_seeded_and_keeps_file_order(tmp_path):
    rows = [{"text": f"t{i}", "label": "ham"} for i in range(100)]
    table = data.read_table(write(tmp_path / "train.jsonl", rows))
    a, b = data.subsample(table, 10, seed=0), data.subsample(table, 10, seed=0)
    assert a.rows == b.rows and len(a.rows) == 10
    numbers = [int(r["text"][1:]) for r in a.rows]
    assert numbers == sorted(numbers)
    assert data.subsample(table, 10, seed=1).rows != a.rows


def test_split_files_from_a_directory(tmp_path):
    for name in ("my_train.jsonl", "my_dev.jsonl", "my_test.jsonl", "notes.txt"):
        write(tmp_path / name, ROWS) if name.endswith(".jsonl") else (tmp_path / name).write_text("x")
    tables = data.load_splits(str(tmp_path))
    assert {k: Path(t.source).name for k, t in tables.items()} == {
        "train": "my_train.jsonl", "validation": "my_dev.jsonl", "test": "my_test.jsonl"}


def test_bundled_spam_dataset():
    tables = data.load_splits("bundled:spam")
    assert set(tables) == {"train", "validation", "test"}
    for table in tables.values():
        assert table.rows and {r["label"] for r in table.rows} == {"ham", "spam"}
    assert data.resolve_labels(tables["train"], "label", None) == ["ham", "spam"]


def test_resolve_labels_sorts_numbers_as_numbers(tmp_path):
    table = data.read_table(write(tmp_path / "t.jsonl", [{"text": "a", "label": v} for v in (10, 2, 1, 2)]))
    assert data.resolve_labels(table, "label", None) == ["1", "2", "10"]


def test_hub_dataset_by_name(monkeypatch):
    """The hub path: load_dataset(name), canonical split names, ClassLabel ids turned into names."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["good", "bad", "fine"], "label": [1, 0, 1]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["meh"], "label": [0]}, features=features),
        "unsupervised": datasets.Dataset.from_dict({"text": ["?"], "label": [-1]}, features=features),
    })
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: calls.append((name, config)) or fake)
    tables = data.load_splits("imdb")
    assert calls == [("imdb", None)]
    assert set(tables) == {"train", "test"}  # no validation: the trainer carves it from train
    assert [r["label"] for r in tables["train"].rows] == ["pos", "neg", "pos"]
    assert tables["test"].at(0) == "imdb (test split), row 1"


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert data.epoch_order(20, 0, 1) == data.epoch_order(20, 0, 1)
    assert sorted(data.epoch_order(20, 0, 1)) == list(range(20))
    assert data.epoch_order(20, 0, 1) != data.epoch_order(20, 0, 2)
