"""What torch.compile keeps for backward: the frozen floor against lorakit, tensor by tensor.

The training benchmark's model (a Llama-3.2-1B-shaped sequence classifier, random weights,
r = 16 on all seven projections) with a few blocks, compiled whole with inductor. The
partitioner inductor runs is wrapped so that each compiled graph's saved activations (the
backward graph's inputs that are neither gradients nor parameters passed through) are
listed with their shape, dtype and the op that made them. Each run also reports the memory
held from the end of forward to backward, and the step's peak, both measured.

    PYTHONPATH=src python benchmarks/compiled_saved.py                     # GPU, bf16, 2 blocks, 16 x 512
    PYTHONPATH=src python benchmarks/compiled_saved.py --runs floor,lorakit:0,lorakit:0.1 --layers 2
    PYTHONPATH=src python benchmarks/compiled_saved.py --device cpu --dtype float32 --bs 1 --seq 128

A run is METHOD[:DROPOUT[:FLAG=VALUE...]], FLAG one of aggressive (1: the partitioner's
aggressive_recomputation on), whole_mlp (1: the gated MLP as one node under torch.compile),
norms (0: keep the norms' outputs, fusion.RECOMPUTE_NORMS off).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc

import torch
from train_step import TARGETS, llama_1b_config

_SAVED: list[list[tuple]] = []  # one list per partitioned graph: (shape, dtype, op, bytes)


def _producer(node) -> str:
    """The op that made a forward node, looking through views."""
    seen = 0
    while node.op == "call_function" and seen < 6:
        name = getattr(node.target, "__name__", str(node.target))
        if not any(v in name for v in ("view", "reshape", "transpose", "permute", "t.default", "expand", "detach",
                                       "getitem", "slice", "unsqueeze", "squeeze", "alias")):
            return name
        if not node.args or not hasattr(node.args[0], "op"):
            return name
        node, seen = node.args[0], seen + 1
    return f"{node.op}:{node.name}" if node.op != "call_function" else str(node.target)


def _recording_partition(original):
    def partition(joint_module, joint_inputs, *args, **kwargs):
        fw, bw = original(joint_module, joint_inputs, *args, **kwargs)
        fw_nodes = {n.name: n for n in fw.graph.nodes}
        rows = []
        for node in bw.graph.nodes:
            if node.op != "placeholder" or node.name.startswith("tangents"):
                continue
            val = node.meta.get("val")
            source = fw_nodes.get(node.name)
            if not isinstance(val, torch.Tensor) or source is None or source.op == "placeholder":
                continue  # a symbolic size, or a parameter / input passed through (no new memory)
            rows.append((tuple(val.shape), str(val.dtype).replace("torch.", ""), _producer(source),
                         val.numel() * val.element_size()))
        _SAVED.append(rows)
        return fw, bw

    return partition


@contextlib.contextmanager
def _flags(whole_mlp: bool, aggressive: bool, norms: bool):
    import torch._functorch.config as fconfig

    from lorakit import fusion

    before = (fusion.WHOLE_MLP_NODE, fusion.WHOLE_MLP_NODE_COMPILED, fconfig.aggressive_recomputation,
              fusion.RECOMPUTE_NORMS)
    fusion.set_whole_mlp_node(before[0], whole_mlp)
    fconfig.aggressive_recomputation = aggressive
    fusion.set_recompute_norms(norms)
    try:
        yield
    finally:
        fusion.set_whole_mlp_node(before[0], before[1])
        fconfig.aggressive_recomputation = before[2]
        fusion.set_recompute_norms(before[3])


def run(spec: str, args) -> dict:
    from transformers import LlamaForSequenceClassification

    import lorakit

    method, _, rest = spec.partition(":")
    dropout, *flags = (rest or "0").split(":")
    opts = dict(f.split("=", 1) for f in flags)
    unknown = set(opts) - {"aggressive", "whole_mlp", "norms"}
    if unknown or method not in ("floor", "lorakit"):
        raise SystemExit(f"run {spec!r}: expected floor or lorakit[:DROPOUT[:aggressive=1][:whole_mlp=1][:norms=0]]")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    torch._dynamo.reset()
    _SAVED.clear()
    config = llama_1b_config(args.layers)
    if device.type == "cpu":
        config.vocab_size = 512
    with torch.device(device):
        model = LlamaForSequenceClassification(config).to(dtype)
    if method == "floor":
        model.requires_grad_(False)
        model.score.requires_grad_(True)
        model.enable_input_require_grads()
    else:
        lorakit.inject(model, lorakit.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=float(dropout),
                                                 target_modules=TARGETS, task_type="SEQ_CLS"))
    model.train()
    compiled = torch.compile(model)
    ids = torch.randint(1, config.vocab_size, (args.bs, args.seq), device=device)
    labels = torch.randint(0, 2, (args.bs,), device=device)
    cuda = device.type == "cuda"
    with _flags(opts.get("whole_mlp") == "1", opts.get("aggressive") == "1", opts.get("norms") != "0"):
        held = peak = None
        first = None
        for _ in range(2):  # the first call compiles; the second is measured
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
            loss = compiled(input_ids=ids, labels=labels).loss
            if cuda:
                torch.cuda.synchronize()
                held = torch.cuda.memory_allocated() - start
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - start
            model.zero_grad(set_to_none=True)
            first = len(_SAVED) if first is None else first
    saved = [row for rows in _SAVED[:first] for row in rows]  # the graphs of the first call
    row = dict(run=spec, saved=saved, saved_bytes=sum(r[3] for r in saved), held_bytes=held, peak_bytes=peak)
    del model, compiled, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="floor,lorakit:0,lorakit:0.1")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks (default %(default)s)")
    parser.add_argument("--bs", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (with --dtype float32 and a small --bs/--seq)")
    import torch._functorch.config as fconfig
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config as iconfig

    # A cached compile skips the partitioner, and with it the record.
    iconfig.fx_graph_cache = False
    fconfig.enable_autograd_cache = False

    compile_fx.min_cut_rematerialization_partition = _recording_partition(compile_fx.min_cut_rematerialization_partition)
    rows = [run(spec, args) for spec in args.runs.split(",")]
    mib = 2.0 ** 20
    floor = next((r for r in rows if r["run"].startswith("floor")), None)
    for row in rows:
        print(f"\n== {row['run']}: saved activations, {args.layers} blocks, {args.bs} x {args.seq}")
        groups = collections.Counter()
        sizes = {}
        for shape, dt, op, nbytes in row["saved"]:
            groups[(shape, dt, op)] += 1
            sizes[(shape, dt, op)] = nbytes
        for (shape, dt, op), count in sorted(groups.items(), key=lambda kv: -sizes[kv[0]] * kv[1]):
            print(f"  {count:3d} x {str(shape):22s} {dt:9s} {op:45s} {count * sizes[(shape, dt, op)] / mib:9.1f} MiB")
    print(f"\n{'run':40s} {'saved MiB':>10s} {'held MiB':>10s} {'peak MiB':>10s} {'saved - floor':>14s}")
    for row in rows:
        held = "-" if row["held_bytes"] is None else f"{row['held_bytes'] / mib:.1f}"
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / mib:.1f}"
        diff = "-" if floor is None else f"{(row['saved_bytes'] - floor['saved_bytes']) / mib:+.1f}"
        print(f"{row['run']:40s} {row['saved_bytes'] / mib:10.1f} {held:>10s} {peak:>10s} {diff:>14s}")


if __name__ == "__main__":
    main()
