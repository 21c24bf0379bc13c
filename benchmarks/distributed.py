"""Multi-GPU benchmark: DDP scaling of a LoRA training step, and FSDP2 on a model of 8B parameters.

    PYTHONPATH=src python benchmarks/distributed.py                   # starts torchrun on 2 GPUs itself
    PYTHONPATH=src python benchmarks/distributed.py --gpus 4 --json results/distributed.json

(a) The setup of train_step.py: LlamaForSequenceClassification built from
    tests/golden/llama-3.2-1b-config.json with random weights in bf16, batch 16 × 512 per
    GPU, LoRA r=16 alpha=32 on all seven projections, fused AdamW. Tokens/s on 1 GPU (the
    other processes wait), then on all GPUs with DDP, and the scaling efficiency
    tokens/s(N) / (N × tokens/s(1)).
(b) A Llama-3.1-8B shape (hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads, vocabulary
    128256), random weights in bf16, LoRA r=16 on the seven projections, under FSDP2 on all
    GPUs: built on the meta device, sharded, then each GPU materialises only its shards.
    Peak memory per GPU and tokens/s.

Both use lorakit.distributed.wrap, as `lorakit train` does. Each step is timed between
torch.cuda.synchronize calls; after --warm steps, the median of --steps is reported.
tokens/s counts the tokens of all GPUs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

GOLDEN_1B = Path(__file__).resolve().parents[1] / "tests" / "golden" / "llama-3.2-1b-config.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_1b_config():
    from transformers import LlamaConfig

    config = LlamaConfig.from_json_file(str(GOLDEN_1B))
    config.num_labels, config.pad_token_id = 2, 0
    return config


def llama_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, num_labels=2, pad_token_id=0)


def with_lora(model, r: int):
    import lorakit

    lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="SEQ_CLS"))
    return model


def build_on(device: torch.device, config, r: int):
    """The whole model with random weights, on `device`."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    with device:
        model = LlamaForSequenceClassification(config).to(torch.bfloat16)
    return with_lora(model, r)


def build_sharded(device: torch.device, config, r: int):
    """The model under FSDP2; no GPU ever holds more than its own shards of the weights."""
    from transformers import LlamaForSequenceClassification

    from lorakit import distributed

    with torch.device("meta"):
        model = LlamaForSequenceClassification(config).to(torch.bfloat16)
    model = distributed.wrap(with_lora(model, r), "fsdp", device, model.model.layers)
    model.to_empty(device=device)  # each rank allocates its shards, uninitialised
    torch.manual_seed(dist.get_rank())  # each rank draws its own shards
    with torch.no_grad():  # as transformers and lorakit initialise them
        for name, p in model.named_parameters():
            shard = distributed.local(p)
            if "lora_B" in name:
                shard.zero_()  # training starts at ΔW = 0
            elif name.endswith("norm.weight"):
                shard.fill_(1.0)
            else:
                shard.normal_(std=config.initializer_range)
    rotary = model.model.rotary_emb  # its buffer is computed in __init__, so meta left nothing: build it again
    model.model.rotary_emb = type(rotary)(model.config).to(device)
    return model


def time_steps(model, device: torch.device, bs: int, seq: int, vocab: int, steps: int, warm: int) -> float:
    """Median seconds of a training step (forward, backward, fused AdamW step)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    g = torch.Generator(device=device).manual_seed(1 + (dist.get_rank() if dist.is_initialized() else 0))
    ids = torch.randint(1, vocab, (bs, seq), device=device, generator=g)
    labels = torch.randint(0, 2, (bs,), device=device, generator=g)
    times = []
    for _ in range(warm + steps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warm:])


def measure(name: str, build, strategy: str, gpus: int, device: torch.device, args, bs: int, seq: int) -> dict:
    """One row: the model from build() trained on `gpus` GPUs (ranks beyond them wait)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    row = dict(run=name, gpus=gpus, strategy=strategy, bs=bs, seq=seq)
    if dist.get_rank() < gpus:
        model = build()
        step = time_steps(model, device, bs, seq, model.config.vocab_size, args.steps, args.warm)
        del model
        row.update(step_ms=1000 * step, tok_s=gpus * bs * seq / step)
    peaks: list = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, torch.cuda.max_memory_allocated(device) / 2**30)
    row["peak_gib_per_gpu"] = peaks[:gpus]
    box = [row]
    dist.broadcast_object_list(box, src=0)  # rank 0 took part in every run: its row holds the times
    return box[0]


def run_benchmarks(args) -> list[dict]:
    from lorakit import distributed

    world = dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    bs, seq = map(int, args.shape.split("x"))
    fsdp_bs, fsdp_seq = map(int, args.fsdp_shape.split("x"))
    rows = [measure("llama-3.2-1b", lambda: build_on(device, llama_1b_config(), args.r), "none", 1, device, args,
                    bs, seq)]
    if world > 1:
        def ddp():
            return distributed.wrap(build_on(device, llama_1b_config(), args.r), "ddp", device, None)

        rows.append(measure("llama-3.2-1b", ddp, "ddp", world, device, args, bs, seq))
    rows.append(measure("llama-3.1-8b shape", lambda: build_sharded(device, llama_8b_config(), args.r), "fsdp",
                        world, device, args, fsdp_bs, fsdp_seq))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'run':<20} {'GPUs':>4} {'strategy':>8} {'batch/GPU':>9} {'step ms':>8} {'tokens/s':>9} "
          f"{'peak GiB/GPU':>12}")
    for r in rows:
        shape = f"{r['bs']}x{r['seq']}"
        print(f"{r['run']:<20} {r['gpus']:>4} {r['strategy']:>8} {shape:>9} {r['step_ms']:>8.1f} "
              f"{r['tok_s']:>9.0f} {max(r['peak_gib_per_gpu']):>12.2f}")
    one = next(r for r in rows if r["strategy"] == "none")
    ddp = next((r for r in rows if r["strategy"] == "ddp"), None)
    if ddp is not None:
        efficiency = ddp["tok_s"] / (ddp["gpus"] * one["tok_s"])
        print(f"DDP scaling efficiency: tokens/s({ddp['gpus']}) / ({ddp['gpus']} × tokens/s(1)) = {efficiency:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="GPUs (processes) to use; 1 checks the script alone")
    parser.add_argument("--shape", default="16x512", help="batch x sequence per GPU for the 1B model")
    parser.add_argument("--fsdp-shape", default="16x512", help="batch x sequence per GPU for the 8B shape")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha is twice it)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows here as JSON")
    args = parser.parse_args()
    if "WORLD_SIZE" not in os.environ:  # start torchrun, which runs this script once per GPU
        if torch.cuda.device_count() < args.gpus:
            parser.error(f"--gpus {args.gpus} needs that many CUDA GPUs; {torch.cuda.device_count()} are visible")
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={args.gpus}", __file__, *sys.argv[1:]])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    try:
        rows = run_benchmarks(args)
    finally:
        dist.destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        import transformers

        print(f"# {torch.cuda.get_device_name()} ×{len(rows[-1]['peak_gib_per_gpu'])}, torch {torch.__version__}, "
              f"transformers {transformers.__version__}", file=sys.stderr)
        for row in rows:
            print(json.dumps(row), file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
