"""Registers, stack and shared memory of lorakit's Triton kernels at their configured tiles, for sm_90.

Needs no GPU: Triton compiles each kernel for Hopper here and its bundled cuobjdump reads the
resource usage off the cubin. Shapes are Llama-3.2-1B's (T = 16 × 512 tokens, bf16), at r = 16
unless --rank says otherwise.
A kernel that streams memory wants many warps resident; the register count bounds them:

    python benchmarks/kernel_resources.py                 # the configured tiles
    python benchmarks/kernel_resources.py --sweep         # also the tiles micro_lora_ops.py sweeps
    python benchmarks/kernel_resources.py --rank 64       # at another rank (the factor tiles grow with it)
    python benchmarks/kernel_resources.py --rank 256 --factors fp32   # float32 adapters, read as stored

The figures depend on the Triton version (printed first); the GPU machine's is the one that counts.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from lorakit.ops import multi  # noqa: E402
from lorakit.ops import triton_kernels as tk  # noqa: E402

T, HIDDEN, WIDTH, R = 8192, 2048, 8192, 16
FACTORS = "bf16"  # the dtype of A and B where a kernel reads them as they are stored (--factors)
REGISTERS_PER_SM, MAX_WARPS_PER_SM, SHARED_PER_SM = 65536, 64, 232448


def resources(fn, args: dict, constexprs: dict, num_warps: int, num_stages: int = 3) -> dict:
    """Compile `fn` for sm_90 with `args` standing for its runtime arguments (a dtype name for a
    pointer, an int or a float) specialised as Triton does (ints of 1 as constants, multiples of 16
    and pointers marked divisible by 16); returns the cubin's resource usage."""
    signature, attrs, constexprs = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name], attrs[(i,)] = "*" + value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        report = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", report)}
    threads = 32 * num_warps
    blocks = min(REGISTERS_PER_SM // max(1, usage["REG"] * threads), MAX_WARPS_PER_SM // num_warps)
    usage["warps_per_sm"] = blocks * num_warps  # bounded by registers alone
    usage["DYNAMIC"] = kernel.metadata.shared  # the shared memory a launch asks for (the pipeline's buffers)
    return usage


def cases(sweep: bool):
    """(label, kernel, args, constexprs, num_warps) for each kernel at its configured tiles (and, with
    `sweep`, the alternatives micro_lora_ops.py times)."""
    seed = dict(SEED="i64", p=0.1, mult=2.2)
    shrink = dict(X="bf16", A=FACTORS, H="bf16", A_OUT="bf16", T=T, n_in=HIDDEN, r=R, s_x0=HIDDEN, s_x1=1, s_a0=HIDDEN, s_a1=1,
                  s_h0=R, s_h1=1, **seed)
    backward = dict(DX="bf16", X="bf16", DYB="bf16", A="bf16", PART="fp32", T=T, n_in=HIDDEN, r=R, rows_per_split=64,
                    s_dx0=HIDDEN, s_dx1=1, s_x0=HIDDEN, s_x1=1, s_d0=R, s_d1=1, s_a0=HIDDEN, s_a1=1, **seed)
    gated = dict(DZ="bf16", G="bf16", U="bf16", DYB="bf16", A="bf16", DU="bf16", PART="fp32", T=T, width=WIDTH, r=R,
                 rows_per_split=64, s_d0=R, s_d1=1, s_a0=WIDTH, s_a1=1, **seed)
    expand = dict(Y="bf16", H="bf16", B=FACTORS, B_OUT="bf16", T=T, n_out=HIDDEN, r=R, s_y0=HIDDEN, s_y1=1, s_h0=R, s_h1=1, s_b0=R,
                  s_b1=1)
    w_eff = dict(W="bf16", A=FACTORS, B=FACTORS, OUT="bf16", A_OUT="bf16", B_OUT="bf16", n_out=HIDDEN, n_in=HIDDEN, r=R, scale=2.0, s_w0=HIDDEN,
                 s_w1=1, s_a0=HIDDEN, s_a1=1, s_b0=R, s_b1=1, s_o0=HIDDEN, s_o1=1)
    c = tk.MASKED_CONFIG
    yield "W + s·B·A (64 × 128 tiles)", tk._w_eff_kernel, w_eff, dict(BM=64, BN=128, BR=R, IEEE=False, WRITE_AB=False), 4
    sc = c["shrink"] if tk._br(R) < 256 else tk.MASKED_SHRINK_WIDE_CONFIG
    tiles = [(sc["BT"], sc["BK"], sc["num_warps"])]
    tiles += [(64, 64, 4), (32, 128, 4), (16, 128, 4), (32, 64, 2)] if sweep else []
    for bt, bk, w in tiles:
        yield f"masked shrink BT={bt} BK={bk} warps={w}", tk._masked_shrink_kernel, shrink, \
            dict(BT=bt, BK=bk, BR=R, IEEE=False, WRITE_A=False), w
    b = tk.masked_backward_config(R)
    tiles = [(b["BT"], b["BN"], b["num_warps"])]
    tiles += [(64, 64, 4), (64, 128, 8), (32, 64, 4), (32, 128, 8)] if sweep else []
    for bt, bn, w in tiles:
        yield f"masked backward BT={bt} BN={bn} warps={w}", tk._masked_backward_kernel, backward, \
            dict(BT=bt, BN=bn, BR=R, IEEE=False), w
    for n in (2, 3):  # the layers reading one x (gate/up; q/k/v): shrinks and backward in one pass each
        layers, outs, grads = {}, {}, {}
        for i in range(3):
            layers.update({f"A{i}": FACTORS, f"SEED{i}": "i64", f"p{i}": 0.1, f"mult{i}": 2.2, f"r{i}": R})
            outs.update({f"A_OUT{i}": "bf16", f"H{i}": "bf16"})
            grads.update({f"DYB{i}": "bf16", f"PART{i}": "fp32"})
        shrink_n = dict(X="bf16", T=T, n_in=HIDDEN, s_x0=HIDDEN, s_x1=1, **layers, **outs)
        cfg = tk.MASKED_SHRINK_SIBLINGS_CONFIG[n]
        yield f"{n} masked shrinks, one pass BT={cfg['BT']} BK={cfg['BK']} warps={cfg['num_warps']}", \
            tk._masked_shrink_siblings_kernel, shrink_n, dict(N=n, BT=cfg["BT"], BK=cfg["BK"], BR=R, IEEE=False,
                                                              WRITE_A0=False, WRITE_A1=False, WRITE_A2=False), \
            cfg["num_warps"]
        backward_n = dict(DX="bf16", X="bf16", T=T, n_in=HIDDEN, rows_per_split=64, s_dx0=HIDDEN, s_dx1=1,
                          s_x0=HIDDEN, s_x1=1, **{**layers, **{f"A{i}": "bf16" for i in range(3)}}, **grads)
        cfg = tk.MASKED_SIBLINGS_CONFIG[n]
        yield f"{n} masked backwards, one pass BT={cfg['BT']} BN={cfg['BN']} warps={cfg['num_warps']}", \
            tk._masked_backward_siblings_kernel, backward_n, dict(N=n, BT=cfg["BT"], BN=cfg["BN"], BR=R, IEEE=False), \
            cfg["num_warps"]
    for dropout in (False, True):
        cfg = tk.gated_backward_config(R, dropout)
        tiles = [(cfg["BT"], cfg["BN"], cfg["num_warps"])]
        tiles += [(32, 64, 8), (16, 64, 4), (64, 64, 8), (16, 128, 8)] if sweep else []
        for bt, bn, w in tiles:
            yield f"gated backward{', dropout' if dropout else ''} BT={bt} BN={bn} warps={w}", \
                tk._gated_backward_kernel, gated, dict(ACT=0, DROPOUT=dropout, BT=bt, BN=bn, BR=R, IEEE=False), w
    d = multi.GROUP_CONFIG
    member = dict(B0="bf16", Y0="bf16", s_y0_0=HIDDEN, n_out0=HIDDEN, B1="bf16", Y1="bf16", s_y0_1=512, n_out1=512,
                  B2="bf16", Y2="bf16", s_y0_2=512, n_out2=512)
    decode = dict(H="bf16", s_h0=3 * 16 * R, h_start=0, h_member=16 * R, ORDER="i32", STARTS="i32", blocks0=16,
                  blocks1=4, **member)
    tiles = [(d["BN"], d["num_warps"])] + ([(64, 4), (256, 4), (128, 8)] if sweep else [])
    for bn, w in tiles:
        yield f"grouped decode expand, q/k/v BN={bn} warps={w}", multi._grouped_expand_kernel, decode, \
            dict(MEMBERS=3, R=R, BT=multi.GROUP_BLOCK_T, BN=bn, IEEE=False), w
    e = tk.EXPAND_CONFIG
    yield f"expand add BT={e['BT']} BN={e['BN']} warps={e['num_warps']}", tk._train_expand_add_kernel, expand, \
        dict(BT=e["BT"], BN=e["BN"], BR=R, IEEE=False, WRITE_B=False), e["num_warps"]
    fold = dict(G="bf16", U="bf16", Z="bf16", HG="bf16", BG=FACTORS, HU="bf16", BU=FACTORS, BG_OUT="bf16",
                BU_OUT="bf16", T=T, width=WIDTH, rg=R, ru=R, s_hg0=R, s_hg1=1, s_bg0=R, s_bg1=1, s_hu0=R, s_hu1=1,
                s_bu0=R, s_bu1=1)
    f = tk.GATED_ACT_LORA_CONFIG
    yield f"gate/up expands + activation BT={f['BT']} BN={f['BN']} warps={f['num_warps']}", \
        tk._gated_act_lora_kernel, fold, dict(ACT=0, BT=f["BT"], BN=f["BN"], BRG=R, BRU=R, IEEE=False,
                                              WRITE_BG=False, WRITE_BU=False), f["num_warps"]


def main() -> None:
    global R, FACTORS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also the alternative tiles")
    parser.add_argument("--rank", type=int, default=R, help="the LoRA rank r (default %(default)s)")
    parser.add_argument("--factors", default=FACTORS, choices=["bf16", "fp32"],
                        help="the dtype of A and B where a kernel reads them as stored (float32 adapters: fp32)")
    args = parser.parse_args()
    R, FACTORS = args.rank, args.factors
    print(f"Triton {triton.__version__}, compiled for sm_90 (no GPU used), r = {R}, factors read as {FACTORS}")
    print(f"{'kernel':<52} {'regs':>5} {'stack':>6} {'shared':>7} {'launch shared':>14} {'warps/SM':>9}")
    for label, fn, kernel_args, constexprs, warps in cases(args.sweep):
        u = resources(fn, kernel_args, constexprs, warps)
        over = " (over the SM's 232,448)" if u["DYNAMIC"] > SHARED_PER_SM else ""
        print(f"{label:<52} {u['REG']:>5} {u['STACK']:>6} {u['SHARED']:>7} {u['DYNAMIC']:>14,} {u['warps_per_sm']:>9}{over}")


if __name__ == "__main__":
    main()
