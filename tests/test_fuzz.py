"""Fuzz: seeded small models x methods x formats through prepare -> 2 train steps ->
quantized_eval -> convert -> deployed forward. The deployed output must equal quantized_eval's.

CI runs a seeded sample of a few dozen cases; LOTION_FUZZ_LONG=1 runs every combination on
three seeds.
"""

import itertools
import os
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lotion_fx

METHODS = ("lotion", "qat", "ptq", "lotion_sampled")
FORMATS = ("int8", "int4", "nvfp4", "mxfp4")
FAMILIES = ("mlp", "conv2d", "tied_lm", "conv1d", "mha")
LONG = os.environ.get("LOTION_FUZZ_LONG") == "1"


class Conv1DStyle(nn.Module):
    """Hugging Face's Conv1D: an (in, out) weight used as addmm(bias, x, W)."""

    def __init__(self, nin: int, nout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nin, nout) / nin**0.5)
        self.bias = nn.Parameter(torch.zeros(nout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class Fuzz(nn.Module):
    """One random stack: a family-specific front, then LayerNorm / Dropout / Linear layers."""

    def __init__(self, family: str, rng: random.Random) -> None:
        super().__init__()
        self.family = family
        d = rng.choice((32, 64))
        self.vocab = 48
        if family == "conv2d":
            self.front = nn.Conv2d(3, 4, 3, padding=1)
            self.proj = nn.Linear(4 * 4 * 4, d)
        elif family == "tied_lm":
            self.emb = nn.Embedding(self.vocab, d)
        elif family == "conv1d":
            self.front = Conv1DStyle(d, d)
        elif family == "mha":
            self.front = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(rng.choice((0.0, 0.1)))
        width = rng.choice((32, 64))
        self.fc1 = nn.Linear(d, width)
        self.fc2 = nn.Linear(width, d, bias=rng.random() < 0.5)
        if family == "tied_lm":
            self.head = nn.Linear(d, self.vocab, bias=False)
            self.head.weight = self.emb.weight

    def example(self, gen: torch.Generator) -> torch.Tensor:
        if self.family == "conv2d":
            return torch.randn(2, 3, 4, 4, generator=gen)
        if self.family == "tied_lm":
            return torch.randint(0, self.vocab, (2, 5), generator=gen)
        return torch.randn(2, 5, self.fc1.in_features, generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "conv2d":
            h = self.proj(torch.relu(self.front(x)).flatten(1))
        elif self.family == "tied_lm":
            h = self.emb(x)
        elif self.family == "conv1d":
            h = self.front(x)
        elif self.family == "mha":
            h = self.front(x, x, x, need_weights=False)[0]
        else:
            h = x
        h = h + self.fc2(self.drop(F.gelu(self.fc1(self.ln(h)))))
        return self.head(h) if self.family == "tied_lm" else h


def _cases() -> list[tuple[str, str, str, int]]:
    every = list(itertools.product(FAMILIES, METHODS, FORMATS))
    if LONG:
        return [(*c, seed) for c in every for seed in range(3)]
    rng = random.Random(12)
    return [(*c, i) for i, c in enumerate(rng.sample(every, 30))]


def _param(case: tuple[str, str, str, int]):
    family = case[0]
    return pytest.param(*case, id="-".join(map(str, case)))


@pytest.mark.parametrize("family,method,fmt,seed", [_param(c) for c in _cases()])
def test_fuzz_deployed_equals_quantized_eval(family, method, fmt, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Fuzz(family, rng)
    x = model.example(gen)
    cfg = lotion_fx.LotionConfig(method=method, format=fmt, seed=seed, lam_warmup=0)
    # symbolic_trace cannot trace MultiheadAttention or a reshape(*x.shape[:-1], -1): torch.export
    example = (x,) if family in ("mha", "conv1d") else None
    prepared = lotion_fx.prepare(model, cfg, example_inputs=example)
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    prepared.train()
    for _ in range(2):
        lotion_fx.curvature_step(prepared, x, loss="mse")  # lotion: curvature (and penalty) from step 1
        loss = prepared(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad(), lotion_fx.quantized_eval(prepared) as q:
        expected = q(x)
        assert torch.equal(expected, q(x))  # eval is deterministic (dropout off)
    assert torch.isfinite(expected).all()
    deployed = lotion_fx.convert(prepared).eval()
    with torch.no_grad():
        got = deployed(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
