"""Would launching compiled Triton kernels directly cut the eager host cost? A GPU experiment.

An eager LoRA step is paced by its host, and a Triton launch through `JITFunction.run`
cost 44 µs of host time on the H200 hosts against 20.5 µs for a cuBLAS GEMM
(`host_cost.py`, RESULTS.md eighth set). Most of that is Python: binding the arguments,
computing the specialisation key, looking the kernel up. This script takes the W + s·B·A
kernel, compiled once by a normal launch, and launches the compiled kernel directly
(`CompiledKernel.run`, as `JITFunction.run` itself ends), keyed by a specialisation key
computed here (dtypes, 16-byte alignment of pointers, integers equal to 1 or divisible
by 16, constexpr values). It prints, side by side in one run:

- host µs per call: the normal launch; the direct launch with the key computed; the
  direct launch alone (the floor of this approach); a cuBLAS GEMM for scale;
- whether the direct launch writes the same bits as the normal one, at a small and a
  Llama-sized shape, on inputs other than those it was compiled with.

Nothing in lorakit uses direct launches; this measures whether building it would pay.

    PYTHONPATH=src python benchmarks/direct_launch.py
"""

from __future__ import annotations

import inspect

import torch
from host_cost import per_call_us


def spec_key(args) -> tuple:
    """What Triton specialises a launch on, for these arguments (tensors, ints, floats, constexprs)."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            key.append(a)
        elif isinstance(a, int):
            key.append((a == 1, a % 16 == 0))
        else:
            key.append(float)
    return tuple(key)


def main() -> None:
    from lorakit.ops import triton_kernels as tk

    dev, bf = "cuda", torch.bfloat16
    kernel = tk._w_eff_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    cfg = tk.W_EFF_CONFIG

    def launch_args(w, a, b, out, scale):
        n_out, n_in = w.shape
        values = dict(W=w, A=a, B=b, OUT=out, A_OUT=out, B_OUT=out, n_out=n_out, n_in=n_in, r=a.shape[0],
                      scale=float(scale), s_w0=w.stride(0), s_w1=w.stride(1), s_a0=a.stride(0), s_a1=a.stride(1),
                      s_b0=b.stride(0), s_b1=b.stride(1), s_o0=out.stride(0), s_o1=out.stride(1), BM=cfg["BM"],
                      BN=cfg["BN"], BR=tk._br(a.shape[0]), IEEE=False, WRITE_AB=False)
        grid = (tk.cdiv(n_out, cfg["BM"]), tk.cdiv(n_in, cfg["BN"]), 1)
        return [values[n] for n in names], grid

    compiled: dict[tuple, object] = {}

    def direct(w, a, b, out, scale, with_key=True):
        args, grid = launch_args(w, a, b, out, scale)
        key = spec_key(args) if with_key else None
        k = compiled.get(key) if with_key else compiled["last"]
        if k is None:  # compile (or find) it with one normal launch
            k = kernel[grid](*args, num_warps=cfg["num_warps"])
            compiled[key] = compiled["last"] = k
            return out
        k.run(grid[0], grid[1], grid[2], torch.cuda.current_stream().cuda_stream, k.function, k.packed_metadata,
              None, None, None, *args)
        return out

    rows = []
    for n_out, n_in, r in ((64, 64, 16), (2048, 2048, 16), (8192, 2048, 16)):
        g = torch.Generator(device=dev).manual_seed(n_out)
        w = torch.randn(n_out, n_in, device=dev, generator=g).to(bf)
        a = torch.randn(r, n_in, device=dev, generator=g).to(bf)
        b = torch.randn(n_out, r, device=dev, generator=g).to(bf)
        want = tk.build_w_eff(w, a, b, 0.5, use_kernel=True)
        direct(w, a, b, torch.empty_like(w), 0.5)  # compiles, keyed
        w2, a2, b2 = w.neg(), a * 2, b.flip(0).contiguous()  # other inputs of the same specialisation
        got = direct(w2, a2, b2, torch.empty_like(w), 0.25)
        rows.append((f"same bits as a normal launch, {n_out} x {n_in}, r = {r}",
                     bool(torch.equal(got, tk.build_w_eff(w2, a2, b2, 0.25, use_kernel=True)))
                     and bool(torch.equal(direct(w, a, b, torch.empty_like(w), 0.5), want))))

    w = torch.randn(64, 64, device=dev, dtype=bf)
    a = torch.randn(16, 64, device=dev, dtype=bf)
    b = torch.randn(64, 16, device=dev, dtype=bf)
    out = torch.empty_like(w)
    x = torch.randn(32, 64, device=dev, dtype=bf)
    direct(w, a, b, out, 2.0)
    timings = {
        "normal launch (JITFunction.run)": lambda: tk.build_w_eff(w, a, b, 2.0, out=out, use_kernel=True),
        "direct launch, specialisation key computed": lambda: direct(w, a, b, out, 2.0),
        "direct launch, no key (the floor)": lambda: direct(w, a, b, out, 2.0, with_key=False),
        "cuBLAS GEMM (x @ w.T), for scale": lambda: x @ w.T,
    }
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    import triton

    print(f"# triton {triton.__version__}")
    print(f"\n{'host cost of one call':<48} {'µs':>7}")
    for name, fn in timings.items():
        print(f"{name:<48} {per_call_us(fn):>7.1f}")
    print(f"\n{'check':<60} result")
    for name, ok in rows:
        print(f"{name:<60} {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
