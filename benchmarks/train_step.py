"""GPU training-step benchmark: the frozen floor, lorakit, PEFT and full fine-tuning, side by side.

Setup (DESIGN.md §4): a Llama-3.2-1B-shaped LlamaForSequenceClassification with random
weights in bf16, batch 16 × 512, LoRA r=16 alpha=32 on all seven projections, fused
AdamW. "floor" is the frozen model's forward + activation backward (only the 2-class
head trains, and the input embeddings require grad so every block back-propagates).
Every run is measured in this one process, one after another, and the table reports
each run's step time, tokens/s and peak memory with its ratio to the floor of the same
shape and mode (eager or compiled).

    PYTHONPATH=src python benchmarks/train_step.py                   # eager, the main shape
    PYTHONPATH=src python benchmarks/train_step.py --modes eager,compiled   # also torch.compile of the whole model
    PYTHONPATH=src python benchmarks/train_step.py --modes graphed   # the whole step replayed from one CUDA graph

"graphed" captures forward, backward and the optimizer step of the eager model in one CUDA
graph and times its replays: the host launches nothing per kernel, so the step costs
what the GPU's kernels cost. Set against the eager rows it shows how much of a step is
the host issuing kernels rather than the GPU running them.
    PYTHONPATH=src python benchmarks/train_step.py --shapes 16x512,4x2048 --ranks 16,64
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_1b_config(layers: int = 16):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                       rope_theta=500000.0, tie_word_embeddings=True, num_labels=2, pad_token_id=0)


def build(method: str, r: int, dropout: float, layers: int = 16):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForSequenceClassification(llama_1b_config(layers)).to(torch.bfloat16)
    if method == "floor":
        model.requires_grad_(False)
        model.score.requires_grad_(True)
        model.enable_input_require_grads()
    elif method.startswith("lorakit"):
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS,
                                                 task_type="SEQ_CLS"))
    elif method == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                           target_modules=TARGETS, task_type="SEQ_CLS"))
    elif method != "full":
        raise ValueError(method)
    return model


def measure(method: str, bs: int, seq: int, r: int, dropout: float, compiled: bool | str, steps: int,
            warm: int, layers: int = 16) -> dict:
    """One run. "lorakit-opaque" has torch.compile call lorakit's nodes as opaque custom ops
    (fused.COMPILE_AS_CUSTOM_OPS) instead of tracing through them; "lorakit-keep-weff" keeps
    W + s·B·A from forward for backward (fused.SAVE_W_EFF); "lorakit-torch-gated" runs the
    gated MLP's elementwise work with torch ops instead of lorakit's kernels (as before them);
    "lorakit-cast-first" casts float32 A and B to bf16 in launches of their own before the
    kernels that read them (W + s·B·A; with dropout, the masked shrink and the expand), as
    before those kernels rounded them themselves; "lorakit-three-nodes" runs each gated MLP
    as three autograd nodes (gate, up, and down with the elementwise work) instead of one
    (fusion.WHOLE_MLP_NODE off), as before that node; "lorakit-one-node" runs it as one node under
    torch.compile too (fusion.WHOLE_MLP_NODE_COMPILED); "lorakit-qkv-alone" runs q_proj, k_proj and
    v_proj one by one instead of as one node (fusion.SHARED_INPUT_NODE off), as before that node."""
    from lorakit import fusion
    from lorakit.ops import fused

    tk = fused.tk
    kernels = ("build_w_eff_casts", "masked_shrink", "expand_add_")
    defaults = (fused.COMPILE_AS_CUSTOM_OPS, fused.SAVE_W_EFF, fused._gated_kernels,
                {k: getattr(tk, k) for k in kernels})
    fused.COMPILE_AS_CUSTOM_OPS = method == "lorakit-opaque"
    fused.SAVE_W_EFF = method == "lorakit-keep-weff"
    whole_mlp, whole_mlp_compiled, shared_input = (fusion.WHOLE_MLP_NODE, fusion.WHOLE_MLP_NODE_COMPILED,
                                                   fusion.SHARED_INPUT_NODE)
    fusion.set_shared_input_node(shared_input and method != "lorakit-qkv-alone")
    fusion.set_whole_mlp_node(whole_mlp and method != "lorakit-three-nodes",
                              whole_mlp_compiled or method == "lorakit-one-node")
    if method == "lorakit-torch-gated":
        fused._gated_kernels = lambda g, u, act: False
    if method == "lorakit-cast-first":
        real = defaults[3]

        def w_eff_cast_first(weight, lora_A, lora_B, scale, use_kernel=None):
            a, b = lora_A.to(weight.dtype), lora_B.to(weight.dtype)
            return tk.build_w_eff(weight, a, b, scale, use_kernel=use_kernel), a, b

        tk.build_w_eff_casts = w_eff_cast_first
        tk.masked_shrink = lambda x2, a, p, seed, scale=1.0, a_out=None: real["masked_shrink"](
            x2, a.to(x2.dtype), p, seed, scale, a_out)
        tk.expand_add_ = lambda y, h, b, b_out=None: real["expand_add_"](y, h, b.to(h.dtype), b_out)
    try:
        return _measure(method, bs, seq, r, dropout, compiled, steps, warm, layers)
    finally:
        fused.COMPILE_AS_CUSTOM_OPS, fused.SAVE_W_EFF, fused._gated_kernels = defaults[:3]
        fusion.set_whole_mlp_node(whole_mlp, whole_mlp_compiled)
        fusion.set_shared_input_node(shared_input)
        for k, fn in defaults[3].items():
            setattr(tk, k, fn)


def _measure(method: str, bs: int, seq: int, r: int, dropout: float, compiled: bool | str, steps: int,
             warm: int, layers: int = 16) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(method, r, dropout, layers)
    model.train()
    if compiled is True:
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=compiled == "graphed")
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(1, 128256, (bs, seq), device="cuda", generator=g)
    labels = torch.randint(0, 2, (bs,), device="cuda", generator=g)
    row = dict(method=method, bs=bs, seq=seq, r=r, dropout=dropout, compiled=compiled)
    if layers != 16:
        row.update(layers=layers)
    if compiled == "graphed":
        try:
            times = _graphed_times(model, opt, ids, labels, steps, warm)
        except torch.OutOfMemoryError:
            row.update(oom=True)
            times = None
        except Exception as exc:  # a model that cannot be captured: say why, keep the other rows
            row.update(error=f"{type(exc).__name__}: {exc}"[:300])
            times = None
        if times:
            step = statistics.median(times)
            row.update(step_ms=1000 * step, tok_s=bs * seq / step, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                       spread_ms=1000 * (max(times) - min(times)))
        del model, opt, params
        return row
    times = []
    try:
        for _ in range(warm + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step = statistics.median(times[warm:])
        row.update(step_ms=1000 * step, tok_s=bs * seq / step, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   spread_ms=1000 * (max(times[warm:]) - min(times[warm:])))
    except torch.OutOfMemoryError:
        row.update(oom=True)
    del model, opt, params
    return row


def capture(fn, warm: int, before=None) -> torch.cuda.CUDAGraph:
    """`fn()` captured in one CUDA graph after `warm` calls on a side stream, as capture requires;
    `before()`, if given, runs ahead of each of those calls and of the capture, outside the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm):
            if before:
                before()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if before:
        before()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_times(graph: torch.cuda.CUDAGraph, reps: int, warm: int) -> list[float]:
    """Seconds of each of `reps` synchronised replays, after `warm` untimed ones."""
    times = []
    for _ in range(warm + reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[warm:]


def _graphed_times(model, opt, ids, labels, steps: int, warm: int) -> list[float]:
    """Seconds per replay of one CUDA graph holding forward, backward and the optimizer step."""

    def step():
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()

    return replay_times(capture(step, warm, before=lambda: opt.zero_grad(set_to_none=True)), steps, warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="floor,lorakit,peft,full")
    parser.add_argument("--compiled-methods", default=None,
                        help="the methods of the compiled mode (default: --methods); compiling each takes minutes")
    parser.add_argument("--dropouts", default="0,0.1")
    parser.add_argument("--shapes", default="16x512")
    parser.add_argument("--ranks", default="16")
    parser.add_argument("--modes", default="eager",
                        help="any of eager, compiled (torch.compile of the whole model) and graphed (the eager step "
                             "captured in one CUDA graph), comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16,
                        help="decoder blocks (default %(default)s, Llama-3.2-1B's); fewer compile faster")
    parser.add_argument("--json", default=None, help="write all rows here")
    args = parser.parse_args()
    import transformers

    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} transformers {transformers.__version__}",
          file=sys.stderr)
    rows = []
    modes = args.modes.split(",")
    if not set(modes) <= {"eager", "compiled", "graphed"}:
        parser.error(f"--modes takes eager, compiled and/or graphed, found {args.modes!r}")
    for compiled, shape in [({"eager": False, "compiled": True}.get(m, m), s) for m in modes
                            for s in args.shapes.split(",")]:
        bs, seq = map(int, shape.split("x"))
        ranks = [int(r) for r in args.ranks.split(",")]
        for r in ranks:
            methods = args.compiled_methods if compiled is True and args.compiled_methods else args.methods
            for method in methods.split(","):
                if method in ("floor", "full") and r != ranks[0]:
                    continue  # no adapter: the rank does not change these runs
                dropouts = [0.0] if method in ("floor", "full") else [float(d) for d in args.dropouts.split(",")]
                for dropout in dropouts:
                    row = measure(method, bs, seq, r, dropout, compiled, args.steps, args.warm, args.layers)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if args.json:  # written after every run, so a cut-off run keeps its rows
                        with open(args.json, "w") as f:
                            json.dump(rows, f, indent=1)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    floors = {(r["bs"], r["seq"], r["compiled"]): r for r in rows if r["method"] == "floor" and "step_ms" in r}
    print(f"\n{'run':<38} {'shape':>8} {'step ms':>8} {'tok/s':>8} {'peak GiB':>9} {'time/floor':>10} {'mem/floor':>9}")
    for r in rows:
        name = f"{r['method']}{' r=%d p=%g' % (r['r'], r['dropout']) if r['method'] not in ('floor', 'full') else ''}"
        name += {True: " (compiled)", "graphed": " (graphed)"}.get(r["compiled"], "")
        shape = f"{r['bs']}x{r['seq']}"
        if r.get("oom") or r.get("error"):
            print(f"{name:<38} {shape:>8} {'OOM' if r.get('oom') else 'failed: ' + r['error'][:60]:>8}")
            continue
        f = floors.get((r["bs"], r["seq"], r["compiled"]))
        tr = f"{r['step_ms'] / f['step_ms']:.2f}" if f else "-"
        mr = f"{r['peak_gib'] / f['peak_gib']:.2f}" if f else "-"
        print(f"{name:<38} {shape:>8} {r['step_ms']:>8.1f} {r['tok_s']:>8.0f} {r['peak_gib']:>9.2f} {tr:>10} {mr:>9}")


if __name__ == "__main__":
    main()
