"""Where a decode step's time goes: torch.profiler over compiled KV-cache decode steps and one eager prefill.

Uses bench_decode's Llama-shaped model and variants. Per variant prints wall ms/token, the GPU
kernel time per token (sum of CUDA kernel durations), kernels launched per token, the top kernels,
Dynamo/Inductor counters (graph breaks, CUDA-graph skips) and, for the prefill, the top CPU ops.
A GPU with wall >> kernel time is waiting on the host (dispatch, launches, copies). After all
variants, a breakdown of each decode step (`where the time goes`): weight matmuls (ours or cuBLAS),
attention, everything else, GPU idle, and the step each variant would take if its weight matmuls ran
at the measured copy bandwidth: the ceiling on its speed-up with the rest of the step unchanged. Usage:
    python benchmarks/profile_decode.py [--variants bf16,int4] [--layout separate|fused] [--compile default|none] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tabulate import tabulate
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode as B  # noqa: E402
from profile_train_step import kernel_times  # noqa: E402


def kernel_table(prof, steps: int, top: int) -> tuple[float, float, list]:
    """(kernel us per step, kernels per step, top rows) from a profile's device events."""
    agg = kernel_times(prof, "cuda")
    total = sum(t for _, t in agg.values()) / steps
    count = sum(c for c, _ in agg.values()) / steps
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
    return total, count, [[n[:70], f"{c / steps:.1f}", f"{t / steps:.1f}"] for n, (c, t) in rows]


# Kernel-name fragments per category (our Triton weight-only kernels; cuBLAS / CUTLASS GEMM and GEMV).
WEIGHT_MATMUL = ("gemv", "gemm", "_dequant_kernel", "nvjet", "xmma", "cutlass", "splitk", "tem_fused_mm")
ATTENTION = ("flash", "attn", "attention", "fmha", "sdpa")


def category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ATTENTION):
        return "attention"
    return "weight matmul" if any(k in n for k in WEIGHT_MATMUL) else "other"


def breakdown(prof, steps: int) -> dict[str, float]:
    """us per step of device kernels by category."""
    out = {"weight matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, (_, t) in kernel_times(prof, "cuda").items():
        out[category(name)] += t / steps
    return out


def cpu_table(prof, top: int) -> list:
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [[e.key[:70], e.count, f"{e.self_cpu_time_total / 1e3:.2f}", f"{e.cpu_time_total / 1e3:.2f}"] for e in rows]


@torch.no_grad()
def profile_variant(variant: str, c: B.Cfg, args, device: str) -> dict:
    from torch._dynamo.utils import counters

    counters.clear()
    model = B.build(variant, c, args.batch, device, args.layout)
    wbytes = B.weight_bytes(model)
    ids = torch.randint(0, c.vocab, (args.batch, args.prefill), device=device)
    pos = torch.arange(args.prefill, device=device)
    model(ids, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        logits = model(ids, pos)
        torch.cuda.synchronize()
        pre_ms = (time.perf_counter() - t0) * 1e3
    ktime, kcount, krows = kernel_table(prof, 1, args.top)
    print(f"\n=== {variant} prefill M={args.batch * args.prefill} (eager): wall {pre_ms:.2f} ms, GPU kernels "
          f"{ktime / 1e3:.2f} ms, {kcount:.0f} kernels")
    print(tabulate(krows, headers=["kernel", "count", "us"]))
    print(tabulate(cpu_table(prof, args.top), headers=["cpu op", "count", "self ms", "total ms"]))

    step = B.compile_for(model, args.compile, cudagraphs=True)
    tok = logits.argmax(-1)
    p = torch.tensor([args.prefill], device=device)
    for i in range(5):
        tok = step(tok, p + i).argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        tok = step(tok, p + 5 + i).argmax(-1)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            tok = step(tok, p + 5 + args.steps + i).argmax(-1)
        torch.cuda.synchronize()
    ktime, kcount, krows = kernel_table(prof, args.steps, args.top)
    print(f"\n=== {variant} decode batch {args.batch} (compile={args.compile!r} + CUDA graphs): wall {wall:.3f} ms/token, GPU "
          f"kernels {ktime / 1e3:.3f} ms/token, {kcount:.0f} kernels/token")
    print(tabulate(krows, headers=["kernel", "per token", "us / token"]))
    print(tabulate(cpu_table(prof, 8), headers=["cpu op", "count", "self ms", "total ms"]))
    interesting = {k: dict(v) for k, v in counters.items() if k in ("inductor", "graph_break", "stats") and v}
    print("counters:", {k: {n: c for n, c in v.items() if "cudagraph" in n or k != "inductor"}
                        for k, v in interesting.items()})
    parts = breakdown(prof, args.steps)
    del model, step
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"wall": wall * 1e3, "kernels": ktime, "bytes": wbytes, **parts}


def where_the_time_goes(res: dict[str, dict], bw: float) -> str:
    """One row per variant: us per decode step by category, and the step with weight matmuls at copy bandwidth."""
    first = next(iter(res.values()))
    rows = []
    for v, r in res.items():
        read = r["bytes"] / bw * 1e6  # us to read the weights once at copy bandwidth
        # weight matmuls at bandwidth, everything else as measured (idle = host gaps between kernels)
        ideal = read + r["attention"] + r["other"] + max(r["wall"] - r["kernels"], 0.0)
        rows.append([v, f"{r['bytes'] / 2**20:.0f}", f"{r['wall']:.0f}", f"{r['weight matmul']:.0f}",
                     f"{100 * read / r['weight matmul']:.0f}%", f"{r['attention']:.0f}", f"{r['other']:.0f}",
                     f"{max(r['wall'] - r['kernels'], 0.0):.0f}", f"{first['wall'] / r['wall']:.2f}x",
                     f"{ideal:.0f}", f"{first['wall'] / ideal:.2f}x"])
    return tabulate(rows, headers=["weights", "weight MiB", "wall us", "weight matmuls us", "of BW",
                                   "attention us", "other us", "GPU idle us", "vs first",
                                   "step if matmuls at BW", "ceiling vs first"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="bf16,int4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", default="default", choices=["default", "none"], help="see bench_decode")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--layout", default="separate", choices=list(B.LAYOUTS), help="see bench_decode")
    ap.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    args = ap.parse_args()
    c = B.Cfg(dim=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=1024, max_len=128) if args.quick else B.Cfg()
    args.prefill = min(args.prefill, c.max_len // 2)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    res = {v: profile_variant(v, c, args, "cuda") for v in args.variants.split(",")}
    bw = B.copy_bandwidth("cuda")
    print(f"\nwhere the time goes: decode batch {args.batch}, layout {args.layout}, us per step "
          f"(copy bandwidth {bw / 1e12:.2f} TB/s; 'of BW' = weight read time at that bandwidth / weight matmul time)")
    print(where_the_time_goes(res, bw))


if __name__ == "__main__":
    main()
