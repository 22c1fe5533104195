"""Smoothing op alone under torch.compile, forward and backward: GB/s vs copy.

Columns: the qat forward (RTN fake-quantization) as Inductor generates it and as the hand-written
Triton kernel (`backends/triton_fake_quant.py`) runs it, the lotion_sampled forward (stochastic
rounding) the same two ways, and the lotion backward, each against a copy of the same bytes. Bytes counted are the
fewest the op must move: a forward reads w and writes the dequantized weight; the lotion backward
reads grad, w, g and writes grad_out and g (count is 8 bytes).
Run on a GPU: python benchmarks/bench_smooth_op.py [--sizes 4096,8192]
"""
from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from triton.testing import do_bench

import lotion_fx  # noqa: F401  (registers the lowering)

SIZES = (1024, 2048, 4096, 8192)
DTYPES = (torch.float32, torch.bfloat16)
FORMATS = ("int4", "nvfp4")
BLOCKS = (32, 16)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def make_fwd(fmt: str, block: int, kernel: str):
    """The qat forward compiled: Inductor's code for the reference ("inductor") or the Triton kernel ("triton")."""
    if kernel == "triton":
        def fwd(w):
            return torch.ops.lotion_fx.rtn_quantize_triton(w, fmt, block)
    else:
        def fwd(w):
            return torch.ops.lotion_fx.rtn_quantize(w, fmt, block)
    return torch.compile(fwd, dynamic=False)


def make_sampled(fmt: str, block: int, kernel: str):
    """The lotion_sampled forward compiled: Inductor's code for the reference or the Triton kernel."""
    op = torch.ops.lotion_fx.sr_quantize_triton if kernel == "triton" else torch.ops.lotion_fx.sr_quantize

    def fwd(w, step):
        return op(w, step, fmt, block, 0)
    return torch.compile(fwd, dynamic=False)


def make_bwd(fmt: str, block: int):
    def bwd(grad, w, g, c, lam):
        return torch.ops.lotion_fx.lotion_backward(grad, w, g, c, lam, fmt, block, 0.999, 1.0, 1, True, True)
    return torch.compile(bwd, dynamic=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    args = ap.parse_args()
    from lotion_fx.backends import triton_fake_quant

    dev = "cuda"
    name = torch.cuda.get_device_name()
    rows = []
    # format and block are constants of a smoothing node, so each gets its own compiled function
    for n in map(int, args.sizes.split(",")):
        for dt in DTYPES:
            w = torch.randn(n, n, device=dev, dtype=dt)
            esz = w.element_size()
            copy_ms = do_bench(lambda: w.clone())
            copy_bw = gbps(2 * n * n * esz, copy_ms)
            torch._dynamo.reset()  # fresh compiles per shape: stay under the recompile limit
            fwds = {f: make_fwd(f, b, "inductor") for f, b in zip(FORMATS, BLOCKS)}
            tfwds = {f: make_fwd(f, b, "triton") for f, b in zip(FORMATS, BLOCKS)}
            sfwds = {f: make_sampled(f, b, "inductor") for f, b in zip(FORMATS, BLOCKS)}
            tsfwds = {f: make_sampled(f, b, "triton") for f, b in zip(FORMATS, BLOCKS)}
            bwds = {f: make_bwd(f, b) for f, b in zip(FORMATS, BLOCKS)}
            step = torch.tensor(3, device=dev)
            for fmt, blk in zip(FORMATS, BLOCKS):
                f_ms = do_bench(lambda: fwds[fmt](w))
                t_ms = do_bench(lambda: tfwds[fmt](w)) if triton_fake_quant.supports(w, fmt, blk) else float("nan")
                s_ms = do_bench(lambda: sfwds[fmt](w, step))
                ok = triton_fake_quant.supports(w, fmt, blk)
                ts_ms = do_bench(lambda: tsfwds[fmt](w, step)) if ok else float("nan")
                grad = torch.randn_like(w)
                g = torch.rand(n, n, device=dev, dtype=torch.float32)
                c = torch.tensor(10, device=dev)
                lam = torch.tensor(1.0, device=dev)
                b_ms = do_bench(lambda: bwds[fmt](grad, w, g, c, lam))
                f_bw = gbps(2 * n * n * esz, f_ms)
                t_bw = gbps(2 * n * n * esz, t_ms)
                s_bw = gbps(2 * n * n * esz, s_ms)
                ts_bw = gbps(2 * n * n * esz, ts_ms)
                b_bw = gbps(n * n * (3 * esz + 2 * 4), b_ms)
                rows.append([f"{n}x{n}", str(dt).replace("torch.", ""), fmt, f"{copy_bw:.0f}",
                             f"{f_ms * 1e3:.0f}", f"{f_bw:.0f}", f"{100 * f_bw / copy_bw:.0f}%",
                             f"{t_ms * 1e3:.0f}", f"{100 * t_bw / copy_bw:.0f}%",
                             f"{s_ms * 1e3:.0f}", f"{100 * s_bw / copy_bw:.0f}%",
                             f"{ts_ms * 1e3:.0f}", f"{100 * ts_bw / copy_bw:.0f}%",
                             f"{b_ms * 1e3:.0f}", f"{b_bw:.0f}", f"{100 * b_bw / copy_bw:.0f}%"])
    print(f"device: {name} | torch {torch.__version__}")
    print(tabulate(rows, headers=["weight", "dtype", "format", "copy GB/s", "qat fwd us (Inductor)", "fwd GB/s",
                                  "fwd/copy", "qat fwd us (Triton)", "/copy", "sampled fwd us (Inductor)", "/copy",
                                  "sampled fwd us (Triton)", "/copy",
                                  "lotion bwd us", "bwd GB/s", "bwd/copy"]))


if __name__ == "__main__":
    main()
