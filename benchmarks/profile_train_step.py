"""Per-kernel profile of the compiled GPT-2-small training step: plain vs qat / lotion (int4).

Answers where the qat/lotion step time goes: top device kernels per step, the time in kernels
generated for our smoothing ops vs the rest, the bytes those kernels must move and the GB/s they
reach, and what the generated code of each of our kernels is (Inductor heuristic, sizes, pointers).
Reuses bench_train_step's model setup. GPU run (as on the lent H100):
    python benchmarks/profile_train_step.py
CPU smoke run (no device kernels; profiles CPU ops instead):
    python benchmarks/profile_train_step.py --device cpu --size tiny --batch 2 --steps 1
If $OUT is set, the generated source of our kernels is written to $OUT/kernels_<case>.py.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
from collections import defaultdict

import torch
from tabulate import tabulate
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lotion_fx  # noqa: E402
from benchmarks.bench_train_step import build, train_step  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

# Substrings of Inductor kernel names (built from the original aten/custom ops) that mark code
# generated for our smoothing ops. "amax" is the per-block absmax (the lotion backward and the
# nvfp4 per-tensor amax decompose into it); plain's kernels are checked for it too.
OUR_KEYS = ("rtn_quantize", "rtn_ste_backward", "lotion", "sr_quantize", "amax")
ACT_BYTES = 2  # bf16 autocast: the weight copy fed to the matmul and the matmul's weight grad


def is_ours(name: str) -> bool:
    return any(k in name for k in OUR_KEYS)


def min_bytes(method: str, n: int, wb: int) -> int:
    """Fewest bytes per step the smoothing work (with the casts it absorbs) must move.

    fwd: read w, write the bf16 copy (plain does this cast too). bwd: read the bf16 weight grad,
    write the fp32 grad (plain: this cast only); qat also reads w (STE clamp mask); lotion also
    reads w and reads+writes the fp32 curvature g.
    """
    fwd = n * (wb + ACT_BYTES)
    bwd = {"plain": n * (ACT_BYTES + wb), "qat": n * (ACT_BYTES + 2 * wb),
           "lotion": n * (ACT_BYTES + 2 * wb + 8), "lotion_sampled": n * (ACT_BYTES + wb)}[method]
    return fwd + bwd


def quantized_numel(model: torch.nn.Module, method: str) -> tuple[int, int]:
    """(number of smoothed weight elements, bytes per element); plain counts every Linear weight."""
    if method == "plain":
        ws = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    else:
        orig = lotion_fx.original(model)
        ws = {}
        for name in lotion_fx.smoothers(model):
            p = orig.get_parameter(name)
            ws[id(p)] = p
    n = sum(p.numel() for p in ws.values())
    return n, next(iter(ws.values())).element_size()


def make(method: str, fmt: str | None, curvature: str | None, cfg: GPTConfig, device: str) -> torch.nn.Module:
    if device == "cuda":
        return build(method, fmt, curvature, cfg)
    torch.manual_seed(0)  # bench_train_step.build is CUDA-only; same setup on CPU
    model = GPT(cfg)
    if method == "plain":
        return model
    extra = {"curvature": curvature} if curvature else {}
    return lotion_fx.prepare(model, lotion_fx.LotionConfig(method=method, format=fmt, **extra))


def kernel_times(prof, device: str) -> dict[str, tuple[int, float]]:
    """name -> (calls, total us) over the profiled window: device kernels on CUDA, CPU ops on CPU."""
    agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if device == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            t = e.device_time_total
        else:
            if e.device_type != DeviceType.CPU:
                continue
            t = e.self_cpu_time_total
        agg[e.name][0] += 1
        agg[e.name][1] += t
    return {k: (int(v[0]), v[1]) for k, v in agg.items()}


def short(name: str, width: int = 72) -> str:
    return name if len(name) <= width else name[: width - 24] + "..." + name[-21:]


_KERNEL_RE = re.compile(r"^(\w+) = async_compile\.\w+\(.*?r?'''(.*?)'''", re.S | re.M)


def kernel_sources(codes: list[str]) -> dict[str, str]:
    """Generated kernel name -> its source, from Inductor output modules."""
    out = {}
    for code in codes:
        for name, src in _KERNEL_RE.findall(code):
            out[name] = src
    return out


def describe(src: str) -> str:
    """One line on what a generated Triton kernel does: heuristic, sizes, pointer dtypes."""
    heur = re.search(r"@triton_heuristics\.(\w+)", src)
    sizes = re.findall(r"^\s+(x|r0_|y)numel = (\d+)", src, re.M)
    sig = re.search(r"'signature': \{([^}]*)\}", src)
    ptrs = re.findall(r"'(\w*ptr\w*)': '\*(\w+)'", sig.group(1)) if sig else []
    loads, stores = src.count("tl.load("), src.count("tl.store(")
    parts = [heur.group(1) if heur else "cpp/other"]
    parts += [f"{k}numel={v}" for k, v in sizes[:4]]
    parts.append(f"{loads} loads/{stores} stores")
    if ptrs:
        parts.append("ptrs " + ",".join(f"{p}:{t}" for p, t in ptrs))
    return " | ".join(parts)


def profile_case(method: str, fmt: str | None, curvature: str | None, cfg: GPTConfig, args) -> dict:
    dev = args.device
    model = make(method, fmt, curvature, cfg, dev)
    n, wb = quantized_numel(model, method)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    fn = torch.compile(model)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device=dev)

    def step() -> None:
        train_step(fn, opt, idx, method)

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    _, codes = torch._inductor.utils.run_and_get_code(step)  # first step compiles fwd + bwd
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.timed):
        t = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    acts = [ProfilerActivity.CUDA] if dev == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        sync()
    ktimes = kernel_times(prof, dev)
    del model, opt, fn
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return dict(method=method, fmt=fmt, curvature=curvature, n=n, wb=wb, step_ms=sorted(times)[len(times) // 2],
                k=ktimes, src=kernel_sources(codes))


class _Tee:
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> None:
        for st in self.streams:
            st.write(text)
            st.flush()

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="gpt2", help="examples.gpt preset")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timed", type=int, default=5, help="steps timed (wall clock, synced) before profiling")
    ap.add_argument("--steps", type=int, default=10, help="steps profiled (10: one lotion refresh at its real rate)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--top-ours", type=int, default=8, help="our kernels described per case")
    ap.add_argument("--cases", default="plain,qat:int4,lotion:int4",
                    help="method[:format[:curvature]], comma-separated, e.g. lotion:int4:kfac_diag")
    ap.add_argument("--copy-gbs", type=float, default=3000.0, help="device copy bandwidth, GB/s (H100: ~2950 measured)")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT")
    if out_dir:  # the whole report also goes to $OUT (device output tails are short)
        sys.stdout = _Tee(sys.stdout, open(os.path.join(out_dir, "profile_train_step.txt"), "w"))
    if args.device == "cpu":  # wrap Inductor's C++ kernels in profiler ranges so they show up by name
        torch._inductor.config.cpp.enable_kernel_profile = True
    cfg = GPTConfig.preset(args.size)
    cases = [(c.split(":") + [None, None])[:3] for c in args.cases.split(",")]
    res = []
    for method, fmt, curvature in cases:
        r = profile_case(method, fmt, curvature, cfg, args)
        res.append(r)
        print(f"{method} {fmt or '-'} {curvature or ''}: {r['step_ms']:.2f} ms/step (wall, median of {args.timed})",
              flush=True)
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (CPU ops, not kernels)"
    print(f"\ndevice: {dev_name} | torch {torch.__version__} | GPT {args.size}, batch {args.batch}x{cfg.block_size}, "
          f"bf16 autocast, fused AdamW, torch.compile | {args.steps} steps profiled")
    S = args.steps
    summary = []
    base = None
    for r in res:
        label = " ".join(x for x in (r["method"], r["fmt"], r["curvature"]) if x)
        items = sorted(r["k"].items(), key=lambda kv: -kv[1][1])
        rows = [[short(name), "y" if is_ours(name) else "", f"{c / S:g}", f"{t / S:.0f}"]
                for name, (c, t) in items[: args.top]]
        total = sum(t for _, t in r["k"].values()) / S
        ours = sum(t for name, (_, t) in r["k"].items() if is_ours(name)) / S
        n_ours = sum(c for name, (c, _) in r["k"].items() if is_ours(name)) / S
        print(f"\n[{label}] top {args.top} of {len(items)} kernels; kernel time {total / 1e3:.2f} ms/step, "
              f"wall {r['step_ms']:.2f} ms/step, ours {ours / 1e3:.2f} ms in {n_ours:g} launches")
        print(tabulate(rows, headers=["kernel", "ours", "calls/step", "us/step"]))
        if base is None:
            base = (total, ours, r["step_ms"])
        byts = min_bytes(r["method"], r["n"], r["wb"])
        gbs = byts / (ours * 1e-6) / 1e9 if ours else float("nan")
        summary.append([label, f"{r['step_ms']:.2f}", f"{total / 1e3:.2f}", f"{(r['step_ms'] * 1e3 - total) / 1e3:.2f}",
                        f"{ours / 1e3:.2f}", f"{(total - ours) / 1e3:.2f}",
                        f"{(ours - base[1]) / 1e3:+.2f}", f"{(total - ours - (base[0] - base[1])) / 1e3:+.2f}",
                        f"{r['n'] / 1e6:.1f}M", f"{byts / 1e9:.3f}", f"{gbs:.0f}" if ours else "-",
                        f"{gbs / args.copy_gbs:.0%}" if ours else "-",
                        f"{byts / args.copy_gbs / 1e6:.2f}"])
        ours_src = {k: v for k, v in r["src"].items() if is_ours(k)}
        if n_ours:
            print(f"generated code of our kernels ({label}):")
            for name, (c, t) in [kv for kv in items if is_ours(kv[0])][: args.top_ours]:
                src = ours_src.get(re.sub(r"^graph_\d+_", "", name))  # CPU profile names carry graph_N_
                what = describe(src) if src else "(source not captured)"
                print(f"  {t / S:7.0f} us x{c / S:g}  {short(name, 60)}: {what}")
        if out_dir and ours_src:
            with open(os.path.join(out_dir, f"kernels_{label.replace(' ', '_')}.py"), "w") as f:
                for name, src in ours_src.items():
                    f.write(f"# ===== {name}\n{src}\n")
    print("\nSummary (ms per step; 'ours' = kernels whose names hold " + ", ".join(OUR_KEYS) + ";")
    print(f"min GB = fewest bytes the smoothing work + absorbed casts must move; copy = {args.copy_gbs:.0f} GB/s)")
    print(tabulate(summary, headers=["case", "wall", "kernels", "idle", "ours", "rest", "ours-plain", "rest-plain",
                                     "weights", "min GB", "ours GB/s", "of copy", "ms at copy"]))


if __name__ == "__main__":
    main()
