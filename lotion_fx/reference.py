"""Reference implementation in plain torch: block scales, RTN, stochastic rounding, variance, penalty.

Every fast path (custom-op kernels, Inductor lowerings, Triton kernels, the torchao export) is
tested against these functions. They use only elementwise arithmetic, floor and per-block
reductions, so Inductor can also lower them directly into one fused kernel.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .formats import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    E8M0_MAX_EXP,
    E8M0_MIN_EXP,
    PER_TENSOR,
    Format,
    as_block_spec,
    get_format,
)


# (share, ties) -> the same summed over every row shard of a weight (distributed.penalty_grad_rows)
ShareReduce = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------- blocks
def resolve_block(block_size: int | str | None, fmt: Format | str, in_features: int) -> int:
    """Normalise a block-size spec (or a torchao granularity) to a column count (0 = per tensor),
    validating divisibility."""
    fmt = get_format(fmt)
    spec = fmt.default_block if block_size is None else as_block_spec(block_size)
    if spec == "row":
        return in_features
    if spec == "tensor":
        return PER_TENSOR
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 0:
        raise ValueError(
            f"block_size must be a positive int, 'row', 'tensor' or None, got {block_size!r}"
        )
    if spec == PER_TENSOR:  # the resolved form of "tensor" (LotionConfig refuses a literal 0)
        return PER_TENSOR
    if in_features % spec != 0:
        divisors = [d for d in (8, 16, 32, 64, 128, 256) if in_features % d == 0]
        raise ValueError(
            f"block_size {spec} does not divide in_features {in_features}; "
            f"use a divisor such as {divisors or [in_features]}, 'row', or skip the layer"
        )
    return spec


def to_blocks(w: Tensor, block: int) -> Tensor:
    """View a (..., K) tensor as (rows, K // block, block); block 0 makes a single block."""
    if block == PER_TENSOR:
        return w.reshape(1, 1, -1)
    return w.reshape(-1, w.shape[-1] // block, block)


def compute_dtype(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- scales
def floor_log2(v: Tensor) -> Tensor:
    """Exact floor(log2(v)) for positive finite v (log2 alone can be off by one near 2^k)."""
    e = torch.floor(torch.log2(v))
    e = torch.where(torch.exp2(e) > v, e - 1, e)
    return torch.where(torch.exp2(e + 1) <= v, e + 1, e)


def round_to_e4m3(v: Tensor) -> Tensor:
    """Round non-negative values to FP8 E4M3 (ties to even, saturating at 448), kept in v's dtype."""
    e = floor_log2(torch.clamp(v, min=2.0**-6))  # below 2^-6 the spacing is the subnormal 2^-9
    quantum = torch.exp2(e - 3)
    r = torch.round(v / quantum) * quantum
    return torch.clamp(r, max=E4M3_MAX)


def nvfp4_scales(w: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """NVFP4 recipe: per-tensor fp32 scale and per-block E4M3 scales (as float values).

    The block scale in weight units is `e4m3 * tensor_scale`; both are returned so the export
    can store exactly these numbers.
    """
    wb = to_blocks(w.to(compute_dtype(w)), block)
    return _nvfp4_from_block_amax(wb.abs().amax(dim=-1, keepdim=True))


def _nvfp4_from_block_amax(amax: Tensor) -> tuple[Tensor, Tensor]:
    # the tensor absmax is the max of the block absmaxes (exact), so w is read once
    tensor_amax = amax.amax()
    tensor_scale = torch.where(
        tensor_amax > 0, tensor_amax / (E4M3_MAX * E2M1_MAX), torch.ones_like(tensor_amax)
    )
    raw = amax / E2M1_MAX / tensor_scale
    e4m3 = round_to_e4m3(torch.clamp(raw, min=E4M3_MIN_SUBNORMAL, max=E4M3_MAX))
    return e4m3, tensor_scale


def block_scales(w: Tensor, fmt: Format | str, block: int) -> Tensor:
    """The one scale function used by training, evaluation and export: shape (rows, nblocks, 1).

    All-zero blocks get scale 1 so that they stay exactly zero.
    """
    return _blocks_amax_scales(w, get_format(fmt), block)[2]


def _blocks_amax_scales(w: Tensor, fmt: Format, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """(w in blocks, per-block absmax, per-block scale): one pass over w for all three."""
    wb = to_blocks(w.to(compute_dtype(w)), block)
    amax = wb.abs().amax(dim=-1, keepdim=True)
    if fmt.scale_rule == "absmax":
        s = amax / fmt.qmax
    elif fmt.scale_rule == "nvfp4":
        e4m3, tensor_scale = _nvfp4_from_block_amax(amax)
        s = e4m3 * tensor_scale
    elif fmt.scale_rule == "mxfp4":
        exp = floor_log2(torch.where(amax > 0, amax, torch.ones_like(amax))) - 2
        s = torch.exp2(torch.clamp(exp, E8M0_MIN_EXP, E8M0_MAX_EXP))
    else:  # pragma: no cover - formats are a closed set
        raise AssertionError(fmt.scale_rule)
    return wb, amax, torch.where(amax > 0, s, torch.ones_like(s))


# --------------------------------------------------------------------------- rounding
def _step(m: Tensor, fmt: Format) -> Tensor:
    """Grid spacing of the bin that starts at or below magnitude m."""
    step = torch.full_like(m, fmt.steps[0])
    for start, size in zip(fmt.step_starts[1:], fmt.steps[1:]):
        step = torch.where(m >= start, torch.full_like(m, size), step)
    return step


def grid_neighbors(x: Tensor, fmt: Format | str) -> tuple[Tensor, Tensor, Tensor]:
    """For scaled values x, the magnitude m = min(|x|, qmax) and its grid neighbours a <= m < b.

    Returns (m, a, b); a == m exactly on grid points. Signs are applied by the callers.
    """
    fmt = get_format(fmt)
    m = torch.clamp(x.abs(), max=fmt.qmax)
    step = _step(m, fmt)
    a = torch.floor(m / step) * step
    return m, a, a + step


def round_nearest_scaled(x: Tensor, fmt: Format | str) -> Tensor:
    """RTN on the grid, ties to the even grid index (IEEE ties-to-even for E2M1), then clamp."""
    fmt = get_format(fmt)
    m, a, b = grid_neighbors(x, fmt)
    step = b - a
    k_odd = torch.remainder(torch.round(a / step), 2) == 1
    # Within each bin the grid index of `a` has the parity of a/step (true for every format here).
    up = ((b - m) < (m - a)) | (((b - m) == (m - a)) & k_odd)
    return torch.sign(x) * torch.where(up, b, a)


def round_stochastic_scaled(x: Tensor, fmt: Format | str, u: Tensor) -> Tensor:
    """Unbiased randomized rounding: up to b with probability (m - a) / (b - a), u ~ U[0, 1)."""
    m, a, b = grid_neighbors(x, fmt)
    return torch.sign(x) * torch.where(u < (m - a) / (b - a), b, a)


# --------------------------------------------------------------------------- seeded noise
_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), exact without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(x: Tensor) -> Tensor:
    """lowbias32 integer hash on int64 tensors holding uint32 values (same bits as the Triton kernel)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix_seed(seed: int, salt: int) -> int:
    """Derive a per-layer 32-bit seed from the user's seed and the layer's index."""
    v = torch.tensor([(seed + 0x9E3779B9 * (salt + 1)) & _M32], dtype=torch.int64)
    return int(hash32(v).item())


def uniform_noise(numel: int, seed: int, step: Tensor | int, device: torch.device | str, offset: int = 0) -> Tensor:
    """Counter-based U[0,1) noise, 24 bits, a function of (seed, step, index) alone, for the indices
    offset .. offset + numel - 1 (a slice of a longer stream, bit for bit).

    The same bits come out on every device and in every kernel (reference, Inductor, Triton),
    which is what makes stochastic rounding reproducible across CPU and CUDA.
    """
    step = torch.as_tensor(step, dtype=torch.int64, device=device)
    key = hash32((hash32(step & _M32) ^ (seed & _M32)) & _M32)
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    h = hash32(idx ^ key)
    return (h >> 8).to(torch.float32) * (2.0**-24)


def to_bfloat16_stochastic(x: Tensor, seed: int, step: Tensor | int, offset: int = 0) -> Tensor:
    """fp32 -> bf16 with unbiased stochastic rounding (E = x), noise keyed by (seed, step) and the flat
    element index (`offset`: where x starts in a larger tensor, e.g. a row shard, so the bits match).

    Round-to-nearest bf16 (8 bits of mantissa) drops an EMA increment below half an ulp, 2^-9 of
    g: with beta 0.995 most updates would vanish and g would drift. Adding 16 random low bits to
    the fp32 pattern and truncating keeps the EMA unbiased at 2 bytes of state per weight.
    """
    bits = x.float().contiguous().view(torch.int32)
    noise = (uniform_noise(x.numel(), seed, step, x.device, offset) * 65536.0).to(torch.int32)
    return ((bits + noise.reshape(x.shape)) & -65536).view(torch.float32).to(torch.bfloat16)


# --------------------------------------------------------------------------- public ops
def _blocked_scaled(w: Tensor, fmt: Format, block: int) -> tuple[Tensor, Tensor]:
    wb, amax, s = _blocks_amax_scales(w, fmt, block)
    return _scaled(wb, amax, s, fmt), s


def _scaled(wb: Tensor, amax: Tensor, s: Tensor, fmt: Format) -> Tensor:
    if fmt.scale_rule != "absmax":
        return wb / s
    # w / (amax / qmax) can land one ulp below qmax at the block's absmax, which gives that element
    # (a grid point) a spurious variance and a full-size penalty gradient; (w / amax) * qmax is
    # exactly +-qmax there (x / x == 1 in IEEE arithmetic).
    return torch.where(amax > 0, wb / torch.where(amax > 0, amax, 1.0) * fmt.qmax, wb)


def _resolve(w: Tensor, format: Format | str, block_size: int | str | None) -> tuple[Format, int]:
    if w.dim() < 1:
        raise ValueError("expected a weight with at least one dimension")
    fmt = get_format(format)
    return fmt, resolve_block(block_size, fmt, w.shape[-1])


def quantize(
    w: Tensor, format: Format | str, block_size: int | str | None = None
) -> tuple[Tensor, Tensor]:
    """RTN codes (grid values in scaled units, w's shape) and block scales (rows, nblocks)."""
    fmt, block = _resolve(w, format, block_size)
    x, s = _blocked_scaled(w, fmt, block)
    return round_nearest_scaled(x, fmt).reshape(w.shape), s.squeeze(-1)


def fake_quantize(
    w: Tensor,
    format: Format | str,
    block_size: int | str | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    *,
    seed: int | None = None,
    step: Tensor | int = 0,
) -> Tensor:
    """Quantize-dequantize w on its block grid; returns a tensor of w's shape and dtype.

    rounding="stochastic" draws U[0,1) from `generator` (torch RNG) or, given `seed`, from the
    counter-based noise the training ops use.
    """
    fmt, block = _resolve(w, format, block_size)
    x, s = _blocked_scaled(w, fmt, block)
    if rounding == "nearest":
        q = round_nearest_scaled(x, fmt)
    elif rounding == "stochastic":
        if seed is not None:
            u = uniform_noise(x.numel(), seed, step, w.device).reshape(x.shape).to(x.dtype)
        else:
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=w.device)
        q = round_stochastic_scaled(x, fmt, u)
    else:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
    return (q * s).reshape(w.shape).to(w.dtype)


def rounding_variance(
    w: Tensor, format: Format | str, block_size: int | str | None = None
) -> Tensor:
    """Variance of stochastic rounding per element, in weight units: s^2 (m - a)(b - m)."""
    fmt, block = _resolve(w, format, block_size)
    x, s = _blocked_scaled(w, fmt, block)
    m, a, b = grid_neighbors(x, fmt)
    return (s * s * (m - a) * (b - m)).reshape(w.shape)


def _grid_terms(w: Tensor, fmt: Format, block: int) -> tuple[Tensor, ...]:
    """(w in blocks, block absmax, block scale, scaled x, |x| clamped, grid neighbours a, b): one pass
    shared by both parts of the penalty gradient."""
    wb, amax, s = _blocks_amax_scales(w, fmt, block)
    x = _scaled(wb, amax, s, fmt)
    return (wb, amax, s, x, *grid_neighbors(x, fmt))


def _inside(x: Tensor, m: Tensor, a: Tensor, fmt: Format) -> Tensor:
    """Where sigma^2 is not flat: off the grid points and below the top of the grid."""
    return (m > a) & (x.abs() < fmt.qmax)


def variance_grad(w: Tensor, fmt: Format | str, block: int) -> Tensor:
    """d sigma^2 / dw with the block scale held constant: s (a + b - 2x) on the signed grid.

    Zero on grid points and beyond the top of the grid, where the variance is flat at 0.
    """
    fmt = get_format(fmt)
    return _variance_grad(_grid_terms(w, fmt, block), fmt).reshape(w.shape)


def _variance_grad(terms: tuple[Tensor, ...], fmt: Format) -> Tensor:
    _, _, s, x, m, a, b = terms
    return torch.where(_inside(x, m, a, fmt), torch.sign(x) * s * (a + b - 2 * m), torch.zeros_like(x))


def penalty_value(w: Tensor, g: Tensor, fmt: Format | str, block: int, lam: float) -> Tensor:
    """(lam / 2) * sum_i g_i sigma_i^2(w): the LOTION smoothing penalty of one weight."""
    var = rounding_variance(w, fmt, block)
    return 0.5 * lam * (g.to(var.dtype) * var).sum()


def penalty_grad(
    w: Tensor, g: Tensor, fmt: Format | str, block: int, lam: float, scale_grad: bool = False,
    reduce: ShareReduce | None = None,
) -> Tensor:
    """Gradient of penalty_value in w: (lam/2) g s (a+b-2x) with the block scale held constant;
    with scale_grad, plus the part that flows through the scale (scale_variance_grad; `reduce`: see
    there)."""
    fmt = get_format(fmt)
    terms = _grid_terms(w, fmt, block)
    vg = _variance_grad(terms, fmt)
    pen = 0.5 * lam * to_blocks(g.to(vg.dtype), block) * vg
    if scale_grad:
        pen = pen + _scale_variance_grad(terms, g, fmt, block, lam, reduce)
    return pen.reshape(w.shape)


def scale_variance_grad(
    w: Tensor, g: Tensor, fmt: Format | str, block: int, lam: float, reduce: ShareReduce | None = None
) -> Tensor:
    """The part of d/dw (lam/2) sum g sigma^2 that flows through the scales (exact almost everywhere).

    At fixed |w|, sigma^2 = (|w| - s a)(s b - |w|) has d sigma^2/ds = s (m (a + b) - 2 a b). An absmax
    scale is amax / qmax, so a block's sum reaches its largest |w| (split evenly between ties): it
    pulls the outlier that sets the grid, which shrinks every other weight's rounding variance.
    nvfp4's E4M3 block scales and mxfp4's powers of two are piecewise constant in w (derivative 0);
    nvfp4's fp32 tensor scale is amax / 2688 and every block scale is proportional to it, so its
    share, sum_b s_b dP/ds_b / amax, reaches the tensor's largest |w|. When w holds only some rows of
    the weight, `reduce(share, ties)` sums a per-tensor share and tie count over all of them.
    """
    fmt = get_format(fmt)
    return _scale_variance_grad(_grid_terms(w, fmt, block), g, fmt, block, lam, reduce).reshape(w.shape)


def _scale_variance_grad(terms: tuple[Tensor, ...], g: Tensor, fmt: Format, block: int, lam: float,
                         reduce: ShareReduce | None) -> Tensor:
    wb, amax, s, x, m, a, b = terms
    if fmt.scale_rule == "mxfp4":
        return torch.zeros_like(x)
    gb = to_blocks(g.to(x.dtype), block)
    dp_ds = torch.where(_inside(x, m, a, fmt), (0.5 * lam) * gb * s * (m * (a + b) - 2 * a * b), 0).sum(
        -1, keepdim=True)
    per_block = fmt.scale_rule == "absmax"
    top, share = (amax, dp_ds / fmt.qmax) if per_block else (amax.amax(), (dp_ds * s).sum())
    at_top = (wb.abs() == top) & (top > 0)
    ties = at_top.sum(dim=-1 if per_block else (0, 1, 2), keepdim=per_block).to(x.dtype)
    if reduce is not None and (not per_block or block == PER_TENSOR):
        share, ties = reduce(share, ties)
    if not per_block:  # d(tensor scale)/d amax = tensor scale / amax
        share = share / torch.where(top > 0, top, 1.0)
    return torch.where(at_top, torch.sign(wb) * share / ties.clamp(min=1), 0)


def unclamped_mask(w: Tensor, fmt: Format | str, block: int) -> Tensor:
    """True where RTN did not clamp w at the top of the grid (the QAT straight-through mask)."""
    fmt = get_format(fmt)
    x, _ = _blocked_scaled(w, fmt, block)
    return (x.abs() <= fmt.qmax).reshape(w.shape)


def curvature_factor(count: Tensor, beta: float, curvature_scale: float) -> Tensor:
    """fp32 `curvature_scale / (1 - beta^count)` (Adam-style bias correction); 0 while count is 0."""
    correction = 1.0 - torch.pow(float(beta), count.to(torch.float64))
    return torch.where(
        correction > 0, curvature_scale / correction.clamp(min=1e-300), torch.zeros_like(correction)
    ).to(torch.float32)


def ema_update_(g: Tensor, count: Tensor, task_grad: Tensor, beta: float) -> None:
    """In place: g <- beta g + (1 - beta) task_grad^2, count += 1 (task_grad at full-batch scale)."""
    task = task_grad.to(torch.float32)
    g.mul_(beta).addcmul_(task, task, value=1.0 - beta)
    count.add_(1)
