"""GPU inference benchmark: base model, merged, one unmerged adapter and mixed batches, lorakit vs PEFT.

Setup: a Llama-3.2-1B-shaped LlamaForCausalLM with random weights in bf16, LoRA r=16
(alpha 32) on all seven projections, 16 adapters with random non-zero weights. Measured
one after another in this one process on the same inputs:

- prefill, batch 16 × 512 (logits of the last position only, as a server computes them):
  base, lorakit merged, lorakit one adapter unmerged, lorakit 16 distinct adapters (one per
  row, `lorakit.route`), PEFT one adapter unmerged, PEFT 16 adapters (`adapter_names=`);
- decode with a KV cache, batch 64 (16 adapters, 4 rows each), 128 new tokens after a
  32-token prompt, greedy: time per step for base, lorakit mixed and PEFT mixed.

Times: medians of repeats after warm-up, CUDA-synchronised wall clock.

    PYTHONPATH=src python benchmarks/infer.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_ADAPTERS = 16


def build_base():
    from train_step import llama_1b_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(llama_1b_config()).to(torch.bfloat16).eval()


def timed(fn, warm: int, reps: int) -> float:
    """Median seconds of `fn()` over `reps` after `warm` calls."""
    times = []
    for i in range(warm + reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prefill(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, logits_to_keep=1, use_cache=False, **kw).logits


def decode_step_time(model, prompt, steps: int, **kw) -> float:
    """Seconds per decode step: a prompt prefill, then `steps` one-token steps with the KV cache."""
    from transformers import DynamicCache

    def run(n):
        with torch.no_grad():
            cache = DynamicCache()
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True, **kw)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n

    run(4)
    return statistics.median(run(steps) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--peft-decode-steps", type=int, default=32, help="PEFT's mixed decode is slow; fewer steps")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import transformers

    import lorakit

    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} transformers {transformers.__version__}",
          file=sys.stderr)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(1, 128256, (16, 512), device="cuda", generator=g)
    prompt = torch.randint(1, 128256, (64, 32), device="cuda", generator=g)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    prefill_rows = names  # 16 rows, 16 distinct adapters
    decode_rows = [names[i % N_ADAPTERS] for i in range(64)]
    rows: list[dict] = []

    def add(kind, run, seconds, **extra):
        rows.append(dict(kind=kind, run=run, ms=1000 * seconds, **extra))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    model = build_base()
    add("prefill", "base", timed(lambda: prefill(model, ids), 3, args.reps))
    add("decode", "base", decode_step_time(model, prompt, args.decode_steps))

    for _i, name in enumerate(names):
        lorakit.inject(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                 init_lora_weights=False), name)
    lorakit.set_adapter(model, names[0])
    add("prefill", "lorakit 1 adapter unmerged", timed(lambda: prefill(model, ids), 3, args.reps))

    def mixed_prefill():
        with lorakit.route(model, prefill_rows):
            prefill(model, ids)

    add("prefill", "lorakit 16 adapters (route)", timed(mixed_prefill, 3, args.reps))

    def mixed_decode():
        with lorakit.route(model, decode_rows):
            return decode_step_time(model, prompt, args.decode_steps)

    add("decode", "lorakit 16 adapters (route)", mixed_decode())
    lorakit.merge(model, names[0])
    add("prefill", "lorakit merged", timed(lambda: prefill(model, ids), 3, args.reps))
    lorakit.unmerge(model)
    model = lorakit.unload(model, merge=False)

    if not args.skip_peft:
        import peft

        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        pm = peft.get_peft_model(model, cfg, adapter_name=names[0])
        for name in names[1:]:
            pm.add_adapter(name, cfg)
        pm.set_adapter(names[0])
        pm.eval()
        add("prefill", "PEFT 1 adapter unmerged", timed(lambda: prefill(pm, ids), 3, args.reps))
        add("prefill", "PEFT 16 adapters (adapter_names)",
            timed(lambda: prefill(pm, ids, adapter_names=prefill_rows), 2, max(3, args.reps // 4)))
        add("decode", "PEFT 16 adapters (adapter_names)",
            decode_step_time(pm, prompt, args.peft_decode_steps, adapter_names=decode_rows))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    base = {r["kind"]: r["ms"] for r in rows if r["run"] == "base"}
    print(f"\n{'work':<8} {'run':<36} {'ms':>9} {'× base':>7}")
    for r in rows:
        print(f"{r['kind']:<8} {r['run']:<36} {r['ms']:>9.3f} {r['ms'] / base[r['kind']]:>7.2f}")
    print("(prefill: ms per forward of 16 × 512; decode: ms per step of 64 rows)")


if __name__ == "__main__":
    main()
