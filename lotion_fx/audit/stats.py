"""Per-weight statistics of the audit: how a weight quantizes and what its export weighs.

bytes_ideal is the ideal packed size, `Format.export_bytes`: ceil(numel * bits / 8) + num_blocks *
scale_bytes + tensor_scale_bytes (fp32 scales 4 bytes for int8/int4, E4M3 1 byte plus an fp32
tensor scale for nvfp4, E8M0 1 byte for mxfp4). bytes_export is what `convert` produces (the
torchao tensor, plus any dequantized copy a tied owner gets). Biases are not counted.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lotion_fx import passes
from lotion_fx.backends import torchao_export as X

from .. import reference as R
from ..convert import owners_linear_first, placement
from ..formats import get_format


def export_bytes(numel: int, num_blocks: int, format: str) -> int:
    """Ideal packed size of a quantized weight in `format` (Format.export_bytes)."""
    return get_format(format).export_bytes(numel, num_blocks)


@torch.no_grad()
def layer_stats(w: Tensor, format: str, block: int) -> dict:
    """Quantization statistics of one (out, in) weight, in float64 from the reference functions."""
    fmt = get_format(format)
    w64 = w.detach().to(torch.float64)
    s = R.block_scales(w64, fmt, block)
    q = R.fake_quantize(w64, fmt, block)
    clamped = ~R.unclamped_mask(w64, fmt, block)
    norm = torch.linalg.vector_norm(w64)
    ideal = fmt.export_bytes(w.numel(), s.numel())
    return dict(
        num_blocks=s.numel(),
        scale_min=float(s.min()),
        scale_max=float(s.max()),
        mean_variance=float(R.rounding_variance(w64, fmt, block).mean()),
        rtn_rel_error=float(torch.linalg.vector_norm(w64 - q) / norm) if norm > 0 else 0.0,
        frac_clamped=float(clamped.double().mean()),
        bytes_full=w.numel() * w.element_size(),
        bytes_export=ideal,
        bytes_ideal=ideal,
    )


@torch.no_grad()
def convert_bytes(original: nn.Module, rec: passes.RewrittenWeight, w: Tensor, fmt: str) -> int | None:
    """Bytes `convert` stores for this weight with the format's default torchao target: the tensor
    it builds plus a dequantized copy for each owner that cannot hold it (None: convert cannot
    export this layer)."""
    target = get_format(fmt).default_torchao_target
    wq = rec.as_out_in(w.detach())
    if X.unsupported_reason(fmt, rec.block, target, tuple(wq.shape), wq.dtype, wq.device) is not None:
        return None
    owners = owners_linear_first(original, [rec.param_name, *rec.aliases])
    copies = sum(placement(owner, leaf, rec.transposed, target) == "copy" for _, owner, leaf in owners)
    return X.nbytes(X.to_torchao(wq, fmt, rec.block, target)) + copies * w.numel() * w.element_size()


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 points or no spread."""
    if len(x) < 3:
        return None

    def ranks(v: Sequence[float]) -> Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        return ((t[None, :] < t[:, None]).sum(1) + ((t[None, :] == t[:, None]).sum(1) - 1) / 2.0).double()

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return None if den == 0 else float((rx * ry).sum()) / den
