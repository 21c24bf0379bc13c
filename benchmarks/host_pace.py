"""Whether eager inference is paced by the host: each run's host time next to its GPU time.

For each run of the inference benchmark's setup (`infer.py`: a Llama-3.2-1B-shaped model,
bf16, r = 16 on all seven projections, 16 adapters) this prints three medians:

- eager: the synchronised wall time of a call, as `infer.py` times it;
- host: the time the call's Python takes to return while the GPU is still busy with a
  long sleep kernel queued ahead of it, so the host never waits for the GPU. It is the
  host's cost of issuing the call. A host time near the sleep's length means the call
  waited for the GPU inside (a synchronisation), or its launches filled the queue;
- GPU: the call replayed from a CUDA graph (prefill only): the GPU's own cost.

Where host ≥ GPU, the eager call runs at the host's pace and trimming host time pays;
where host < GPU, the eager time above the GPU time comes from elsewhere. On the H200 of
benchmarks/RESULTS.md (fifteenth set) every prefill's host time was the sleep's length or
a large part of it: the transformers forward waits for the GPU inside, so the host column
there says only that; the eager and GPU columns, side by side, are what answer the question.
Decode is left to `infer.py`, which times it eagerly and replayed.

    PYTHONPATH=src python benchmarks/host_pace.py [--reps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from infer import N_ADAPTERS, build_adapted, build_base, prefill
from train_step import capture, llama_1b_config, replay_times

SLEEP_S = 0.25  # the GPU's head start: longer than any call's host time


def sleep_cycles(seconds: float) -> int:
    """Cycles of `torch.cuda._sleep` that last about `seconds` on this GPU (calibrated once)."""
    cycles = 10_000_000
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    return int(cycles * seconds / (time.perf_counter() - t0))


def eager_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def host_s(fn, reps: int, cycles: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-prefill-siblings", action="store_true",
                    help="each prefill-sized layer call runs its own shrink (lorakit.ops.multi.PREFILL_SIBLINGS = False)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.no_prefill_siblings:
        from lorakit.ops import multi

        multi.PREFILL_SIBLINGS = False
    import transformers

    import lorakit

    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} transformers {transformers.__version__} "
          f"lorakit from {lorakit.__file__}", file=sys.stderr)
    g = torch.Generator(device="cuda").manual_seed(1)
    vocab = llama_1b_config().vocab_size
    ids = torch.randint(1, vocab, (16, 512), device="cuda", generator=g)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    base = build_base()
    lk = build_adapted(names)
    cycles = sleep_cycles(SLEEP_S)

    def routed(fn):
        def run():
            with lorakit.route(lk, names):
                return fn()
        return run

    prefill_runs = {"prefill, base": lambda: prefill(base, ids),
                    "prefill, 1 adapter unmerged": lambda: prefill(lk, ids),
                    "prefill, 16 adapters (route)": routed(lambda: prefill(lk, ids))}

    rows = []
    for name, fn in prefill_runs.items():
        for _ in range(3):
            fn()
        eager, host = eager_s(fn, args.reps), host_s(fn, args.reps, cycles)
        if "route" in name:
            with lorakit.route(lk, names):
                graph = capture(lambda: prefill(lk, ids), 2)
                gpu = statistics.median(replay_times(graph, args.reps, 1))
        else:
            graph = capture(fn, 2)
            gpu = statistics.median(replay_times(graph, args.reps, 1))
        del graph
        rows.append(dict(run=name, eager_ms=1e3 * eager, host_ms=1e3 * host, gpu_ms=1e3 * gpu))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n# sleep ahead of each host timing: {SLEEP_S * 1e3:.0f} ms")
    print(f"{'run':<40} {'eager ms':>9} {'host ms':>9} {'GPU ms':>9} {'host/GPU':>9}")
    for r in rows:
        gpu = "" if r["gpu_ms"] is None else f"{r['gpu_ms']:9.3f}"
        ratio = "" if r["gpu_ms"] is None else f"{r['host_ms'] / r['gpu_ms']:9.2f}"
        print(f"{r['run']:<40} {r['eager_ms']:9.3f} {r['host_ms']:9.3f} {gpu:>9} {ratio:>9}")


if __name__ == "__main__":
    main()
