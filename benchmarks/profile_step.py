"""Kernel-time breakdown of one training step (torch.profiler), for finding where LoRA's overhead goes.

    PYTHONPATH=src python benchmarks/profile_step.py --method lorakit --dropout 0
Prints the top CUDA kernels by total time and the step's peak memory.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="lorakit")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = build(args.method, args.r, args.dropout)
    model.train()
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
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"== {args.method} p={args.dropout}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
