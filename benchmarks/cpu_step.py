"""CPU: one training step (forward + backward) of a MiniLM-shaped BERT with LoRA, a lorakit switch
on and off, the two alternated in one process so the machine's drift falls on both alike:

    python benchmarks/cpu_step.py                     # the q/k/v node (fusion.SHARED_INPUT_NODE), p = 0 and 0.1

Random weights of all-MiniLM-L6-v2's shape (6 layers, hidden 384), batch 16 × 128, r = 8 on
query, key, value and dense, as the bundled default trains.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

import lorakit
from lorakit import fusion


def main(dropouts: list[float], reps: int) -> None:
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dropout':>7} {'q/k/v node':>10} {'median ms':>10} {'min ms':>8}")
    for p in dropouts:
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                         num_labels=2)
        config = lorakit.LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=["query", "key", "value", "dense"],
                                    task_type="SEQ_CLS")
        model = lorakit.inject(BertForSequenceClassification(cfg), config).train()
        ids, labels = torch.randint(0, cfg.vocab_size, (16, 128)), torch.randint(0, 2, (16,))

        def step():
            model(input_ids=ids, labels=labels).loss.backward()

        times: dict[bool, list[float]] = {True: [], False: []}
        try:
            for on in (True, False):  # warm-up
                fusion.set_shared_input_node(on)
                step()
            for _ in range(reps):
                for on in (True, False):
                    fusion.set_shared_input_node(on)
                    t = time.perf_counter()
                    step()
                    times[on].append(time.perf_counter() - t)
        finally:
            fusion.set_shared_input_node(True)
        for on in (True, False):
            print(f"{p:7.2f} {'on' if on else 'off':>10} {statistics.median(times[on]) * 1e3:10.1f} "
                  f"{min(times[on]) * 1e3:8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dropouts", default="0,0.1")
    parser.add_argument("--reps", type=int, default=12)
    args = parser.parse_args()
    main([float(p) for p in args.dropouts.split(",")], args.reps)
