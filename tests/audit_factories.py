"""Small seeded models and data for the audit tests and the CLI (`lotion-fx audit audit_factories:...`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lotion_fx
from examples.gpt import GPT, GPTConfig


class TiedMLP(nn.Module):
    """Token MLP whose output head shares the embedding matrix (a tied weight)."""

    def __init__(self, vocab: int = 32, dim: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        return self.head(h + self.fc2(F.relu(self.fc1(h))))


class DeepMLP(nn.Module):
    """Regression MLP whose layers differ in width, so they differ in sensitivity."""

    def __init__(self, widths: tuple[int, ...] = (32, 128, 32, 64, 96, 8)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def tied_mlp() -> nn.Module:
    torch.manual_seed(0)
    return TiedMLP()


def deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    return DeepMLP()


def tiny_gpt() -> nn.Module:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", vocab_size=64))


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def regression_batches(seed: int, n: int, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and targets from a fixed random teacher MLP (same teacher for every seed)."""
    torch.manual_seed(1234)
    teacher = DeepMLP((32, 64, 8))
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.randn(batch, 32, generator=gen)
            out.append((x, teacher(x) * 3))
    return out


def trained_deep_mlp(seed: int = 0, steps: int = 150, format: str = "int4", block_size: int = 32,
                     curvature_scale: float = 64.0) -> nn.Module:
    """DeepMLP prepared with method='lotion', curvature='ema' (the audit's ranking study of the
    README), trained a few steps so it has curvature."""
    torch.manual_seed(seed)
    prepared = lotion_fx.prepare(DeepMLP(), lotion_fx.LotionConfig(
        format=format, block_size=block_size, curvature="ema", beta=0.99, curvature_scale=curvature_scale))
    opt = torch.optim.Adam(prepared.parameters(), lr=3e-3)
    for b in regression_batches(seed, steps):
        mse_loss(prepared, b).backward()
        opt.step()
        opt.zero_grad()
    return prepared


def deep_mlp_data() -> tuple[list, object]:
    """Held-out batches and the loss function, for `audit(..., data)` and `lotion-fx audit --data`."""
    return regression_batches(10_000, 4, batch=256), mse_loss
