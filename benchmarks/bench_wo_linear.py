"""Per-kernel times of lotion_fx::weight_only_linear at the decode / prefill shapes of bench_decode.py.

Each timing replays a CUDA graph of calls over enough distinct weight copies (>= 96 MiB in all) that
the weights come from HBM, not L2, as in a decode step. Columns: time per call, weight bytes read
(codes + scales) per second, % of the measured copy bandwidth, speed-up vs bf16 F.linear at the same
shape. `--kernels v2,v3` times each GEMV variant at M <= 16 (triton_matmul.GEMV_KERNEL: "v2" is the
tl.sum GEMV for M <= 4 and the split-K tl.dot GEMV for 4 < M <= 16, "v3" is _gemv3_kernel for every
M <= 16, "v3dot" is v3 with _gemv3dot_kernel (v3's decode, tensor-core tl.dot) for 4 < M <= 16; "v3r0" ...
"v3r4" are v3 with GEMV3_ROUND = 0 ... 4; 4 factors the block scale out) at each shape, format and M, after checking
it (one-hot columns bit-exact, random x within the fp32-accumulation bound: column "check"). `--sweep`
also tries launch configurations of the v2 GEMV (and the tl.dot GEMV at M = 8), `--sweep3` of the v3 GEMV
(M <= 16; and of v3dot at M > 4 where --kernels has it), and prints the best per shape. `--shapes` picks
layers by name (wqkv / w13: the fused projections of bench_decode.py --layout fused). GPU only. Usage:
    python benchmarks/bench_wo_linear.py [--formats int4,nvfp4,int8] [--m 1,8,512] [--kernels v2,v3,v3dot]
        [--shapes wq/wo,wk/wv,w1/w3,w2,head,wqkv,w13,8b-wqkv,8b-wo,8b-w13,8b-w2,8b-head] [--sweep] [--sweep3] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from lotion_fx.backends import torchao_export as X
from lotion_fx.backends import triton_matmul as T
from lotion_fx.reference import resolve_block

SHAPES = [(2048, 2048, "wq/wo"), (512, 2048, "wk/wv"), (8192, 2048, "w1/w3"), (2048, 8192, "w2"),
          (32000, 2048, "head")]
FUSED_SHAPES = [(3072, 2048, "wqkv"), (16384, 2048, "w13")]  # bench_decode.py --layout fused
# bench_decode.py --size 8b --layout fused (Llama-3.1-8B's shapes)
SHAPES_8B = [(6144, 4096, "8b-wqkv"), (4096, 4096, "8b-wo"), (28672, 4096, "8b-w13"), (4096, 14336, "8b-w2"),
             (128256, 4096, "8b-head")]


def copy_bandwidth() -> float:
    a = torch.empty(2**28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * 20 / (time.perf_counter() - t0)


def graph_time(calls: list, reps: int = 5) -> float:
    """Seconds per call: one CUDA graph holding every call of `calls`, replayed `reps` times."""
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / 1e3 / reps / len(calls)


def weights(n: int, k: int, fmt: str | None, copies: int) -> list:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    if fmt is None:
        return [w.clone() for _ in range(copies)]
    t = X.to_torchao(w, fmt, resolve_block(None, fmt, k), X.PACKED)
    return [X.LotionPackedTensor(t.qdata.clone(), t.scale.clone(), t.tensor_scale.clone(), t.fmt, t.block, t.dtype)
            for _ in range(copies)]


def op_calls(x: torch.Tensor, ws: list) -> list:
    if isinstance(ws[0], X.LotionPackedTensor):
        return [lambda t=t: T.weight_only_linear(x, t.qdata, t.scale, t.tensor_scale, None, t.fmt) for t in ws]
    return [lambda t=t: F.linear(x, t) for t in ws]


def time_with(module: object, knob: str, value: int, x: torch.Tensor, ws: list) -> float:
    """graph_time of the calls with the kernel-choice threshold `module.knob` set to value, then restored."""
    keep = getattr(module, knob)
    setattr(module, knob, value)
    try:
        return graph_time(op_calls(x, ws))
    finally:
        setattr(module, knob, keep)


@contextlib.contextmanager
def gemv_variant(name: str):
    """GEMV_KERNEL (and GEMV3_ROUND) for a variant name: "auto", "v2", "v3", "v3dot", "v3r0" ... "v3r3"."""
    keep = T.GEMV_KERNEL, T.GEMV3_ROUND
    rounding = name.startswith("v3r")
    T.GEMV_KERNEL, T.GEMV3_ROUND = (name[:2] if rounding else name), (int(name[3:]) if rounding else None)
    try:
        yield
    finally:
        T.GEMV_KERNEL, T.GEMV3_ROUND = keep


def check(x: torch.Tensor, t: X.LotionPackedTensor) -> str:
    """The current kernel choice against the dequantized weight: one-hot rows pick columns bit-exactly, random
    rows stay within the fp32-accumulation bound of the float64 product (as tests/test_triton_matmul.py)."""
    m, k = x.shape
    wq = T.dequantize_reference(t.qdata, t.scale, t.tensor_scale, t.fmt, x.dtype)
    run = lambda a: T.weight_only_linear(a, t.qdata, t.scale, t.tensor_scale, None, t.fmt)  # noqa: E731
    for cols in torch.randperm(k, device=x.device)[: 8 * m].reshape(-1, m):
        if not torch.equal(run(torch.nn.functional.one_hot(cols, k).to(x.dtype)), wq[:, cols].T):
            return "NOT EXACT"
    want = x.double() @ wq.double().T
    err = (run(x).double() - want).abs().max().item() / want.abs().amax().item()
    return "ok" if err <= 8e-3 else f"ERR {err:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int4,nvfp4,int8")
    ap.add_argument("--m", default="1,8,512")
    ap.add_argument("--kernels", default=None, help="GEMV variants to time at M <= 16: v2 (tl.sum GEMV for M <= 4, "
                    "tl.dot GEMV above), v3, v3dot (M > 4: v3 decode + tl.dot), auto (per shape), v3r0 ... v3r3 "
                    "(default: the library's, triton_matmul.GEMV_KERNEL)")
    ap.add_argument("--shapes", default=",".join(s[2] for s in SHAPES),
                    help="layers to time, from " + ", ".join(s[2] for s in SHAPES + FUSED_SHAPES + SHAPES_8B))
    ap.add_argument("--sweep", action="store_true", help="launch-config sweep of the v2 / tl.dot GEMVs")
    ap.add_argument("--sweep3", action="store_true", help="launch-config sweep of the v3 GEMV (M <= 16)")
    ap.add_argument("--sum8", action="store_true", help="also time M = 8 through the tl.sum GEMV (SUM_MAX_M = 8)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop sweeping after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    kernels = args.kernels.split(",") if args.kernels else [T.GEMV_KERNEL]
    for v in kernels:
        if v not in ("auto", "v2", "v3", "v3dot", "v3r0", "v3r1", "v3r2", "v3r3", "v3r4"):
            ap.error(f"unknown GEMV variant {v!r}: choose from auto, v2, v3, v3dot, v3r0, v3r1, v3r2, v3r3, v3r4")
    by_name = {s[2]: s for s in SHAPES + FUSED_SHAPES + SHAPES_8B}
    for name in args.shapes.split(","):
        if name not in by_name:
            ap.error(f"unknown shape {name!r}: choose from {', '.join(by_name)}")
    torch.manual_seed(0)
    bw = copy_bandwidth()
    title = f"{torch.cuda.get_device_name()} | torch {torch.__version__} | copy bandwidth {bw / 1e12:.2f} TB/s"
    print(title, flush=True)
    rows, lines, start = [], [], time.time()
    head = ["shape (N x K)", "layer", "M", "weights", "kernel", "us / call", "GB/s", "% of copy BW", "vs bf16",
            "check"]
    for n, k, name in (by_name[s] for s in args.shapes.split(",")):
        nbytes = {None: n * k * 2}
        copies = {}
        for fmt in [None, *args.formats.split(",")]:
            w1 = weights(n, k, fmt, 1)[0]
            nbytes[fmt] = X.nbytes(w1) if fmt else n * k * 2
            copies[fmt] = max(2, min(200, math.ceil(96 * 2**20 / nbytes[fmt])))
        for m in map(int, args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = None
            for fmt in [None, *args.formats.split(",")]:
                ws = weights(n, k, fmt, copies[fmt])
                variants = kernels if fmt and m <= T.GEMV_MAX_M else ["-"]
                times = {}
                for v in variants:
                    with gemv_variant(v if v != "-" else T.GEMV_KERNEL):
                        ok = check(x, ws[0]) if v != "-" else ""
                        times[v] = graph_time(op_calls(x, ws))
                    base = base or times[v]
                    rows.append([f"{n} x {k}", name, m, fmt or "bf16", v, f"{times[v] * 1e6:.1f}",
                                 f"{nbytes[fmt] / times[v] / 1e9:.0f}", f"{100 * nbytes[fmt] / times[v] / bw:.0f}%",
                                 f"{base / times[v]:.2f}x", ok])
                    print(rows[-1], flush=True)
                s = times.get("v2", times[variants[0]])
                if fmt and args.sweep3 and m <= T.GEMV3_MAX_M and time.time() - start < args.budget_s:
                    for v in ["v3"] + (["v3dot"] if "v3dot" in kernels and m > T.SUM_MAX_M else []):
                        lines.append(sweep3(x, ws, n, k, m, fmt, deadline=start + args.budget_s, variant=v))
                        print(lines[-1], flush=True)
                if fmt and m >= T.DEQUANT_MIN_M:  # the alternative: the tiled tl.dot GEMM, no dequant pass
                    g = time_with(T, "DEQUANT_MIN_M", 1 << 30, x, ws)
                    lines.append(f"GEMM {fmt} M={m} {n}x{k}: tiled tl.dot {g * 1e6:.1f}us vs dequant+cuBLAS "
                                 f"{s * 1e6:.1f}us (bf16 {base * 1e6:.1f}us)")
                    print(lines[-1], flush=True)
                if fmt and args.sum8 and m == 8:
                    with gemv_variant("v2"):  # v3 would take M = 8 first
                        g = time_with(T, "SUM_MAX_M", 8, x, ws)
                    lines.append(f"SUM8 {fmt} M=8 {n}x{k}: tl.sum GEMV {g * 1e6:.1f}us vs tl.dot GEMV "
                                 f"{s * 1e6:.1f}us (bf16 {base * 1e6:.1f}us)")
                    print(lines[-1], flush=True)
                if fmt and args.sweep and m <= T.GEMV_MAX_M and time.time() - start < args.budget_s:
                    with gemv_variant("v2"):  # the overrides below are v2's and the tl.dot GEMV's
                        lines.append(sweep(x, ws, n, k, m, fmt, s))
                    print(lines[-1], flush=True)
                del ws
            torch.cuda.empty_cache()
    text = title + "\n\n" + tabulate(rows, headers=head, tablefmt="github") + "\n\n" + "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


def sweep(x, ws, n, k, m, fmt, default_s) -> str:
    """Best launch config for this shape: (BLOCK_N, BLOCK_K, warps, split) or the tl.dot kernel's."""
    calls = op_calls(x, ws)
    res = []
    if m <= T.SUM_MAX_M:
        bks = (256, 512) if fmt == "int8" else (512, 1024)
        cands = list(itertools.product((4, 8, 16, 32), bks, (4, 8)))
        for (bn, bk, w), split in itertools.product(cands, (1, 2)):
            if split > 1 and triton_cdiv(k, bk) < split:
                continue
            T.GEMV_OVERRIDE = (bn, bk, w, split)
            try:
                res.append((graph_time(calls, reps=3), (bn, bk, w, split)))
            except Exception as e:  # noqa: BLE001  (a config may not compile: skip it)
                res.append((math.inf, (bn, bk, w, split, type(e).__name__)))
        T.GEMV_OVERRIDE = None
    else:
        for bn, bk, w in [(32, 256, 4), (64, 128, 4), (64, 256, 8), (16, 512, 4)]:
            T.GEMM_OVERRIDE = (16, bn, bk, w, 3)
            try:
                res.append((graph_time(calls, reps=3), (16, bn, bk, w, 3)))
            except Exception as e:  # noqa: BLE001
                res.append((math.inf, (bn, bk, w, type(e).__name__)))
        T.GEMM_OVERRIDE = None
    res.sort(key=lambda r: r[0])
    best = ", ".join(f"{c} {t * 1e6:.1f}us" for t, c in res[:4])
    return f"SWEEP {fmt} M={m} {n}x{k}: default {default_s * 1e6:.1f}us | best {best}"


def sweep3(x, ws, n, k, m, fmt, deadline: float, variant: str = "v3") -> str:
    """Best v3 launch configs for this shape: (BLOCK_N, BLOCK_W, R, warps, split, ROUND = 1), until the deadline
    (time.time()); --kernels v3r0,v3r2,v3r3 time the other roundings at the default config. M > 4: R = 1 or 2 and
    BLOCK_N * R <= 16 (BM * BLOCK_N * R accumulators per thread; more spills on sm_90). variant "v3dot" (M > 4):
    its (BLOCK_N, BLOCK_W, -, warps, split, -)."""
    calls = op_calls(x, ws)
    kw = k // (4 if fmt == "int8" else 8)
    if variant == "v3dot":
        cands = [(32, 32, 1, 4), (16, 32, 1, 4), (64, 32, 1, 4), (32, 64, 1, 4), (32, 16, 1, 4), (32, 32, 1, 8),
                 (16, 64, 1, 4), (64, 16, 1, 4)]
        cands = [c for c in cands if c[1] <= 2 * kw]
    elif m <= T.SUM_MAX_M:
        r = 2 if fmt == "nvfp4" else 4
        cands = [(bn, bw, r, wp) for bn, bw, wp in [(4, 256, 1), (4, 256, 2), (2, 256, 2), (8, 256, 2), (4, 512, 2),
                                                     (4, 512, 4), (4, 1024, 4), (8, 128, 1)]]
    else:
        cands = [(8, 128, 1, 4), (8, 64, 1, 2), (8, 256, 1, 8), (4, 128, 1, 4), (2, 128, 1, 4), (16, 128, 1, 4),
                 (4, 128, 2, 2), (4, 256, 2, 4), (2, 256, 2, 4)]
    if variant != "v3dot":
        cands = [c for c in cands if c[1] // c[2] >= 32 * c[3] and c[1] <= 2 * kw]
    res = []
    with gemv_variant(variant):
        default = (T._gemv3dot_config if variant == "v3dot" else T._gemv3_config)(m, n, k, fmt)
        for (bn, bw, r, wp), split in itertools.product(cands, (1, 2)):
            if split > 1 and kw // bw < 2:
                continue  # split K only where a row has several tiles
            if time.time() > deadline:
                break
            cfg = (bn, bw, r, wp, split, 1)
            T.GEMV3_OVERRIDE = cfg
            try:
                res.append((graph_time(calls, reps=3), cfg))
            except Exception as e:  # noqa: BLE001  (a config may not compile: skip it)
                res.append((math.inf, (*cfg, type(e).__name__)))
            finally:
                T.GEMV3_OVERRIDE = None
        t_default = graph_time(calls, reps=3)
    res.sort(key=lambda q: q[0])
    best = ", ".join(f"{c} {t * 1e6:.1f}us" for t, c in res[:4]) or "none tried"
    return (f"SWEEP3 {variant} {fmt} M={m} {n}x{k}: default {default} {t_default * 1e6:.1f}us | {len(res)} tried, "
            f"best {best}")


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    main()
