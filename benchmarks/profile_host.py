"""Is the compiled GPT-2-small training step host-bound? CPU launch time per phase vs GPU time per step.

Each phase (curvature_step with and without a refresh, forward, backward, optimizer step) is timed on the
host from an empty GPU queue to its return, without a trailing synchronize: the CPU time it takes to
launch that phase's kernels. The GPU time of a whole step is timed with CUDA events. When the CPU time
of a step comes near its GPU time, the GPU waits on the host and the step time follows the host's jitter.
GPU: python benchmarks/profile_host.py [--cases plain,lotion-int4] [--steps 40] [--static]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lotion_fx  # noqa: E402
from benchmarks.bench_train_step import build  # noqa: E402
from examples.gpt import GPTConfig  # noqa: E402


def host_ms(fn) -> float:
    """CPU ms from an empty GPU queue until `fn` returns (its launch time, not its GPU time)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def profile(method: str, fmt: str | None, curvature: str | None, cfg: GPTConfig, args) -> list[list]:
    model = build(method, fmt, curvature, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fn = torch.compile(model, dynamic=False) if args.static else torch.compile(model)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device="cuda")
    lotion = method == "lotion"
    state: dict = {}

    def curvature() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            state["refreshed"] = lotion_fx.curvature_step(fn, idx)

    def forward() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            state["loss"] = F.cross_entropy(fn(idx).float().flatten(0, 1), idx.flatten())

    def backward() -> None:
        state.pop("loss").backward()

    def optimizer() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step() -> None:
        if lotion:
            curvature()
        forward()
        backward()
        optimizer()

    for _ in range(args.warmup):
        step()
    times: dict[str, list[float]] = {}
    for _ in range(args.steps):
        if lotion:
            t = host_ms(curvature)
            times.setdefault("curvature_step, refresh" if state["refreshed"] else "curvature_step, no refresh",
                             []).append(t)
        for name, phase in (("forward", forward), ("backward", backward), ("optimizer step", optimizer)):
            times.setdefault(name, []).append(host_ms(phase))
    gpu = []
    for _ in range(3):  # GPU time per step: a window of back-to-back steps between two events
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20):
            step()
        e.record()
        torch.cuda.synchronize()
        gpu.append(s.elapsed_time(e) / 20)
    label = " ".join(x for x in (method, fmt, curvature) if x)
    rows = [[label, k, f"{statistics.median(v):.2f}", len(v)] for k, v in times.items()]
    every = lotion_fx.prepared_info(model).config.curvature_every if lotion else 1
    per_step = sum(statistics.median(v) * (1 / every if "refresh" in k and "no" not in k else
                                           (1 - 1 / every) if "no refresh" in k else 1) for k, v in times.items())
    rows.append([label, "host launch time per step (refresh at its rate)", f"{per_step:.2f}", ""])
    rows.append([label, "step time, back to back (median of 3 windows of 20)", f"{statistics.median(gpu):.2f}", ""])
    del model, opt, fn
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="plain,lotion-int4", help="method-format[-curvature], comma-separated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--static", action="store_true", help="torch.compile(model, dynamic=False)")
    args = ap.parse_args()
    cfg = GPTConfig.preset("gpt2")
    rows = []
    for case in args.cases.split(","):
        method, fmt, curvature = (case.split("-") + [None, None])[:3]
        rows += profile(method, fmt, curvature, cfg, args)
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | GPT-2 small, batch "
          f"{args.batch}x{cfg.block_size}, bf16 autocast, fused AdamW, compiled{' dynamic=False' if args.static else ''};"
          " host ms = CPU time from an empty GPU queue to return, median over steps")
    print(tabulate(rows, headers=["case", "phase", "ms", "samples"]))


if __name__ == "__main__":
    main()
