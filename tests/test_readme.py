"""The README's library example runs as written and prints what the README says."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_library_example_runs(tmp_path, monkeypatch):
    block = python_blocks()[0]
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})
    printed = out.getvalue().strip()
    comment = re.search(r"print\(lorakit.count_parameters\(model\)\)\s+# (.*)", block).group(1)
    assert printed == comment
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()


def test_readme_test_command_is_the_one_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "python -m pytest -q"
    assert "&& python -m pytest -q\n" in README.read_text()


def test_mixed_batch_example_runs():
    """The route example, on a tiny Llama with the two adapters it names."""
    import torch
    from tiny_models import LLAMA_TARGETS, input_ids, tiny_llama_causal

    import lorakit

    block = next(b for b in python_blocks() if "lorakit.route" in b)
    model = tiny_llama_causal()
    for name in ("support", "legal"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False), name)
    scope = {"lorakit": lorakit, "model": model, "ids": input_ids(batch=4, seq=5)}
    with torch.no_grad():
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["logits"].shape[0] == 4 and scope["out"].shape == (4, 5 + 32)
