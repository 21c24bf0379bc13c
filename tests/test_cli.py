"""The `lorakit` command line: sub-commands, recipes and overrides, errors, eval and merge."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lorakit import cli
from lorakit.train import TrainConfig

RECIPES = Path(cli.__file__).parent / "recipes"


def tiny_args(model_dir: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--train-file", str(files["train"]),
            "--validation-file", str(files["validation"]), "--test-file", str(files["test"]),
            "--max-length", "32", "--batch-size", "8", "--precision", "fp32", "--threads", "1", "--out", str(out), *extra]


# -- sub-commands ------------------------------------------------------------------------------


def test_python_dash_m_lists_the_sub_commands():
    result = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "eval", "merge"):
        assert f"    {command} " in result.stdout


def test_missing_optional_commands_do_not_break_the_cli(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lorakit.params", None)  # "import lorakit.params" now fails
    monkeypatch.setitem(sys.modules, "lorakit.explain", None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "    train " in out and "    params " not in out and "    explain " not in out
    with pytest.raises(SystemExit):
        cli.main(["params"])  # not a command any more: argparse rejects it
    assert "invalid choice: 'params'" in capsys.readouterr().err


def test_present_optional_commands_are_dispatched(monkeypatch):
    seen = {}
    fake = types.ModuleType("lorakit.params")
    fake.add_arguments = lambda p: p.add_argument("--thing")
    fake.run = lambda args: seen.setdefault("thing", args.thing) and 7
    monkeypatch.setitem(sys.modules, "lorakit.params", fake)
    assert cli.main(["params", "--thing", "x"]) == 7
    assert seen == {"thing": "x"}


def test_a_broken_optional_module_is_not_hidden(monkeypatch):
    def broken(name):
        raise ModuleNotFoundError("No module named 'somedependency'", name="somedependency")

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="somedependency"):
        cli.build_parser()


# -- recipes and overrides ---------------------------------------------------------------------


def test_overrides_from_the_command_line():
    args = cli.build_parser().parse_args(["train", "--r", "32", "--lr", "1e-4", "--method", "full",
                                          "--target-modules", "query,value", "--no-eval-before",
                                          "--max-train-examples", "none", "--layers-to-transform", "0,2"])
    config = cli.config_from_args(args)
    assert (config.r, config.lr, config.method) == (32, 1e-4, "full")
    assert config.target_modules == ["query", "value"] and config.layers_to_transform == [0, 2]
    assert config.eval_before is False and config.max_train_examples is None
    assert config.model == "bundled:all-MiniLM-L6-v2" and config.recipe == "default"  # the rest from the recipe


@pytest.mark.parametrize(("values", "message"), [
    ({"r": "abc"}, "r must be an integer, got 'abc'"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"eval_before": "maybe"}, "eval_before must be true or false"),
    ({"method": "freeze-first:x"}, "method must be lora, full or freeze-first:N"),
    ({"task": "seq_cls"}, "task must be one of"),
    ({"batch_sise": "4"}, "unknown setting 'batch_sise'; did you mean 'batch_size'"),
])
def test_bad_settings_are_clear_errors(values, message):
    with pytest.raises(ValueError, match=message):
        cli.make_config(values, "command line")


def test_default_recipe():
    config = cli.load_recipe("default")
    assert config.model == "bundled:all-MiniLM-L6-v2" and config.dataset == "bundled:spam"
    assert config.method == "lora" and config.task == "seq-cls" and config.labels == ["ham", "spam"]
    assert config.max_train_examples == 2000 and config.max_length == 128 and config.batch_size == 16


def test_imdb_llama_recipe():
    config = cli.load_recipe("imdb-llama-3.2-1b")
    assert (config.model, config.dataset, config.task) == ("meta-llama/Llama-3.2-1B", "imdb", "seq-cls")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.batch_size) == (16, 32, 0.1, 16)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    text = (RECIPES / "imdb-llama-3.2-1b.toml").read_text()
    assert "--method freeze-first:12" in text and "--method full" in text
    assert cli.load_recipe(str(RECIPES / "imdb-llama-3.2-1b.toml")) == config  # by path too


def test_every_setting_has_a_flag():
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in TrainConfig.__dataclass_fields__:
        if name != "recipe":
            assert "--" + name.replace("_", "-") in help_text


# -- errors on the command line ------------------------------------------------------------------


def test_bad_data_is_one_line_and_exit_code_2(tmp_path, tiny_bert_dir, spam_files, capsys):
    missing = tmp_path / "missing.jsonl"
    args = tiny_args(tiny_bert_dir, {**spam_files, "train": missing}, tmp_path / "run")
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(missing) in err and err.startswith("lorakit train: error:")
    assert not (tmp_path / "run").exists()  # nothing left behind

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "label": "ham"}\n{"body": "no text", "label": "spam"}\n')
    assert cli.main(tiny_args(tiny_bert_dir, {**spam_files, "test": bad}, tmp_path / "run2")) == 2
    assert f"{bad}, line 2: missing column 'text'" in capsys.readouterr().err


def test_unknown_recipe_and_bad_value_exit_2(capsys):
    assert cli.main(["train", "--recipe", "no-such-recipe"]) == 2
    assert "no recipe named 'no-such-recipe'" in capsys.readouterr().err
    assert cli.main(["train", "--r", "many"]) == 2
    assert "r must be an integer" in capsys.readouterr().err


def test_resume_takes_no_settings(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path), "--lr", "1"]) == 2
    assert "give no --recipe or settings" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_divergence_exits_1_with_a_message(tmp_path, tiny_bert_dir, spam_files, capsys):
    args = tiny_args(tiny_bert_dir, spam_files, tmp_path / "run", "--lr", "1e30", "--max-grad-norm", "0",
                     "--checkpoint-every", "1", "--target-modules", "query,value", "--no-eval-before")
    assert cli.main(args) == 1
    assert "non-finite" in capsys.readouterr().err


# -- eval and merge round trips ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seq_cls_run(tmp_path_factory, tiny_bert_dir, spam_files) -> Path:
    out = tmp_path_factory.mktemp("cls") / "run"
    assert cli.main(tiny_args(tiny_bert_dir, spam_files, out, "--lr", "1e-2", "--target-modules", "query,value",
                              "--epochs", "2", "--no-eval-before")) == 0
    return out


@pytest.fixture(scope="module")
def causal_lm_run(tmp_path_factory, tiny_llama_dir, sft_files) -> Path:
    out = tmp_path_factory.mktemp("lm") / "run"
    assert cli.main(tiny_args(tiny_llama_dir, sft_files, out, "--task", "causal-lm", "--lr", "5e-3",
                              "--target-modules", "q_proj,v_proj,down_proj", "--no-eval-before")) == 0
    return out


def test_eval_matches_the_run(seq_cls_run, spam_files, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(seq_cls_run), "--data", str(spam_files["test"]), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = json.loads((seq_cls_run / "summary.json").read_text())
    assert result["examples"] == 16
    assert result["accuracy"] == summary["test_accuracy"]  # same data, same model: same answer
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert "accuracy" in capsys.readouterr().out


def test_eval_causal_lm_reports_perplexity(causal_lm_run, sft_files, tmp_path):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(causal_lm_run), "--data", str(sft_files["test"]), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    summary = json.loads((causal_lm_run / "summary.json").read_text())
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-5)


def test_merge_gives_a_plain_model_with_the_same_logits(seq_cls_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    assert cli.main(["merge", str(seq_cls_run), str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()  # no lorakit involved
    tokenizer = AutoTokenizer.from_pretrained(out)
    lora_model, _, _ = cli.load_run(seq_cls_run)
    assert any("lora_A" in n for n, _ in lora_model.named_parameters())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    batch = tokenizer(["Subject: free cash now", "Subject: meeting notes\n\nagenda attached"], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        expected, got = lora_model(**batch).logits, merged(**batch).logits
    assert not torch.allclose(expected[0], expected[1])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert merged.config.id2label == {0: "ham", 1: "spam"}


def test_merge_causal_lm(causal_lm_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert cli.main(["merge", str(causal_lm_run), str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    lora_model, tokenizer, _ = cli.load_run(causal_lm_run)
    ids = tokenizer(["what is 3 plus 4?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, lora_model(**ids).logits, rtol=0, atol=1e-5)


def test_merge_refuses_a_non_empty_directory(seq_cls_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["merge", str(seq_cls_run), str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_merge_of_a_full_run(tmp_path, tiny_bert_dir, spam_files):
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    assert cli.main(tiny_args(tiny_bert_dir, spam_files, run, "--method", "full", "--max-steps", "2",
                              "--no-eval-before")) == 0
    assert cli.main(["merge", str(run), str(tmp_path / "merged")]) == 0
    a = AutoModelForSequenceClassification.from_pretrained(run / "model")
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


# -- the bundled default, for real ----------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_default_on_a_small_subset(tmp_path):
    """`lorakit train` as shipped (bundled model and emails) on 640 emails: about 45 s on two cores.

    Measured: 58.6 % test accuracy before (the new head), 93.0 % after 40 steps (128 test emails).
    """
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "lorakit", "train", "--max-train-examples", "640",
                             "--max-eval-examples", "128", "--out", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert "test before training:" in result.stdout and "after" in result.stdout
    assert summary["steps"] == 40  # 640 emails, batch 16
    assert summary["test_accuracy"] >= 0.85 > summary["test_before_accuracy"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
