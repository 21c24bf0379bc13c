"""Kernel-time breakdown of training steps (torch.profiler), for finding where LoRA's overhead goes.

    PYTHONPATH=src python benchmarks/profile_step.py --runs floor,lorakit:0,lorakit:0.1 [--compile]
    PYTHONPATH=src python benchmarks/profile_step.py --runs floor,lorakit:0.1,floor:0:compiled,lorakit:0.1:compiled

Each run is METHOD[:DROPOUT[:eager|compiled]] (--compile makes compiled the default); all
runs are profiled in this one process, one after another.
For each run it prints the step's wall time next to the summed kernel time (a wall time
well above the kernel time means the host is the bottleneck) and the top kernels by total
time; it ends with one table of kernel time by kind (GEMMs, lorakit's Triton kernels, the
compiler's fused kernels, attention, copies and casts, other), the runs side by side.
`--out DIR` also writes each run's full kernel table there.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import build

# (kind, pattern) in order: the first pattern a kernel's name matches gives its kind.
KINDS = [
    ("compiler-fused (inductor)", r"^triton_"),
    ("GEMM (cuBLAS/CUTLASS)", r"gemm|xmma|cutlass|cublas|sm90_|nvjet|splitKreduce"),
    ("attention", r"flash|fmha|attention|sdpa|efficient"),
    ("lorakit W_eff", r"^_w_eff_kernel"),
    ("lorakit dropout kernels", r"^_masked_|^_train_expand_add_kernel"),
    ("lorakit gated-MLP kernels", r"^_gated_"),
    ("lorakit mixed-batch kernels", r"^_shrink_kernel|^_expand|^_grouped_expand"),
    ("copies and casts", r"copy|cast|convert|Memcpy|Memset|fill"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("reductions", r"reduce|sum|norm"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other elementwise"


def profile_run(method: str, dropout: float, r: int, compiled: bool, rows: int, out: str | None,
                layers: int = 16) -> dict:
    if method == "lorakit-opaque":  # see train_step.measure
        from lorakit.ops import fused

        fused.COMPILE_AS_CUSTOM_OPS = True
    torch.cuda.empty_cache()
    model = build(method, r, dropout, layers)
    model.train()
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(1, 128256, (16, 512), device="cuda")
    labels = torch.randint(0, 2, (16,), device="cuda")

    def step():
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append(1000 * (time.perf_counter() - t0))
    wall_ms = sorted(walls)[len(walls) // 2]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernel_ms = sum(e.self_device_time_total for e in events) / 1000
    label = f"{method} p={dropout}{' compiled' if compiled else ''}"
    print(f"== {label}: wall {wall_ms:.1f} ms (median of 5), summed kernel time {kernel_ms:.1f} ms", flush=True)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=80)
    print(table, flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, re.sub(r"[^A-Za-z0-9_.-]", "_", label) + ".txt"), "w") as f:
            f.write(f"wall {wall_ms:.2f} ms, kernels {kernel_ms:.2f} ms\n")
            f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=400,
                                              max_name_column_width=200))
    kinds: dict[str, list[float]] = {}
    for e in events:
        k = kinds.setdefault(kind_of(e.key), [0.0, 0])
        k[0] += e.self_device_time_total / 1000
        k[1] += e.count
    if method == "lorakit-opaque":
        fused.COMPILE_AS_CUSTOM_OPS = False
    return dict(label=label, wall=wall_ms, kernels=kernel_ms, kinds=kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="floor,lorakit:0,lorakit:0.1",
                        help="METHOD[:DROPOUT[:eager|compiled]], comma-separated")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (fewer compile faster)")
    parser.add_argument("--rows", type=int, default=25, help="kernels printed per run")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    parser.add_argument("--out", default=None, help="a folder for each run's full kernel table")
    args = parser.parse_args()
    results = []
    for spec in args.runs.split(","):
        method, p, mode = (spec.split(":") + ["", ""])[:3]
        if mode not in ("", "eager", "compiled"):
            parser.error(f"--runs: expected METHOD[:DROPOUT[:eager|compiled]], found {spec!r}")
        compiled = mode == "compiled" or (args.compile and mode != "eager")
        results.append(profile_run(method, float(p or 0), args.r, compiled, args.rows, args.out, args.layers))
    names = [k for k, _ in KINDS] + ["other elementwise"]
    print(f"\n{'kernel time by kind, ms (launches)':<34}" + "".join(f"{r['label'][:24]:>26}" for r in results))
    for name in names:
        cells = [r["kinds"].get(name) for r in results]
        if any(cells):
            print(f"{name:<34}" + "".join(f"{c[0]:>18.2f} ({c[1]:>5})" if c else f"{'-':>26}" for c in cells))
    print(f"{'summed kernel time':<34}" + "".join(f"{r['kernels']:>26.2f}" for r in results))
    print(f"{'wall time of a step':<34}" + "".join(f"{r['wall']:>26.2f}" for r in results))


if __name__ == "__main__":
    main()
