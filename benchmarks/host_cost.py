"""Host cost of launching each piece of lorakit's LoRA step: microseconds of CPU time per call.

Every call here works on tensors so small that the GPU finishes each kernel long before
the host has issued the next one, so wall time over many calls, synchronised once at the
end, is the host's cost of issuing the call (Python, the dispatcher, the launch). An
eager training step whose host cost exceeds its GPU time runs at the host's pace; these
numbers say what each launch adds to that pace.

    PYTHONPATH=src python benchmarks/host_cost.py
    PYTHONPATH=src python benchmarks/host_cost.py --profile   # also where a LoRA layer's host time goes
"""

from __future__ import annotations

import time

import torch
from torch import nn


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / n


def print_profile(fn, calls: int, warm: int, rows: int, stream=None) -> None:
    """cProfile of `calls` calls of fn() after `warm` unprofiled ones, synchronised at the end;
    the `rows` functions with the most time of their own, to `stream` (default stdout)."""
    import cProfile
    import pstats

    for _ in range(warm):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof, stream=stream).sort_stats("tottime").print_stats(rows)


def main(profile: bool = False) -> None:
    import lorakit
    from lorakit.ops import fused
    from lorakit.ops import triton_kernels as tk

    dev, bf = "cuda", torch.bfloat16
    w = torch.randn(64, 64, device=dev, dtype=bf)
    a32 = torch.randn(16, 64, device=dev)
    b32 = torch.randn(64, 16, device=dev)
    a, b = a32.to(bf), b32.to(bf)
    x = torch.randn(32, 64, device=dev, dtype=bf)
    out = torch.empty_like(w)
    rows = {
        "empty kernel-free call (torch.empty)": lambda: torch.empty(64, 64, device=dev, dtype=bf),
        "cast fp32 -> bf16 (.to)": lambda: a32.to(bf),
        "GEMM (x @ w.T)": lambda: x @ w.T,
        "addmm, scale in the epilogue": lambda: torch.addmm(x.new_empty(()), x, w.T, beta=0, alpha=2.0),
        "W_eff by the Triton kernel": lambda: tk.build_w_eff(w, a, b, 2.0, out=out, use_kernel=True),
        "W_eff by torch.addmm": lambda: torch.addmm(w, b, a, alpha=2.0),
    }
    if fused._mm_out_dtype_ok(w.device):
        rows["GEMM writing fp32 from bf16 (out_dtype)"] = lambda: torch.addmm(
            x.new_empty((), dtype=torch.float32), x.T, x, out_dtype=torch.float32, beta=0, alpha=2.0)

    lin = nn.Linear(64, 64, bias=False, device=dev, dtype=bf).requires_grad_(False)
    model = nn.Sequential(nn.Linear(64, 64, bias=False, device=dev, dtype=bf))
    lorakit.inject(model, lorakit.LoraConfig(r=16, target_modules=["0"]))
    xg = x.detach().requires_grad_(True)

    def linear_step():
        lin(xg).sum().backward()

    def lora_step():
        model(xg).sum().backward()

    rows["nn.Linear forward + backward (frozen W)"] = linear_step
    rows["lorakit LoraLinear forward + backward"] = lora_step

    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import fusion

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    with torch.device(dev):
        llama = LlamaForCausalLM(cfg).to(bf)
    lorakit.inject(llama, lorakit.LoraConfig(r=16, target_modules=["gate_proj", "up_proj", "down_proj"]))
    mlp = llama.model.layers[0].mlp
    whole_default = fusion.WHOLE_MLP_NODE

    def mlp_step(whole: bool):
        def run():
            fusion.set_whole_mlp_node(whole)
            mlp(xg).sum().backward()
        return run

    rows["gated MLP, LoRA on all three, forward + backward: one node"] = mlp_step(True)
    rows["the same as three nodes (gate, up, down)"] = mlp_step(False)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    if profile:
        print_profile(lora_step, calls=500, warm=50, rows=18)
    print(f"\n{'call':<60} {'µs per call':>11}")
    for name, fn in rows.items():
        print(f"{name:<60} {per_call_us(fn):>11.1f}")
    fusion.set_whole_mlp_node(whole_default)  # the MLP rows switch it per call


if __name__ == "__main__":
    import sys

    main(profile="--profile" in sys.argv)
