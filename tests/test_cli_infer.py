"""`lorakit predict` and `lorakit generate`: mixed-adapter batches from JSONL, checked row by row."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

import lorakit
from lorakit import cli
from lorakit.train import TrainConfig

RUN_LABELS = ["neg", "neu", "pos"]
BASE_LABELS = {0: "low", 1: "mid", 2: "high"}


def random_adapter(model, name: str, targets: list[str], task_type: str, base: Path, seed: int) -> None:
    """Inject adapter `name` with random non-zero A and B; its head copy (if any) perturbed."""
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                             task_type=task_type, base_model_name_or_path=str(base)), name)
    with torch.no_grad():
        for holder in [m for m in model.modules() if isinstance(m, lorakit.ModulesToSave)]:
            if name in holder.modules_to_save:
                for p in holder.modules_to_save[name].parameters():
                    p.add_(torch.randn_like(p))


@pytest.fixture(scope="module")
def cls_setup(tmp_path_factory, tiny_bert_dir) -> dict[str, Path]:
    """A 3-label BERT classifier saved as the base; adapter a as a run directory (with labels), b as a plain
    adapter directory (labels from the base's config)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("predict")
    base = root / "base"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3, id2label=BASE_LABELS)
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(base)
    for name, seed in (("a", 1), ("b", 2)):
        random_adapter(model, name, ["query", "value"], "SEQ_CLS", base, seed)
    run = root / "run-a"
    lorakit.save_adapter(model, run / "adapter", "a")
    config = TrainConfig(model=str(base), task="seq-cls", labels=RUN_LABELS)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    lorakit.save_adapter(model, root / "adapter-b", "b")
    return {"root": root, "base": base, "run_a": run, "b": root / "adapter-b"}


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """Two random causal-LM adapters x and y of the tiny Llama."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("generate")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    for name, seed in (("x", 3), ("y", 4)):
        random_adapter(model, name, ["q_proj", "v_proj", "down_proj"], "CAUSAL_LM", tiny_llama_dir, seed)
        lorakit.save_adapter(model, root / name, name)
    return {"root": root, "x": root / "x", "y": root / "y"}


# -- predict -------------------------------------------------------------------------------------


def test_predict_rows_match_each_adapter_alone(cls_setup, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"text": "free cash prize now", "adapter": "a", "id": 0},
            {"text": "meeting notes for the project review tomorrow", "adapter": None, "id": 1},
            {"text": "lunch?", "adapter": "b", "extra": [1, 2]},
            {"text": "the quarterly budget report draft is attached, thanks", "id": 3},
            {"text": "click to claim your bonus", "adapter": "b"},
            {"text": "agenda", "adapter": "a"},
            {"text": "cheap loan, guaranteed", "adapter": "a"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert cli.main(["predict", "--adapter", f"a={cls_setup['run_a']}", "--adapter", f"b={cls_setup['b']}",
                     "--input", str(data), "--output", str(out), "--batch-size", "3"]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("lorakit predict: 7 rows with 2 adapters (a: 3, b: 2, no adapter: 2), 3 batches")
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(rows)

    model = AutoModelForSequenceClassification.from_pretrained(cls_setup["base"]).eval()
    lorakit.load_adapter(model, cls_setup["run_a"] / "adapter", "a")
    lorakit.load_adapter(model, cls_setup["b"], "b")
    tokenizer = AutoTokenizer.from_pretrained(cls_setup["base"])

    @torch.no_grad()
    def probs(text: str, name: str | None) -> torch.Tensor:
        enc = tokenizer(text, return_tensors="pt")
        if name is None:
            with lorakit.disable_adapters(model):
                return model(**enc).logits.softmax(-1)[0]
        lorakit.set_adapter(model, name)
        return model(**enc).logits.softmax(-1)[0]

    for row, result in zip(rows, got):
        assert {k: result[k] for k in row} == row  # fields kept, rows in input order
        name = row.get("adapter")
        want = probs(row["text"], name)
        torch.testing.assert_close(torch.tensor(result["probs"]), want, rtol=0, atol=1e-5)
        assert result["label_id"] == int(want.argmax())
        names = RUN_LABELS if name == "a" else list(BASE_LABELS.values())
        assert result["label"] == names[result["label_id"]]
        for other in {"a", "b", None} - {name}:  # a row routed to another adapter could not match
            assert (probs(row["text"], other) - want).abs().max() > 1e-3


# -- generate ------------------------------------------------------------------------------------


def test_generate_rows_match_each_adapter_alone(lm_setup, tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["what is 3 plus 4?", "hello", "tell me a very long story about the sea and ships", "hi there"]
    rows = [{"prompt": p, "adapter": name, "n": i} for i, p in enumerate(prompts) for name in ("x", "y", None)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    assert cli.main(["generate", "--adapter", f"x={lm_setup['x']}", "--adapter", f"y={lm_setup['y']}",
                     "--input", str(data), "--batch-size", "5", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    got = [json.loads(line) for line in captured.out.splitlines()]  # no --output: stdout
    assert "lorakit generate: 12 rows with 2 adapters (x: 4, y: 4, no adapter: 4), 3 batches" in captured.err

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lorakit.load_adapter(model, lm_setup["x"], "x")
    lorakit.load_adapter(model, lm_setup["y"], "y")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.pad_token = tokenizer.eos_token
    assert len(got) == len(rows)
    for row, result in zip(rows, got):
        assert {k: result[k] for k in row} == row
        # The mask matters: the prompt ends in [SEP], which is also the pad token here.
        enc = tokenizer(row["prompt"], return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            if row["adapter"] is None:
                with lorakit.disable_adapters(model):
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
            else:
                lorakit.set_adapter(model, row["adapter"])
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
        assert result["completion"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), row
    for i in range(len(prompts)):  # each prompt's three completions differ: routing matters
        assert len({r["completion"] for r in got[3 * i:3 * i + 3]}) == 3, got[3 * i:3 * i + 3]


@pytest.mark.parametrize("fails", [False, True], ids=["graphed", "falls-back"])
def test_generate_decodes_through_graphed_generate_where_graphs_run(fails, lm_setup, tmp_path, monkeypatch,
                                                                     capsys, caplog):
    """Where CUDA graphs can run, greedy generate decodes with lorakit.graphed_generate (here its
    eager steps, graphs=False, since the tests have no GPU) and writes what transformers' generate
    gives; if it fails, one log line says so and the batches decode with generate instead."""
    from lorakit import serve

    prompts = ["what is 3 plus 4?", "hello", "tell me a very long story about the sea and ships"]
    rows = [{"prompt": p, "adapter": name} for p in prompts for name in ("x", None)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    args = ["generate", "--adapter", f"x={lm_setup['x']}", "--input", str(data), "--batch-size", "4",
            "--max-new-tokens", "5"]
    assert cli.main(args) == 0
    want = capsys.readouterr().out
    calls = []
    real = lorakit.graphed_generate

    def graphed(*a, **k):
        calls.append(1)
        if fails:
            raise RuntimeError("no static cache here")
        return real(*a, graphs=False, **k)

    monkeypatch.setattr(serve, "_graphs_usable", lambda device: True)
    monkeypatch.setattr(lorakit, "graphed_generate", graphed)
    with caplog.at_level("INFO", logger="lorakit"):
        assert cli.main(args) == 0
    assert capsys.readouterr().out == want
    assert len(calls) == 1 if fails else len(calls) == 2  # 6 rows in batches of 4: two batches
    assert ("CUDA-graph decoding failed (RuntimeError: no static cache here)" in caplog.text) == fails
    assert cli.main(args + ["--no-cuda-graphs"]) == 0 and capsys.readouterr().out == want
    assert len(calls) == (1 if fails else 2)  # --no-cuda-graphs: not called


# -- errors ------------------------------------------------------------------------------------------


def error_of(args: list[str], capsys) -> str:
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_unknown_adapter_in_a_row(cls_setup, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hi", "adapter": "a"}, {"text": "yo", "adapter": "zzz"}])
    out = tmp_path / "out.jsonl"
    err = error_of(["predict", "--adapter", f"a={cls_setup['run_a']}", "--adapter", f"b={cls_setup['b']}",
                    "--input", str(data), "--output", str(out)], capsys)
    assert err.startswith("lorakit predict: error:")
    assert f"{data}, line 2: unknown adapter 'zzz'" in err and "['a', 'b']" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no output, no temporary file


def test_bad_adapter_spec_and_missing_input(cls_setup, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hi"}])
    err = error_of(["predict", "--adapter", str(cls_setup["b"]), "--input", str(data)], capsys)
    assert f"--adapter expects NAME=PATH (e.g. support=runs/support), got '{cls_setup['b']}'" in err
    missing = tmp_path / "missing.jsonl"
    err = error_of(["predict", "--adapter", f"b={cls_setup['b']}", "--input", str(missing)], capsys)
    assert str(missing) in err and "does not exist" in err
    err = error_of(["generate", "--adapter", f"b={tmp_path / 'nowhere'}", "--input", str(data)], capsys)
    assert f"adapter 'b': {tmp_path / 'nowhere'} does not exist" in err


def test_adapters_must_share_base_task_and_label_count(cls_setup, lm_setup, tiny_bert_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": "hi"}])
    other = shutil.copytree(cls_setup["b"], tmp_path / "other-base")
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tiny_bert_dir)}))
    err = error_of(["predict", "--adapter", f"a={cls_setup['run_a']}", "--adapter", f"c={other}",
                    "--input", str(data)], capsys)
    assert "the adapters were trained on different base models" in err
    assert f"a: {cls_setup['base']}" in err and f"c: {tiny_bert_dir}" in err

    err = error_of(["predict", "--adapter", f"b={cls_setup['b']}", "--adapter", f"x={lm_setup['x']}",
                    "--input", str(data)], capsys)
    assert "adapter 'x' is a causal-lm adapter" in err and "lorakit generate runs causal-lm ones" in err

    two = shutil.copytree(cls_setup["run_a"], tmp_path / "two-labels")
    config = json.loads((two / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**config, "labels": ["no", "yes"]}))
    err = error_of(["predict", "--adapter", f"a={two}", "--adapter", f"b={cls_setup['b']}",
                    "--input", str(data)], capsys)
    assert "different numbers of labels (a: 2, b: 3)" in err


def test_a_new_classification_head_is_the_same_every_run(tiny_bert_dir):
    """Rows without an adapter on a base with no trained head of this size go through a newly
    initialized head: made from a fixed seed, so repeated runs give the same outputs, and the
    caller's random stream is left where it was."""
    from lorakit import serve

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first, _, new_head = serve.load_model(str(tiny_bert_dir), [], "seq-cls", num_labels=5)
    assert new_head
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(7)
    second, _, _ = serve.load_model(str(tiny_bert_dir), [], "seq-cls", num_labels=5)
    for (name, p), q in zip(first.classifier.named_parameters(), second.classifier.parameters()):
        assert torch.equal(p, q), name
