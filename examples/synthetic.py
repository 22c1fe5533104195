"""Synthetic testbed: PTQ vs QAT vs LOTION on teacher-student linear regression, on CPU.

The input covariance is ill-conditioned and rotated (power-law spectrum in a random basis), so the
rounding errors of different weights interact through it: the best point on the quantization grid
is not the rounded full-precision optimum, which is what quantization-aware training can exploit.

Every method trains the same student through the public API (`lotion_fx.prepare`, `quantized_eval`,
`penalty`); the quantized loss is the population loss of the student with RTN(w) weights, computed
exactly (noise-free targets, inputs that span the covariance), minus nothing: the Bayes floor is
0.5 * outputs * noise^2 and is printed under the table.

    python examples/synthetic.py                 # the default table (int4 and int8, 3 seeds)
    python examples/synthetic.py --lr-sweep      # each method at each learning rate
The curvature study behind the library's defaults is benchmarks/curvature_study.py.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tabulate import tabulate
from torch import Tensor, nn

import lotion_fx

METHODS = ("ptq", "qat", "lotion", "lotion_sampled")


# --------------------------------------------------------------------------- the problem
@dataclass(frozen=True)
class ProblemConfig:
    """Teacher y = W* x + noise, x ~ N(0, Sigma), Sigma = Q diag(j^-alpha) Q^T rescaled to trace d."""

    d: int = 64
    outputs: int = 16
    alpha: float = 1.0
    noise: float = 1.0


@dataclass
class Problem:
    cfg: ProblemConfig
    sqrt_sigma: Tensor  # (d, d): x = z @ sqrt_sigma with z ~ N(0, I)
    w_star: Tensor  # (outputs, d)

    @property
    def sigma_diag(self) -> Tensor:
        return (self.sqrt_sigma**2).sum(0)

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, self.cfg.d, generator=gen) @ self.sqrt_sigma
        y = x @ self.w_star.T + self.cfg.noise * torch.randn(n, self.cfg.outputs, generator=gen)
        return x, y


def make_problem(cfg: ProblemConfig, seed: int) -> Problem:
    """A random rotation of a power-law spectrum and a Gaussian teacher, both from `seed`."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    q, _ = torch.linalg.qr(torch.randn(cfg.d, cfg.d, generator=gen))
    eig = torch.arange(1, cfg.d + 1, dtype=torch.float32) ** -cfg.alpha
    eig = eig * (cfg.d / eig.sum())
    sqrt_sigma = (q * eig.sqrt()) @ q.T  # symmetric square root: sqrt_sigma^T sqrt_sigma = Sigma
    w_star = torch.randn(cfg.outputs, cfg.d, generator=gen)
    return Problem(cfg, sqrt_sigma, w_star)


def loss_fn(pred: Tensor, y: Tensor) -> Tensor:
    """Gaussian negative log-likelihood up to a constant: 0.5 * sum over outputs, mean over batch.

    It is outputs/2 times F.mse_loss, which is what `curvature_step(..., loss_scale=outputs / 2)` says.
    """
    return 0.5 * (pred - y).pow(2).sum(-1).mean()


class Student(nn.Module):
    def __init__(self, d: int, outputs: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, outputs, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def population_loss(model: nn.Module, problem: Problem) -> float:
    """Exact E[loss] of `model` (which must be linear in x): floor + 0.5 tr((W - W*) Sigma (W - W*)^T).

    Rows of sqrt_sigma span the covariance, so summing the noise-free loss over them is exact.
    """
    with torch.no_grad():
        x = problem.sqrt_sigma  # rows s_j with sum_j s_j s_j^T = Sigma
        excess = 0.5 * (model(x) - x @ problem.w_star.T).pow(2).sum()
    return float(excess) + 0.5 * problem.cfg.outputs * problem.cfg.noise**2


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch: int = 64
    lr: float | None = None  # None: the method's tuned default (LR below)
    lam: float = 1.0
    curvature: str = "gn_sampled"  # the library default
    curvature_scale: float = 1.0
    beta: float | None = None  # None: the library's default for the curvature


# Best int4 lr per method from `--lr-sweep` (Adam, cosine decay, same budget): README.md.
LR = {"ptq": 0.1, "qat": 0.03, "lotion": 0.1, "lotion_sampled": 0.03}


def fit(model: nn.Module, lr: float, steps: int, sample: Callable[[], tuple[Tensor, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor], curvature_loss: str,
        loss_scale: float) -> tuple[Tensor, torch.optim.Optimizer]:
    """Adam with cosine decay over `steps`, a `curvature_step` before each step (the loop change the
    default curvature asks for). Returns the last training loss and the optimizer (curvature='adam'
    reads its state, so keep it while using the model). benchmarks/curvature_study.py uses it too."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    if lotion_fx.is_prepared(model) and lotion_fx.prepared_info(model).config.curvature == "adam":
        lotion_fx.attach_optimizer(model, opt)
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        x, y = sample()
        lotion_fx.curvature_step(model, x, loss=curvature_loss, loss_scale=loss_scale)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return loss, opt


def train(problem: Problem, method: str, fmt: str, seed: int, tc: TrainConfig) -> dict[str, float]:
    """Train one student with `method` and return its full-precision and quantized population loss."""
    torch.manual_seed(seed)
    student = Student(problem.cfg.d, problem.cfg.outputs)
    scale = tc.curvature_scale
    cfg = lotion_fx.LotionConfig(
        method=method, format=fmt, lam=tc.lam, curvature=tc.curvature,
        curvature_scale=scale, beta=tc.beta, seed=seed,
    )
    model = lotion_fx.prepare(student, cfg)
    gen = torch.Generator().manual_seed(seed)
    # gn_sampled: a sampled-target backward every 10 steps; loss_fn is outputs/2 x F.mse_loss
    lr = LR[method] if tc.lr is None else tc.lr
    # opt stays referenced until the end: curvature='adam' reads its state in penalty() below
    loss, opt = fit(model, lr, tc.steps, lambda: problem.sample(tc.batch, gen), loss_fn, "mse", problem.cfg.outputs / 2)
    if not torch.isfinite(loss):
        return {"fp": math.nan, "q": math.nan, "penalty": math.nan}
    model.eval()
    fp = population_loss(model, problem)
    pen = float(lotion_fx.penalty(model))
    with lotion_fx.quantized_eval(model):
        q = population_loss(model, problem)
    return {"fp": fp, "q": q, "penalty": pen}


def run_grid(
    methods: list[str], formats: list[str], seeds: list[int], tc: TrainConfig,
    pcfg: ProblemConfig = ProblemConfig(),
) -> dict[tuple[str, str], list[dict[str, float]]]:
    """All (method, format) cells over all seeds; seed s uses problem s for every method."""
    problems = {s: make_problem(pcfg, s) for s in seeds}
    return {
        (m, f): [train(problems[s], m, f, s, tc) for s in seeds] for f in formats for m in methods
    }


def mean_std(v: list[float]) -> str:
    if any(math.isnan(x) for x in v):
        return "nan (diverged)"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.3f} ± {sd:.3f}"


def table(results: dict, methods: list[str], formats: list[str]) -> str:
    """One row per method: full-precision loss (first format's run) and quantized loss per format."""
    rows = [
        [m, mean_std([r["fp"] for r in results[(m, formats[0])]])]
        + [mean_std([r["q"] for r in results[(m, f)]]) for f in formats]
        for m in methods
    ]
    return tabulate(rows, headers=["method", f"fp loss ({formats[0]} run)", *(f"{f} quantized loss" for f in formats)])


def paired_wins(results: dict, methods: list[str], fmt: str, winner: str = "lotion") -> str:
    """Per-seed comparison (same problem, same init): on how many seeds `winner` beats each method."""
    if winner not in methods or (winner, fmt) not in results:
        return ""
    mine = [r["q"] for r in results[(winner, fmt)]]
    parts = [
        f"{sum(a < b for a, b in zip(mine, [r['q'] for r in results[(m, fmt)]]))}/{len(mine)} vs {m}"
        for m in methods if m != winner
    ]
    return f"{fmt}: {winner} has the lower quantized loss on " + ", ".join(parts) + " (paired by seed)"


# --------------------------------------------------------------------------- study / sweep
def lr_sweep(methods: list[str], seeds: list[int], steps: int) -> str:
    rows = []
    problems = {s: make_problem(ProblemConfig(), s) for s in seeds}
    grid = (0.01, 0.03, 0.1, 0.3)
    for m in methods:
        cells = [mean_std([train(problems[s], m, "int4", s, TrainConfig(steps=steps, lr=lr))["q"]
                           for s in seeds]) for lr in grid]
        rows.append([m, *cells])
    return tabulate(rows, headers=["int4 quantized loss", *(f"lr {lr}" for lr in grid)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8, help="number of seeds (problems), default 8")
    p.add_argument("--steps", type=int, default=None, help="Adam steps per run (default 600)")
    p.add_argument("--formats", default="int4,int8")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--quick", action="store_true", help="2 seeds, 150 steps, int4 only (smoke run)")
    p.add_argument("--lr-sweep", action="store_true", help="the per-method lr sweep (int4) instead")
    a = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    try:
        seeds = list(range(2 if a.quick else a.seeds))
        steps = a.steps or (150 if a.quick else TrainConfig.steps)
        formats = ["int4"] if a.quick else a.formats.split(",")
        methods = a.methods.split(",")
        for m in methods:
            if m not in METHODS:
                p.error(f"unknown method {m!r}: choose from {','.join(METHODS)}")
        t0 = time.perf_counter()
        if a.lr_sweep:
            print(lr_sweep(methods, seeds, steps))
        else:
            res = run_grid(methods, formats, seeds, TrainConfig(steps=steps))
            print(table(res, methods, formats))
            for f in formats:
                print(paired_wins(res, methods, f))
        pc = ProblemConfig()
        print(f"\nlinear teacher-student, d={pc.d}, outputs={pc.outputs}, spectrum j^-{pc.alpha} "
              f"(rotated), {len(seeds)} seeds x {steps} Adam steps, batch {TrainConfig.batch}; "
              f"population loss, Bayes floor {0.5 * pc.outputs * pc.noise**2:.3f}; "
              f"{time.perf_counter() - t0:.1f} s")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
