"""lorakit's own host cost, measured on the CPU: microseconds of Python and torch dispatch per call.

An eager GPU step is paced by its host (benchmarks/RESULTS.md), and most of that host time
is Python and dispatcher work that runs the same on any machine. This script measures it
here, on tensors so small that arithmetic is negligible, in two ways:

- "cpu": the CPU path as it runs on this machine;
- "kernel": the GPU path's code (the Triton branch of every op) with each Triton launch
  replaced by a no-op, so what is timed is lorakit's Python and the torch ops around the
  launches, not the launches themselves (those cost about 44 µs each on the H200 hosts;
  `host_cost.py` measures them there). Its outputs are garbage and are not used.

Rows: one LoRA layer's forward + backward against a frozen nn.Linear; a 4-block Llama-shaped
training step (28 LoRA layers) against the frozen model's forward + activation backward;
a mixed-batch (16 adapters) forward of 64 one-token rows and of 16 rows of 32 tokens
against the same model with adapters disabled. Each figure is the best of `--repeats`
timings. To compare two trees, run it with each on PYTHONPATH, alternating:

    PYTHONPATH=src python benchmarks/host_cpu.py
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # lets the Triton branch run on CPU tensors

import torch  # noqa: E402
from torch import nn  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def best_us(fn, calls: int, repeats: int) -> float:
    for _ in range(max(2, calls // 10)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return 1e6 * best


def stub_launches() -> None:
    """Replace every Triton kernel of lorakit's ops with a launch that does nothing."""
    from lorakit.ops import fused, multi
    from lorakit.ops import triton_kernels as tk

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (tk, multi):
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())
    fused.use_kernels_on_cpu(True)


def layer_rows(dtype: torch.dtype, calls: int, repeats: int) -> dict[str, float]:
    import lorakit

    x = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    frozen = nn.Linear(16, 16, bias=False, dtype=dtype).requires_grad_(False)
    rows = {"frozen nn.Linear fwd+bwd": best_us(lambda: frozen(x).sum().backward(), calls, repeats)}
    for p in (0.0, 0.1):
        model = nn.Sequential(nn.Linear(16, 16, bias=False, dtype=dtype))
        lorakit.inject(model, lorakit.LoraConfig(r=16, target_modules=["0"], lora_dropout=p))
        model.train()
        rows[f"LoRA layer fwd+bwd, p={p}"] = best_us(lambda m=model: m(x).sum().backward(), calls, repeats)
    return rows


def llama_config():
    import transformers

    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=64, num_labels=2, pad_token_id=0)


def step_rows(dtype: torch.dtype, calls: int, repeats: int) -> dict[str, float]:
    import transformers

    import lorakit

    cfg = llama_config()
    ids = torch.randint(1, 64, (2, 8))
    floor = transformers.LlamaForSequenceClassification(cfg).to(dtype).requires_grad_(False)
    emb = floor.get_input_embeddings()

    def floor_step():
        floor(inputs_embeds=emb(ids).detach().requires_grad_(True)).logits.float().sum().backward()

    rows = {"4-block step, frozen floor": best_us(floor_step, calls, repeats)}
    for p in (0.0, 0.1):
        model = transformers.LlamaForSequenceClassification(cfg).to(dtype)
        lorakit.inject(model, lorakit.LoraConfig(r=8, lora_dropout=p, target_modules=TARGETS))
        model.train()
        rows[f"4-block step, lorakit p={p}"] = best_us(
            lambda m=model: m(input_ids=ids).logits.float().sum().backward(), calls, repeats)
    return rows


def route_rows(dtype: torch.dtype, calls: int, repeats: int) -> dict[str, float]:
    import transformers

    import lorakit

    model = transformers.LlamaForCausalLM(llama_config()).to(dtype).eval()
    names = [f"a{i}" for i in range(16)]
    for name in names:
        lorakit.inject(model, lorakit.LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False),
                       adapter_name=name)
    rows = {}
    for label, shape in (("decode 64 x 1", (64, 1)), ("prefill 16 x 32", (16, 32))):
        ids = torch.randint(0, 64, shape)
        with torch.no_grad():
            with lorakit.disable_adapters(model):
                rows[f"forward {label}, adapters off"] = best_us(lambda: model(input_ids=ids, use_cache=False),
                                                                 calls, repeats)
            with lorakit.route(model, [names[i % 16] for i in range(shape[0])]):
                rows[f"forward {label}, 16 adapters routed"] = best_us(
                    lambda: model(input_ids=ids, use_cache=False), calls, repeats)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["cpu", "kernel", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    modes = ["cpu", "kernel"] if args.mode == "both" else [args.mode]
    results: dict[str, float] = {}
    for mode in modes:  # "kernel" last: its stubs stay in place for the rest of the process
        if mode == "kernel":
            stub_launches()
        # The kernel branch runs half-precision compute with float32 adapters, as on the GPU;
        # the mixed-batch rows run in float32 (bfloat16 matmuls are slow on a CPU).
        dtype = torch.float32 if mode == "cpu" else torch.bfloat16
        rows = {**layer_rows(dtype, 2000, args.repeats), **step_rows(dtype, 30, args.repeats)}
        if mode == "kernel":
            rows.update(route_rows(torch.float32, 30, args.repeats))
        results.update({f"{mode}: {k}": v for k, v in rows.items()})
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread; best of {args.repeats}")
    print(f"{'row':<58} {'µs per call':>11}")
    for name, value in results.items():
        print(f"{name:<58} {value:>11.1f}")


if __name__ == "__main__":
    main()
