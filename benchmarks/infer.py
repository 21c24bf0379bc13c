"""GPU inference benchmark: base model, merged, one unmerged adapter and mixed batches, lorakit vs PEFT.

Setup: a Llama-3.2-1B-shaped LlamaForCausalLM with random weights in bf16, LoRA r=16
(alpha 32) on all seven projections, 16 adapters with random non-zero weights of a trained
adapter's size (ΔW about 5% of W, see `realistic_b`). Measured
one after another in this one process on the same inputs:

- prefill, batch 16 × 512 (logits of the last position only, as a server computes them):
  base, lorakit merged, lorakit one adapter unmerged, lorakit 16 distinct adapters (one per
  row, `lorakit.route`), PEFT one adapter unmerged, PEFT 16 adapters (`adapter_names=`);
- decode with a KV cache, batch 64 (16 adapters, 4 rows each), 128 new tokens after a
  32-token prompt, greedy: time per step for base, lorakit mixed and PEFT mixed;
- the same decode with each step replayed from one CUDA graph (static KV cache), for base
  and lorakit mixed: the GPU's own cost of a step, with no host launches; once captured
  here step by step, and once through the shipped helper `lorakit.graphed_generate`.

Each run has its own copy of the model (base, lorakit with 16 adapters, lorakit merged,
PEFT). Times: medians after warm-up, CUDA-synchronised wall clock; the runs of each kind
are interleaved round by round, so that slow drift of the GPU's clocks over the run
falls on all of them alike.

    PYTHONPATH=src python benchmarks/infer.py [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
from train_step import capture, llama_1b_config, replay_times

from lorakit.ops import multi

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTERS = 16
DEVICE = "cuda"


def build_base():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        return LlamaForCausalLM(llama_1b_config()).to(torch.bfloat16).eval()


def build_adapted(names):
    """The base model with one adapter per name (r = 16, alpha 32, all seven projections, B as
    `realistic_b` makes it), the first set active."""
    import lorakit

    lk = build_base()
    for name in names:
        lorakit.inject(lk, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                              init_lora_weights="gaussian"), name)
    lorakit.set_adapter(lk, names[0])
    realistic_b(lk)
    return lk


def realistic_b(model, std: float = 5e-4) -> None:
    """Give every adapter's B random values of standard deviation `std` (A is already random).

    With A ~ N(0, 1/r) and s = 2, ΔW's entries then have a standard deviation of about 2·std,
    5% of the random W's 0.02: a trained adapter's small change, so that activations stay
    like the base model's. (A GEMM's speed depends on its data: with ΔW as large as W the
    merged model alone ran 7% slower than the base, the same kernels on other values.)
    """
    g = torch.Generator(device=DEVICE).manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std, generator=g)


def timed(fns: dict, warm: int, reps: int, rounds: int = 5) -> dict:
    """Median seconds of each `fns[name]()`, the runs interleaved: `rounds` rounds, each
    timing every function `reps // rounds` times in turn, after `warm` calls of each.

    Interleaving spreads slow drift (clocks, temperature) over every run alike instead of
    charging it to whichever ran last.
    """
    for fn in fns.values():
        for _ in range(warm):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(max(1, reps // rounds)):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def interleaved_samples(fns: dict, rounds: int, label: str) -> dict:
    """Each `fns[name]()`'s results (a list of seconds, or one), `rounds` rounds with every function
    called in turn each round, as in `timed`. A function that raises is left out from then on,
    with a line why, and the other rows are kept."""
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if samples[name] is None:
                continue
            try:
                got = fn()
            except Exception as exc:  # say why and keep the other rows
                print(f"# {label} {name} failed: {type(exc).__name__}: {exc}"[:400], file=sys.stderr)
                samples[name] = None
                continue
            samples[name] += got if isinstance(got, list) else [got]
    return {name: t for name, t in samples.items() if t}


def graphed_times(fns: dict, reps: int, rounds: int = 5, warm: int = 2, contexts: dict | None = None) -> dict:
    """Median seconds of each `fns[name]()` replayed from a CUDA graph: the GPU's own cost, with
    no host launches. Interleaved as in `timed`: each of `rounds` rounds captures every function
    anew (inside `contexts[name]()`, if given, which stays open while its graph replays) and
    replays it `reps // rounds` times, so drift of the GPU's clocks falls on all alike. A
    function that cannot be captured is left out, with a line why."""
    contexts = contexts or {}

    def replays(name, fn):
        def run():
            with contexts.get(name, contextlib.nullcontext)():
                graph = capture(fn, warm)
                times = replay_times(graph, max(1, reps // rounds), 1)
                del graph
            return times
        return run

    samples = interleaved_samples({name: replays(name, fn) for name, fn in fns.items()}, rounds, "graphed")
    return {name: statistics.median(t) for name, t in samples.items()}


def prefill(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, logits_to_keep=1, use_cache=False, **kw).logits


def decode_run(model, prompt, steps: int, **kw) -> float:
    """Seconds per decode step: a prompt prefill, then `steps` one-token steps with the KV cache."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, **kw)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps


def graphed_decode_run(model, prompt, steps: int, warm: int = 3) -> float:
    """Seconds per decode step when each step is replayed from one CUDA graph (static KV cache):
    what the step's kernels cost on the GPU with no host launches."""
    from transformers import StaticCache

    n = prompt.shape[1]
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=n + warm + steps + 2)
        pos = torch.arange(n, device=prompt.device)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, cache_position=pos)
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.tensor([n], device=prompt.device)

        def step():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=pos).logits
            ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
            pos.add_(1)

        graph = capture(step, warm)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps


def profile_host(base_prefill, mixed_prefill, base_decode, mixed_decode) -> None:
    """cProfile (to stderr) of eager prefill and eager decode, base then lorakit's route: where the
    host's time goes when the eager rows are bound by it."""
    from host_cost import print_profile

    for name, fn in (("prefill, base", base_prefill), ("prefill, route", mixed_prefill),
                     ("decode (8 steps), base", base_decode), ("decode (8 steps), route", mixed_decode)):
        print(f"# host profile: {name}, 3 calls", file=sys.stderr)
        print_profile(fn, calls=3, warm=1, rows=14, stream=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--peft-decode-steps", type=int, default=32, help="PEFT's mixed decode is slow; fewer steps")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-graphs", action="store_true", help="leave out the CUDA-graph decode rows")
    parser.add_argument("--group-configs", default="64:4,256:4,128:8",
                        help="tiles of the graphed grouped decode rows besides the configured one, BN:WARPS, "
                        "comma-separated")
    parser.add_argument("--profile-host", action="store_true",
                        help="also print where the host's time goes (cProfile) in eager prefill and decode")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import transformers

    import lorakit

    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} transformers {transformers.__version__}",
          file=sys.stderr)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    vocab = llama_1b_config().vocab_size
    ids = torch.randint(1, vocab, (16, 512), device=DEVICE, generator=g)
    prompt = torch.randint(1, vocab, (64, 32), device=DEVICE, generator=g)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    prefill_rows = names  # 16 rows, 16 distinct adapters
    decode_rows = [names[i % N_ADAPTERS] for i in range(64)]
    rows: list[dict] = []

    def add(kind, run, seconds, **extra):
        rows.append(dict(kind=kind, run=run, ms=1000 * seconds, **extra))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    base = build_base()
    lk = build_adapted(names)
    merged = build_base()
    lorakit.inject(merged, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                              init_lora_weights="gaussian"))
    realistic_b(merged)
    # Two controls for "merged = base": a second copy of the base model (how much two copies of
    # the same model differ) and the merged weights in the plain model, no lorakit layers left.
    base2 = build_base()
    plain_merged = build_base()
    lorakit.inject(plain_merged, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                    init_lora_weights="gaussian"))
    realistic_b(plain_merged)
    plain_merged = lorakit.unload(plain_merged, merge=True)
    lorakit.merge(merged, keep_original=False)

    def mixed_prefill():
        with lorakit.route(lk, prefill_rows):
            prefill(lk, ids)

    from lorakit.ops import triton_kernels as tk

    def cast_first():
        """The unmerged adapter with A and B cast to bf16 in launches of their own before the
        W + s·B·A kernel, as before the kernel read float32 factors itself (a control)."""
        real = tk.build_w_eff
        tk.build_w_eff = lambda w, a, b, s, **k: real(w, a.to(w.dtype), b.to(w.dtype), s, **k)
        try:
            return prefill(lk, ids)
        finally:
            tk.build_w_eff = real

    runs = {"base": lambda: prefill(base, ids), "base, second copy": lambda: prefill(base2, ids),
            "merged weights, plain model": lambda: prefill(plain_merged, ids),
            "lorakit merged": lambda: prefill(merged, ids),
            "lorakit 1 adapter unmerged": lambda: prefill(lk, ids),
            "lorakit 1 adapter, A and B cast first": cast_first, "lorakit 16 adapters (route)": mixed_prefill}
    pm = None
    if not args.skip_peft:
        import peft

        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights="gaussian")
        pm = peft.get_peft_model(build_base(), cfg, adapter_name=names[0])
        for name in names[1:]:
            pm.add_adapter(name, cfg)
        realistic_b(pm)
        pm.set_adapter(names[0])
        pm.eval()
        runs["PEFT 1 adapter unmerged"] = lambda: prefill(pm, ids)
    for run, seconds in timed(runs, 3, args.reps).items():
        add("prefill", run, seconds)
    if not args.skip_graphs:
        graph_fns = {k: runs[k] for k in ("base", "base, second copy", "merged weights, plain model",
                                          "lorakit merged", "lorakit 1 adapter unmerged",
                                          "lorakit 1 adapter, A and B cast first")}
        graph_fns["lorakit 16 adapters (route)"] = lambda: prefill(lk, ids)
        # one route context for warm-up, capture and replays: the index tensors the graph reads stay alive
        graphed = graphed_times(graph_fns, args.reps,
                                contexts={"lorakit 16 adapters (route)": lambda: lorakit.route(lk, prefill_rows)})
        for run, seconds in graphed.items():
            add("prefill, CUDA graph", run, seconds)
    if pm is not None:
        add("prefill", "PEFT 16 adapters (adapter_names)",
            timed({"peft": lambda: prefill(pm, ids, adapter_names=prefill_rows)}, 2, max(3, args.reps // 4),
                  rounds=1)["peft"])

    def mixed_decode(steps):
        with lorakit.route(lk, decode_rows):
            return decode_run(lk, prompt, steps)

    def forced(fn, **settings):
        """fn run with some of lorakit.ops.multi's decode switches set: DECODE_GROUPED, DECODE_SIBLINGS,
        GROUP_CONFIG (the grouped expand kernel's tiles)."""
        def run(*a):
            defaults = {k: getattr(multi, k) for k in settings}
            for k, v in settings.items():
                setattr(multi, k, v)
            try:
                return fn(*a)
            finally:
                for k, v in defaults.items():
                    setattr(multi, k, v)
        return run

    decode_runs = {"base": lambda s: decode_run(base, prompt, s), "lorakit 16 adapters (route)": mixed_decode,
                   "lorakit 16 adapters, kernel, each layer alone": forced(mixed_decode, DECODE_SIBLINGS=False),
                   "lorakit 16 adapters, dense expand (no kernel)": forced(mixed_decode, DECODE_GROUPED=False)}
    for fn in decode_runs.values():
        fn(4)  # warm-up
    samples = {run: [] for run in decode_runs}
    for _ in range(3):  # interleaved, as in `timed`
        for run, fn in decode_runs.items():
            samples[run].append(fn(args.decode_steps))
    for run, t in samples.items():
        add("decode", run, statistics.median(t))
    if pm is not None:
        decode_run(pm, prompt, 2, adapter_names=decode_rows)
        add("decode", "PEFT 16 adapters (adapter_names)",
            decode_run(pm, prompt, args.peft_decode_steps, adapter_names=decode_rows))

    if not args.skip_graphs:
        def graphed_mixed():
            with lorakit.route(lk, decode_rows):
                return graphed_decode_run(lk, prompt, args.decode_steps)

        graph_runs = [("base", lambda: graphed_decode_run(base, prompt, args.decode_steps)),
                      ("lorakit 16 adapters (route)", graphed_mixed),
                      ("lorakit 16 adapters, kernel, each layer alone", forced(graphed_mixed, DECODE_SIBLINGS=False)),
                      ("lorakit 16 adapters, dense expand (no kernel)", forced(graphed_mixed, DECODE_GROUPED=False))]
        for spec in args.group_configs.split(","):
            cfg = dict(zip(("BN", "num_warps"), map(int, spec.split(":"))))
            graph_runs.append((f"lorakit 16 adapters, grouped BN={cfg['BN']} warps={cfg['num_warps']}",
                               forced(graphed_mixed, GROUP_CONFIG=cfg)))
        # each run captures its own graph and cache
        for run, t in interleaved_samples(dict(graph_runs), 3, "graphed decode of").items():
            add("decode, CUDA graph", run, statistics.median(t))

    if not args.skip_graphs:
        # The shipped helper, lorakit.graphed_generate: prefill, two eager warm-up steps, capture, then
        # replays. "per step": its own synchronised replay time over the replay count (`timings`);
        # "whole call": the call's wall time over its new tokens (prefill, warm-up and capture included).
        def generate_call(model, rows_, n):
            t: dict = {}
            with lorakit.route(model, rows_) if rows_ else contextlib.nullcontext():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                lorakit.graphed_generate(model, prompt, max_new_tokens=n, pad_token_id=0, eos_token_id=[], timings=t)
                torch.cuda.synchronize()
            return t["replay_s"] / t["replays"], (time.perf_counter() - t0) / n

        helper_runs = {"base": (base, None), "lorakit 16 adapters (route)": (lk, decode_rows)}
        for model_, rows_ in helper_runs.values():
            generate_call(model_, rows_, 8)  # warm-up
        got = {run: ([], []) for run in helper_runs}
        for _ in range(3):  # interleaved, as in `timed`
            for run, (model_, rows_) in helper_runs.items():
                per_step, whole = generate_call(model_, rows_, args.decode_steps)
                got[run][0].append(per_step)
                got[run][1].append(whole)
        for run, (per_step, whole) in got.items():
            add("decode, lorakit.graphed_generate", run, statistics.median(per_step))
            add("decode, graphed_generate whole call", run, statistics.median(whole))
    if args.profile_host:
        profile_host(lambda: prefill(base, ids), mixed_prefill, lambda: decode_run(base, prompt, 8),
                     lambda: mixed_decode(8))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    base_ms = {r["kind"]: r["ms"] for r in rows if r["run"] == "base"}
    print(f"\n{'work':<36} {'run':<50} {'ms':>9} {'× base':>7}")
    for r in rows:
        ratio = f"{r['ms'] / base_ms[r['kind']]:>7.2f}" if r["kind"] in base_ms else "      -"
        print(f"{r['kind']:<36} {r['run']:<50} {r['ms']:>9.3f} {ratio}")
    print("(prefill: ms per forward of 16 × 512; decode: ms per step of 64 rows)")


if __name__ == "__main__":
    main()
