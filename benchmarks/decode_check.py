"""Why a graphed mixed decode step costs what it does: one step captured several ways, timed alike.

For the base model and lorakit with 16 adapters routed over batch 64 (the `infer.py` setup),
one decode step is captured in a CUDA graph (static KV cache) after three eager steps, and
then timed over `--steps` replays after `--warm-replays` untimed ones, each variant:

- "plain": the step `infer.py` captures (no attention mask, positions from the cache slot);
- "mask + positions": the step `lorakit.graphed_generate` captures (a (B, total) attention
  mask updated in the graph, explicit position ids, the token choice and output writes);
- "first replay": the first replay of the plain graph alone (what a timing that starts
  right after capture includes).

Variants are interleaved over three rounds; the table gives medians.

    PYTHONPATH=src python benchmarks/decode_check.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from infer import N_ADAPTERS, TARGETS, build_base, realistic_b
from train_step import capture

import lorakit


def step_times(model, prompt, steps: int, warm_replays: int, with_mask: bool) -> tuple[float, float]:
    """(seconds per replay after the untimed ones, seconds of the very first replay)."""
    from transformers import StaticCache

    rows, n = prompt.shape
    total = n + 3 + 1 + warm_replays + steps + 2
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=total)
        mask = torch.zeros(rows, total, dtype=torch.long, device=prompt.device)
        mask[:, :n] = 1
        kw = dict(attention_mask=mask) if with_mask else {}
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1,
                    cache_position=torch.arange(n, device=prompt.device), **kw)
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.tensor([n], device=prompt.device)
        position = torch.full((rows, 1), n, device=prompt.device)

        def step():
            extra = {}
            if with_mask:
                mask.index_fill_(1, pos, 1)
                extra = dict(attention_mask=mask, position_ids=position)
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=pos, **extra).logits
            ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
            pos.add_(1)
            position.add_(1)

        graph = capture(step, 3)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(warm_replays):
            graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warm-replays", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(1, 128256, (64, 32), device="cuda", generator=g)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    rows = [names[i % N_ADAPTERS] for i in range(64)]
    base = build_base()
    lk = build_base()
    for name in names:
        lorakit.inject(lk, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                              init_lora_weights="gaussian"), name)
    realistic_b(lk)
    runs = {("base", False): (base, None), ("base", True): (base, None),
            ("lorakit 16 adapters", False): (lk, rows), ("lorakit 16 adapters", True): (lk, rows)}
    got: dict = {key: ([], []) for key in runs}
    for _ in range(3):
        for key, (model, route_rows) in runs.items():
            with lorakit.route(model, route_rows) if route_rows else torch.no_grad():
                per, first = step_times(model, prompt, args.steps, args.warm_replays, key[1])
            got[key][0].append(per)
            got[key][1].append(first)
    print(f"\n{'model':<22} {'step':<18} {'ms a replay':>11} {'first replay ms':>16}")
    for (name, with_mask), (per, first) in got.items():
        print(f"{name:<22} {'mask + positions' if with_mask else 'plain':<18} "
              f"{1000 * statistics.median(per):>11.3f} {1000 * statistics.median(first):>16.3f}")


if __name__ == "__main__":
    main()
