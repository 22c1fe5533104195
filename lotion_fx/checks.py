"""Input checks shared by prepare and convert: weights must be finite and materialized.

A NaN or Inf weight would otherwise be turned into finite codes by the export (one NaN zeroes
its whole block), so a diverged run would deploy looking healthy.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


def non_finite_summary(weight: Tensor) -> str | None:
    """'k NaN and m Inf of n values' for a weight holding any, else None (meta tensors: None)."""
    if weight.is_meta:
        return None
    w = weight.detach()
    nan = int(torch.isnan(w).sum())
    inf = int(torch.isinf(w).sum())
    if nan == 0 and inf == 0:
        return None
    return f"{nan} NaN and {inf} Inf of {w.numel()} values"


def check_finite_weights(weights: Iterable[tuple[str, Tensor]], action: str) -> None:
    """Raise ValueError naming every layer whose weight holds NaN/Inf; `action` is what refuses
    (e.g. "lotion_fx.convert"). weights: (layer name, weight) pairs."""
    bad = [(name, why) for name, w in weights if (why := non_finite_summary(w)) is not None]
    if bad:
        lines = "\n  ".join(f"layer {name!r}: weight has {why}" for name, why in bad)
        raise ValueError(
            f"{action} refused: non-finite weights (the model was left unchanged)\n  {lines}\n"
            "The run has probably diverged: load an earlier checkpoint or lower the learning rate."
        )


def check_materialized(model: nn.Module, action: str) -> None:
    """Raise ValueError if a parameter or buffer of `model` is on the meta device (deferred init)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    meta = [name for name, t in tensors if t.is_meta]
    if meta:
        shown = ", ".join(repr(n) for n in meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"{action}: {shown} {'is' if len(meta) == 1 else 'are'} on the meta device (deferred "
            "initialization). Materialize the model first (model.to_empty(device=...) and then "
            "load_state_dict or initialize the weights), then call lotion_fx.prepare; the model "
            "was left unchanged."
        )
