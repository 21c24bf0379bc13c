"""Kernel-time breakdown of one training step (torch.profiler), for finding where LoRA's overhead goes.

    PYTHONPATH=src python benchmarks/profile_step.py --method lorakit --dropout 0 [--compile]
Prints the top CUDA kernels by total time, and the step's wall time next to the summed
kernel time (a wall time well above the kernel time means the host is the bottleneck).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="lorakit")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    args = parser.parse_args()
    if args.method == "lorakit-opaque":  # see train_step.measure
        from lorakit.ops import fused

        fused.COMPILE_AS_CUSTOM_OPS = True
    model = build(args.method, args.r, args.dropout)
    model.train()
    if args.compile:
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
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall_ms = 1000 * (time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernel_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1000
    print(f"== {args.method} p={args.dropout}{' compiled' if args.compile else ''}: "
          f"wall {wall_ms:.1f} ms, summed kernel time {kernel_ms:.1f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
