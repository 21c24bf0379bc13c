"""Micro-benchmark of the mixed-adapter LoRA forward (`lorakit.ops.multi`) at the Llama-3.2-1B shapes.

For each projection shape (in -> out) and mode — prefill (16 rows × 512 tokens) and decode
(64 rows × 1 token) — with 16 adapters of r = 16 in bf16 and every row using one (row i takes
adapter i mod 16), it times with CUDA events (warm-up, then the median of many runs, L2
flushed before each) the base F.linear, multi_lora_linear (shrink + expand + addmm_), the
same op on the torch path (index_select + bmm), and the shrink and expand kernels alone.
Each is captured in a CUDA graph and the replays are timed: GPU time alone, since Python and
launch overhead (tens of µs per Triton launch) exceed the GPU time of the small shapes. The
"eager" column times multi_lora_linear called from Python, overhead included. Prints ms, the
ratio to the base linear, and the kernels' effective GB/s: the bytes each must move at least
(its inputs, the adapters' tables once, its output) over its time.

    python benchmarks/micro_multi_lora.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from lorakit.ops import multi

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 512), "gate/up": (2048, 8192), "down": (8192, 2048)}
MODES = {"prefill": (16, 512), "decode": (64, 1)}  # (n_rows, seq)
_flush = None


def bench(fn, graph: bool = True, warmup: int = 25, iters: int = 200) -> float:
    """Median ms of fn() over `iters` runs after `warmup`, each timed with CUDA events after an L2 flush.

    With `graph`, fn is captured once in a CUDA graph and its replays are timed.
    """
    global _flush
    if _flush is None:
        _flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than the H100's 50 MB L2
    if graph:
        fn()  # compiles the kernels before capture
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        fn = captured.replay
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(iters):
        _flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def gbps(n_bytes: int, ms: float) -> float:
    return n_bytes / (ms * 1e-3) / 1e9


def main(n_adapters: int = 16, r: int = 16) -> None:
    dev, dt = "cuda", torch.bfloat16
    es = torch.finfo(dt).bits // 8
    print(f"{torch.cuda.get_device_name()}, {n_adapters} adapters of r={r}, {dt}")
    print(f"{'shape':<8} {'mode':<8} {'base':>7} {'multi':>7} {'ratio':>6} {'eager':>7} {'torch':>7} "
          f"{'shrink':>7} {'GB/s':>6} {'expand':>7} {'GB/s':>6}   (ms)")
    for name, (fin, fout) in SHAPES.items():
        w = torch.randn(fout, fin, device=dev, dtype=dt) * 0.02
        a_list = [torch.randn(r, fin, device=dev) * 0.02 for _ in range(n_adapters)]
        b_list = [torch.randn(fout, r, device=dev) * 0.02 for _ in range(n_adapters)]
        a_stack, b_stack, R = multi.stack_adapters(a_list, b_list, [2.0] * n_adapters, dt, dev)
        for mode, (n_rows, seq) in MODES.items():
            T = n_rows * seq
            x = torch.randn(n_rows, seq, fin, device=dev, dtype=dt)
            x2 = x.view(T, fin)
            rows = (torch.arange(n_rows, device=dev) % n_adapters).to(torch.int32)
            used = min(n_rows, n_adapters)  # adapters whose tables are read
            h = multi.lora_shrink(x2, a_stack, rows, seq)

            def torch_path():
                e = multi.lora_expand_torch(multi.lora_shrink_torch(x2, a_stack, rows, seq), b_stack, rows, seq,
                                            None, dt)
                return e.addmm_(x2, w.T)

            def call():
                return multi.multi_lora_linear(x, w, None, a_stack, b_stack, rows)

            base = bench(lambda: F.linear(x, w))
            fused = bench(call)
            eager = bench(call, graph=False)
            ref = bench(torch_path)
            shrink = bench(lambda: multi.lora_shrink(x2, a_stack, rows, seq))
            expand = bench(lambda: multi.lora_expand(h, b_stack, rows, seq, None, dt))
            shrink_bytes = T * fin * es + used * R * fin * es + T * R * 4
            expand_bytes = T * R * 4 + used * fout * R * es + T * fout * es
            print(f"{name:<8} {mode:<8} {base:7.3f} {fused:7.3f} {fused / base:6.2f} {eager:7.3f} "
                  f"{ref:7.3f} {shrink:7.3f} {gbps(shrink_bytes, shrink):6.0f} {expand:7.3f} "
                  f"{gbps(expand_bytes, expand):6.0f}")


if __name__ == "__main__":
    main()
