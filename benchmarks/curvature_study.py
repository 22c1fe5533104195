"""Curvature estimators x lam schedules x testbeds: the evidence behind LotionConfig's defaults.

Each cell trains the same student from the same init on the same data stream per seed, with the same
learning rate for every method (what a user does), and reports the quantized loss (the loss of the
model whose Linear weights are RTN(w), i.e. what `lotion_fx.convert` deploys): mean +- std over seeds
and paired wins of each variant against QAT and PTQ.

CPU testbeds (this script):
  linear:  examples/synthetic.py's teacher-student linear regression (rotated power-law inputs,
           noisy targets), int4 block 32; exact population loss.
  mlp:     a noise-free teacher-student tanh MLP regression (d 32 -> 64 -> 8), int4 block 32, MSE;
           the student fits well, so the quantization error dominates the quantized loss.
  cls:     16-class classification, labels sampled from a teacher MLP's softmax, student MLP,
           int4 per tensor; loss = exact expected cross-entropy under the teacher.
Held-out testbeds (`--testbeds heldout`), added on 2026-12-07 *after* the defaults were chosen and never
tuned on: noise-free teacher-student regression with a 3-layer MLP (16 -> 64 -> 64 -> 4, ReLU or tanh,
teacher weights 1.5 / sqrt(fan_in)), int4 block 16, batch 128, at three learning rates (3e-3, 1e-2, 3e-2),
one at nvfp4; and 10-class classification from a GELU teacher's softmax (32 -> 128 -> 128 -> 10), int4
block 32 and per tensor.
The GPU testbeds (small GPT on the stdlib corpus) run through examples/train_lm.py:
scripts/gpu_curvature_study.sh.

    python benchmarks/curvature_study.py --seeds 8             # the README's table (~5 min, 1 core)
    python benchmarks/curvature_study.py --testbeds mlp --seeds 3 --variants default,qat,ptq
    python benchmarks/curvature_study.py --testbeds heldout --variants ptq,qat,default
    python benchmarks/curvature_study.py --lm DIR              # table of train_lm.py JSON records
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lotion_fx  # noqa: E402
from examples import synthetic as S  # noqa: E402


# --------------------------------------------------------------------------- testbeds
@dataclass
class Testbed:
    """A family of problems: model, batches, training loss and the quantized-loss metric."""

    name: str
    fmt: str
    block: int | str | None
    steps: int
    batch: int
    lr: float
    loss_kind: str  # "mse" | "cross_entropy": the sampled-target loss of curvature_step
    make: Callable[[int], tuple[nn.Module, Callable, Callable, Callable, float]]
    # make(seed) -> (student, sample(gen) -> (x, y), train_loss(out, y), metric(model), loss_scale)


def _linear(seed: int):
    problem = S.make_problem(S.ProblemConfig(), seed)
    torch.manual_seed(seed)
    student = S.Student(problem.cfg.d, problem.cfg.outputs)
    metric = lambda m: S.population_loss(m, problem)  # noqa: E731
    # 0.5 * sum over K outputs, mean over batch = K/2 x F.mse_loss
    return student, lambda gen: problem.sample(64, gen), S.loss_fn, metric, problem.cfg.outputs / 2


class MLP(nn.Module):
    def __init__(self, d: int, h: int, out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class MLP3(nn.Module):
    def __init__(self, d: int, h: int, out: int, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, out)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def _randomize(teacher: nn.Module, gen: torch.Generator, gain: float) -> nn.Module:
    """Teacher weights N(0, gain^2 / fan_in), drawn from `gen`."""
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (gain / math.sqrt(p.shape[-1])))
    return teacher


def _regression(teacher: nn.Module, student: nn.Module, gen: torch.Generator, d: int, batch: int):
    """Noise-free teacher-student regression: MSE on 4096 test points drawn from `gen`."""
    x_test = torch.randn(4096, d, generator=gen)
    with torch.no_grad():
        y_test = teacher(x_test)

    def sample(g: torch.Generator):
        x = torch.randn(batch, d, generator=g)
        with torch.no_grad():
            return x, teacher(x)

    def metric(m: nn.Module) -> float:
        with torch.no_grad():
            return float(F.mse_loss(m(x_test), y_test))

    return student, sample, F.mse_loss, metric, 1.0


def _classification(teacher: nn.Module, student: nn.Module, gen: torch.Generator, d: int, batch: int):
    """Labels sampled from the teacher's softmax; metric = E_{y ~ teacher}[-log q(y|x)], exact in y."""
    x_test = torch.randn(4096, d, generator=gen)
    with torch.no_grad():
        p_test = teacher(x_test).softmax(-1)

    def sample(g: torch.Generator):
        x = torch.randn(batch, d, generator=g)
        with torch.no_grad():
            y = torch.multinomial(teacher(x).softmax(-1), 1, generator=g).squeeze(-1)
        return x, y

    def metric(m: nn.Module) -> float:
        with torch.no_grad():
            return float(-(p_test * m(x_test).log_softmax(-1)).sum(-1).mean())

    return student, sample, F.cross_entropy, metric, 1.0


def _student(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return make()


def _mlp(seed: int):
    gen = torch.Generator().manual_seed(20_000 + seed)
    teacher = _randomize(MLP(32, 64, 8), gen, 1.0)
    return _regression(teacher, _student(seed, lambda: MLP(32, 64, 8)), gen, 32, 64)


def _cls(seed: int):
    gen = torch.Generator().manual_seed(30_000 + seed)
    teacher = _randomize(MLP(32, 64, 16), gen, 2.0)
    return _classification(teacher, _student(seed, lambda: MLP(32, 64, 16)), gen, 32, 64)


def _deep_reg(seed: int, act: Callable[[Tensor], Tensor]):
    """Held out: noise-free regression on a 3-layer teacher (16 -> 64 -> 64 -> 4)."""
    gen = torch.Generator().manual_seed(40_000 + seed)
    teacher = _randomize(MLP3(16, 64, 4, act), gen, 1.5)
    return _regression(teacher, _student(seed, lambda: MLP3(16, 64, 4, act)), gen, 16, 128)


def _deep_cls(seed: int):
    """Held out: 10 classes sampled from a GELU teacher's softmax (32 -> 128 -> 128 -> 10)."""
    gen = torch.Generator().manual_seed(50_000 + seed)
    teacher = _randomize(MLP3(32, 128, 10, F.gelu), gen, 2.0)
    return _classification(teacher, _student(seed, lambda: MLP3(32, 128, 10, F.gelu)), gen, 32, 128)


TESTBEDS = {
    "linear": Testbed("linear", "int4", 32, 600, 64, 0.1, "mse", _linear),
    "mlp": Testbed("mlp", "int4", 32, 600, 64, 3e-2, "mse", _mlp),
    "cls": Testbed("cls", "int4", "tensor", 600, 64, 3e-3, "cross_entropy", _cls),
}
HELDOUT = {}
for _act_name, _act in (("relu", F.relu), ("tanh", torch.tanh)):
    for _lr in (3e-3, 1e-2, 3e-2):
        _name = f"{_act_name} lr {_lr:g}"
        HELDOUT[_name] = Testbed(_name, "int4", 16, 600, 128, _lr, "mse", functools.partial(_deep_reg, act=_act))
HELDOUT["relu lr 0.01 nvfp4"] = Testbed("relu lr 0.01 nvfp4", "nvfp4", 16, 600, 128, 1e-2, "mse",
                                        functools.partial(_deep_reg, act=F.relu))
HELDOUT["gelu cls block 32"] = Testbed("gelu cls block 32", "int4", 32, 600, 128, 3e-3, "cross_entropy", _deep_cls)
HELDOUT["gelu cls tensor"] = Testbed("gelu cls tensor", "int4", "tensor", 600, 128, 3e-3, "cross_entropy", _deep_cls)
TESTBEDS.update(HELDOUT)
GROUPS = {"heldout": list(HELDOUT), "tuned": ["linear", "mlp", "cls"]}

# name -> (method, LotionConfig overrides); "default" is LotionConfig's own defaults (gn_sampled,
# lam 1 reached after a 500-step linear warm-up). A fraction as a string ("1/2") is that part of the run's steps.
VARIANTS: dict[str, tuple[str, dict]] = {
    "ptq": ("ptq", {}),
    "qat": ("qat", {}),
    "default": ("lotion", {}),
    "scales held": ("lotion", {"scale_grad": False}),  # the default before scale_grad
    "ema (old default)": ("lotion", {"curvature": "ema"}),
    "kfac": ("lotion", {"curvature": "kfac_diag"}),  # factored, the default's lam 1 and 500-step warm-up
    "gn lam 0.1": ("lotion", {"lam": 0.1, "lam_warmup": 0}),
    "gn lam 0.3": ("lotion", {"lam": 0.3, "lam_warmup": 0}),
    "gn lam 0.5": ("lotion", {"lam": 0.5, "lam_warmup": 0}),
    "gn lam 1": ("lotion", {"lam": 1.0, "lam_warmup": 0}),
    "gn lam 3": ("lotion", {"lam": 3.0, "lam_warmup": 0}),
    "gn lam 1 warmup 300": ("lotion", {"lam": 1.0, "lam_warmup": 300}),
    "gn lam 1 warmup 100": ("lotion", {"lam": 1.0, "lam_warmup": 100}),
    "sampled": ("lotion_sampled", {}),
    "gn lam 1 warmup 1/2": ("lotion", {"lam": 1.0, "lam_warmup": "1/2"}),
    "gn lam 0.5 warmup 500": ("lotion", {"lam": 0.5, "lam_warmup": 500}),
    "gn lam 0.3 warmup 1/2": ("lotion", {"lam": 0.3, "lam_warmup": "1/2"}),
    "gn lam 1 every 1": ("lotion", {"curvature_every": 1}),
    "every 20": ("lotion", {"curvature_every": 20}),
    "batch 1/2": ("lotion", {"curvature_batch_fraction": 0.5}),
    "batch 1/4": ("lotion", {"curvature_batch_fraction": 0.25}),
    "gn lam 1 beta 0.8": ("lotion", {"beta": 0.8}),
    # LOTION (the default) for the first part of the run, then QAT's forward from its weights
    "qat from 1/4": ("lotion", {"qat_from_step": "1/4"}),
    "qat from 1/2": ("lotion", {"qat_from_step": "1/2"}),
    "qat from 9/10": ("lotion", {"qat_from_step": "9/10"}),
}


def train_one(tb: Testbed, variant: str, seed: int, steps: int) -> tuple[float, float]:
    """(full-precision metric, quantized metric) of one run; nan if training diverged."""
    method, over = VARIANTS[variant]
    over = {k: int(steps * Fraction(v)) if isinstance(v, str) else v for k, v in over.items()}
    student, sample, loss_fn, metric, loss_scale = tb.make(seed)
    cfg = lotion_fx.LotionConfig(method=method, format=tb.fmt, block_size=tb.block, seed=seed, **over)
    model = lotion_fx.prepare(student, cfg)
    gen = torch.Generator().manual_seed(seed)
    loss, _ = S.fit(model, tb.lr, steps, lambda: sample(gen), loss_fn, tb.loss_kind, loss_scale)
    if not torch.isfinite(loss):
        return math.nan, math.nan
    model.eval()
    fp = metric(model)
    with lotion_fx.quantized_eval(model):
        q = metric(model)
    return fp, q


def _ms(v: list[float], digits: int) -> str:
    if any(math.isnan(x) for x in v):
        return "nan (diverged)"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.{digits}g} ± {sd:.2g}"


def study(testbeds: list[str], variants: list[str], seeds: list[int], steps: int | None) -> str:
    out = []
    for name in testbeds:
        tb = TESTBEDS[name]
        n = steps or tb.steps
        t0 = time.perf_counter()
        res = {v: [train_one(tb, v, s, n) for s in seeds] for v in variants}
        rows = []
        for v in variants:
            q = [r[1] for r in res[v]]
            wins = []
            for base in ("qat", "ptq"):
                if base in res and base != v:
                    bq = [r[1] for r in res[base]]
                    wins.append(f"{sum(a < b for a, b in zip(q, bq))}/{len(q)}")
                else:
                    wins.append("")
            rows.append([v, _ms([r[0] for r in res[v]], 5), _ms(q, 5), *wins])
        block = "per tensor" if tb.block == "tensor" else f"block {tb.block}"
        out.append(
            f"\n{name}: {tb.fmt} {block}, {len(seeds)} seeds x {n} Adam steps, batch {tb.batch}, "
            f"lr {tb.lr} (all methods), {time.perf_counter() - t0:.0f} s\n"
            + tabulate(rows, headers=["variant", "fp loss", "quantized loss", "wins vs qat", "wins vs ptq"])
        )
    return "\n".join(out)


def lm_table(paths: list[Path]) -> str:
    """The LM testbeds' table from examples/train_lm.py JSON records named <group>__<variant>__s<seed>.json."""
    import json

    cells: dict[str, dict[str, dict[int, tuple[float, float]]]] = {}
    for path in paths:
        group, variant, seed = path.stem.split("__")
        r = json.loads(path.read_text())
        cells.setdefault(group, {}).setdefault(variant, {})[int(seed[1:])] = (r["val_loss_fp"], r["val_loss_quant"])
    out = []
    for group, by_var in sorted(cells.items()):
        rows = []
        for variant, res in by_var.items():
            seeds = sorted(res)
            q = [res[s][1] for s in seeds]
            wins = []
            for base in ("qat", "ptq"):
                b = by_var.get(base, {})
                common = [s for s in seeds if s in b]
                wins.append(f"{sum(res[s][1] < b[s][1] for s in common)}/{len(common)}" if base != variant else "")
            rows.append([variant, _ms([res[s][0] for s in seeds], 5), _ms(q, 5), *wins])
        out.append(f"\n{group} ({len(seeds)} seeds)\n" + tabulate(
            rows, headers=["variant", "fp val loss", "quantized val loss", "wins vs qat", "wins vs ptq"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testbeds", default="tuned", help=f"comma list of {list(TESTBEDS)} or groups {list(GROUPS)}")
    p.add_argument("--variants", default="ptq,qat,default,ema (old default),gn lam 0.3,gn lam 0.5,gn lam 1,"
                   "gn lam 0.5 warmup 500,gn lam 1 warmup 300")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lm", default=None, help="print the LM table from the JSON records in this folder instead")
    a = p.parse_args(argv)
    if a.lm:
        print(lm_table(sorted(Path(a.lm).glob("*__*__s*.json"))))
        return
    torch.set_num_threads(1)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    variants = a.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}: choose from {list(VARIANTS)}")
    names = [t for name in a.testbeds.split(",") for t in GROUPS.get(name, [name])]
    for name in names:
        if name not in TESTBEDS:
            p.error(f"unknown testbed {name!r}: choose from {list(TESTBEDS)} or {list(GROUPS)}")
    for name in names:
        print(study([name], variants, seeds, a.steps), flush=True)


if __name__ == "__main__":
    main()
