"""Which layers will hurt: the penalty's estimate (1/2) sum g sigma^2 per weight, and the measured
loss increase of quantizing each layer alone and all together (through `quantized_eval`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import reference as R
from ..api import quantized_eval, smoothed_weight, smoothers


@dataclass
class AuditData:
    """A few batches and `loss_fn(model, batch) -> scalar mean loss` for the measured sensitivity."""

    batches: Sequence[Any]
    loss_fn: Callable[[nn.Module, Any], Tensor]


def as_data(data: Any) -> AuditData | None:
    """AuditData from an AuditData, a pair (batches, loss_fn) or None; a clear error for anything else."""
    if data is None or isinstance(data, AuditData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and callable(data[1]):
        return AuditData(list(data[0]), data[1])
    raise TypeError(
        "data must be lotion_fx.AuditData(batches, loss_fn) or a pair (batches, loss_fn) with "
        "loss_fn(model, batch) -> scalar loss"
    )


def state_curvature(prepared: nn.Module) -> dict[str, Tensor] | None:
    """The curvature each smoother's penalty uses now (LotionSmoother.g_hat), float64, per
    parameter; None unless every smoother has one."""
    out: dict[str, Tensor] = {}
    for name, sm in smoothers(prepared).items():
        if sm.config.method != "lotion":
            return None
        try:
            g_hat = sm.g_hat(prepared.get_parameter(name))
        except RuntimeError:  # curvature='adam' without attach_optimizer
            return None
        if g_hat is None:
            return None
        out[name] = g_hat.detach().double()
    return out


def mean_loss(model: nn.Module, data: AuditData) -> float:
    """The loss averaged over data's batches, without autograd."""
    with torch.no_grad():
        return sum(float(data.loss_fn(model, b)) for b in data.batches) / len(data.batches)


def data_curvature(prepared: nn.Module, data: AuditData, scale: float) -> dict[str, Tensor]:
    """g = curvature_scale * mean over batches of the squared mini-batch gradient, in the smoother's
    (out, in) layout (eval mode, so the smoothing nodes are the identity and their state is
    untouched; no .grad is left behind)."""
    names = [n for n in smoothers(prepared) if prepared.get_parameter(n).requires_grad]
    params = [prepared.get_parameter(n) for n in names]
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for b in data.batches:
        grads = torch.autograd.grad(data.loss_fn(prepared, b), params, allow_unused=True)
        for a, gr in zip(acc, grads):
            if gr is not None:
                a.add_(gr.double() ** 2)
    return {n: smoothed_weight(prepared, n, a) * (scale / len(data.batches)) for n, a in zip(names, acc)}


def penalty_estimates(prepared: nn.Module, g: dict[str, Tensor]) -> dict[str, float]:
    """(1/2) sum g sigma^2 (lam = 1) of each weight that has a curvature in g."""
    smooth = smoothers(prepared)
    return {
        name: float(R.penalty_value(smoothed_weight(prepared, name).detach().double(), g_name,
                                    smooth[name].fmt, smooth[name].block, 1.0))
        for name, g_name in g.items()
    }


def measure(prepared: nn.Module, data: AuditData, names: list[str]) -> tuple[float, dict[str, float], float]:
    """(base loss, loss increase of each layer quantized alone, increase with all quantized)."""
    base = mean_loss(prepared, data)
    alone: dict[str, float] = {}
    for name in names:
        with quantized_eval(prepared, [name]):
            alone[name] = mean_loss(prepared, data) - base
    with quantized_eval(prepared, names):
        everything = mean_loss(prepared, data) - base
    return base, alone, everything
