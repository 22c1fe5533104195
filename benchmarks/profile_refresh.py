"""Where the time of LOTION's curvature refresh goes, on the compiled GPT-2-small training step.

`curvature_step` refreshes g every `curvature_every` steps: a forward, the sampled-target loss, a
backward, and folding the squared gradients into g. This times each phase (synchronized wall clock,
median over refreshes) beside a plain step and a LOTION step without a refresh, so the step-cost
ratio of bench_train_step.py can be split into: penalty in every step + refresh / curvature_every.
`--kernels N` also profiles the refreshes alone (torch.profiler) and prints their top N device kernels
per refresh, so the refresh's time can be read kernel by kernel.
GPU: python benchmarks/profile_refresh.py [--refreshes 5] [--batch 8] [--kernels 25]
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
from lotion_fx import curvature as C  # noqa: E402
from benchmarks.bench_train_step import build  # noqa: E402
from examples.gpt import GPTConfig  # noqa: E402


class Marks:
    """Synchronized timestamps at the phase boundaries of one refresh (hooks on curvature.py's calls)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.on = False

    def mark(self, name: str) -> None:
        if self.on and name not in self.t:
            torch.cuda.synchronize()
            self.t[name] = time.perf_counter()

    def wrap(self, module, attr: str, before: str | None, after: str | None) -> None:
        fn = getattr(module, attr)

        def wrapped(*a, **k):
            if before:
                self.mark(before)
            out = fn(*a, **k)
            if after:
                self.mark(after)
            return out

        setattr(module, attr, wrapped)


def refresh_kernels(fn, idx, refreshes: int, top: int) -> list[list]:
    """Device kernels of `refreshes` refreshes alone (curvature_step called until it refreshes)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.profile_train_step import kernel_times, short

    done = 0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while done < refreshes:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                done += lotion_fx.curvature_step(fn, idx)
        torch.cuda.synchronize()
    k = sorted(kernel_times(prof, "cuda").items(), key=lambda kv: -kv[1][1])
    total = sum(t for _, (_, t) in k) / refreshes
    rows = [[short(n), f"{c / refreshes:g}", f"{t / refreshes:.0f}"] for n, (c, t) in k[:top]]
    return rows + [["(all kernels)", f"{sum(c for _, (c, _) in k) / refreshes:g}", f"{total:.0f}"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--refreshes", type=int, default=5)
    ap.add_argument("--format", default="int4")
    ap.add_argument("--kernels", type=int, default=0, help="also print the top N kernels of one refresh")
    a = ap.parse_args()
    cfg = GPTConfig.preset("gpt2")
    idx = torch.randint(0, cfg.vocab_size, (a.batch, cfg.block_size), device="cuda")
    marks = Marks()
    marks.wrap(C, "sampled_target_loss", "forward", "sampled loss")
    marks.wrap(C, "fold_sampled_all", "backward", None)
    marks.wrap(C, "advance_all", "fold into g", None)
    rows = []
    for method in ("plain", "lotion"):
        model = build(method, a.format if method != "plain" else None, None, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fn = torch.compile(model)

        def train() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(fn(idx).float().flatten(0, 1), idx.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def timed(f) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3

        phases: dict[str, list[float]] = {}
        steps, plain_curv = [], []
        every = lotion_fx.prepared_info(model).config.curvature_every if method == "lotion" else 1
        for i in range(3 * every + (a.refreshes + 1) * every):
            if method == "lotion":
                marks.t, marks.on = {}, True
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    refreshed = lotion_fx.curvature_step(fn, idx)
                    torch.cuda.synchronize()
                    t1 = time.perf_counter()
                marks.on = False
                if refreshed and i >= 3 * every:
                    t = {"start": t0, **marks.t, "advance (counter, lam)": t1}
                    keys = list(t)
                    for k0, k1 in zip(keys, keys[1:]):
                        phases.setdefault(k1, []).append((t[k1] - t[k0]) * 1e3)
                elif i >= 3 * every:
                    plain_curv.append((t1 - t0) * 1e3)
            ms = timed(train)
            if i >= 3 * every:
                steps.append(ms)
        med = statistics.median
        rows.append([method, "training step (forward, backward, AdamW)", f"{med(steps):.2f}"])
        if method == "lotion":
            rows.append([method, "curvature_step, no refresh (counter and lam)", f"{med(plain_curv):.3f}"])
            total = 0.0
            for k, v in phases.items():
                rows.append([method, f"refresh: {k}", f"{med(v):.2f}"])
                total += med(v)
            rows.append([method, "refresh total", f"{total:.2f}"])
            rows.append([method, f"refresh total / curvature_every ({every})", f"{total / every:.2f}"])
        if method == "lotion" and a.kernels:
            kernel_rows = refresh_kernels(fn, idx, a.refreshes, a.kernels)
        del model, opt, fn
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | GPT-2 small, batch "
          f"{a.batch}x{cfg.block_size}, bf16 autocast, compiled, {a.format}; synchronized wall ms, median")
    print(tabulate(rows, headers=["case", "phase", "ms"]))
    if a.kernels:
        print(f"\nTop {a.kernels} device kernels of one refresh (mean over {a.refreshes} refreshes):")
        print(tabulate(kernel_rows, headers=["kernel", "calls", "us"]))


if __name__ == "__main__":
    main()
