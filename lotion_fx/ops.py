"""The smoothing node's custom ops (`torch.ops.lotion_fx.*`), with fake kernels and autograd.

Each op is one opaque node to Dynamo and AOTAutograd; `lotion_fx.backends` teaches Inductor to
generate fused code for them. The eager kernels here are the plain-torch reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as R


# --------------------------------------------------------------------------- lotion
@torch.library.custom_op("lotion_fx::lotion_smooth", mutates_args=())
def lotion_smooth(
    w: Tensor,
    g: Tensor,
    count: Tensor,
    weight: Tensor,
    fmt: str,
    block: int,
    beta: float,
    curvature_scale: float,
    grad_accum_steps: int,
    update_curvature: bool,
    scale_grad: bool,
) -> Tensor:
    """Forward of `lotion`: the full-precision weight. The penalty acts in the backward."""
    return w.clone()


@lotion_smooth.register_fake
def _(w, g, count, weight, fmt, block, beta, curvature_scale, grad_accum_steps, update_curvature, scale_grad):
    return torch.empty_like(w)


def lotion_backward_math(
    grad: Tensor, w: Tensor, g: Tensor, count: Tensor, weight: Tensor, fmt: str, block: int,
    beta: float, curvature_scale: float, grad_accum_steps: int, update_curvature: bool,
    scale_grad: bool, penalty_grad=R.penalty_grad,
) -> Tensor:
    """grad + d/dw (weight/2) sum g_hat sigma^2; with update_curvature, then fold grad^2 into g.

    g_hat = curvature_scale * g / (1 - beta^count) is the curvature from *before* this backward, so
    the penalty is a function of (w, g) alone: identical on every data-parallel rank, zero until g
    has data. `weight` (0-dim) is lam times its schedule, read when the backward runs (the smoother
    sets it to 0 for the sampled-target pass of curvature_step). update_curvature is the `ema`
    estimator (g from the task gradient); `gn_sampled` folds g in curvature_step instead, and with
    `adam` g and count are the optimizer's exp_avg_sq and step, read only. scale_grad adds the part
    of the penalty's gradient that flows through the block scales (reference.scale_variance_grad).
    Traceable (the Inductor lowering reuses it), so eager and compiled share one body; the
    distributed after-reduction path runs it too, with a `penalty_grad` that knows the whole
    tensor's absmax when w holds only this rank's rows.
    """
    block = int(block)  # a SymInt under Dynamo; blocks are static
    factor = R.curvature_factor(count, beta, curvature_scale) * weight
    pen = penalty_grad(w, g.float() * factor, fmt, block, 1.0, scale_grad) / grad_accum_steps
    if update_curvature:
        R.ema_update_(g, count, grad * grad_accum_steps, beta)  # undo the 1/k of accumulation
    return grad + pen.to(grad.dtype)


@torch.library.custom_op("lotion_fx::lotion_backward", mutates_args=("g", "count"))
def lotion_backward(
    grad: Tensor,
    w: Tensor,
    g: Tensor,
    count: Tensor,
    weight: Tensor,
    fmt: str,
    block: int,
    beta: float,
    curvature_scale: float,
    grad_accum_steps: int,
    update_curvature: bool,
    scale_grad: bool,
) -> Tensor:
    """The lotion backward as one op (see lotion_backward_math); mutates g and count."""
    return lotion_backward_math(
        grad, w, g, count, weight, fmt, block, beta, curvature_scale, grad_accum_steps,
        update_curvature, scale_grad,
    )


@lotion_backward.register_fake
def _(grad, w, g, count, weight, fmt, block, beta, curvature_scale, grad_accum_steps, update_curvature,
      scale_grad):
    return torch.empty_like(grad)


def _lotion_setup(ctx, inputs, output):
    w, g, count, weight, *rest = inputs
    ctx.save_for_backward(w)
    # g, count and weight are read (and g, count updated) in backward; they are state, not saved
    # activations, so a second forward before this backward must not trip autograd's version check.
    ctx.state = (g, count, weight)
    ctx.rest = rest


def _lotion_bwd(ctx, grad):
    (w,) = ctx.saved_tensors
    g, count, weight = ctx.state
    gw = torch.ops.lotion_fx.lotion_backward(grad, w, g, count, weight, *ctx.rest)
    return (gw,) + (None,) * 10


lotion_smooth.register_autograd(_lotion_bwd, setup_context=_lotion_setup)


# --------------------------------------------------------------------------- lotion_sampled
@torch.library.custom_op("lotion_fx::sr_quantize", mutates_args=())
def sr_quantize(w: Tensor, step: Tensor, fmt: str, block: int, seed: int) -> Tensor:
    """Stochastic rounding with counter-based noise keyed by (seed, step); straight-through grad."""
    return R.fake_quantize(w, fmt, block, rounding="stochastic", seed=seed, step=step)


@sr_quantize.register_fake
def _(w, step, fmt, block, seed):
    return torch.empty_like(w)


def _ste_setup(ctx, inputs, output):
    pass


def _sr_bwd(ctx, grad):
    return grad, None, None, None, None


sr_quantize.register_autograd(_sr_bwd, setup_context=_ste_setup)


# --------------------------------------------------------------------------- qat
@torch.library.custom_op("lotion_fx::rtn_quantize", mutates_args=())
def rtn_quantize(w: Tensor, fmt: str, block: int) -> Tensor:
    """Round-to-nearest fake quantization; straight-through grad, zeroed where RTN clamped."""
    return R.fake_quantize(w, fmt, block, rounding="nearest")


@rtn_quantize.register_fake
def _(w, fmt, block):
    return torch.empty_like(w)


@torch.library.custom_op("lotion_fx::rtn_ste_backward", mutates_args=())
def rtn_ste_backward(grad: Tensor, w: Tensor, fmt: str, block: int) -> Tensor:
    """The QAT straight-through gradient: grad where w was inside the grid, 0 where clamped."""
    return grad * R.unclamped_mask(w, fmt, block).to(grad.dtype)


@rtn_ste_backward.register_fake
def _(grad, w, fmt, block):
    return torch.empty_like(grad)


def _rtn_setup(ctx, inputs, output):
    w, fmt, block = inputs
    ctx.save_for_backward(w)
    ctx.fmt, ctx.block = fmt, block


def _rtn_bwd(ctx, grad):
    (w,) = ctx.saved_tensors
    return torch.ops.lotion_fx.rtn_ste_backward(grad, w, ctx.fmt, ctx.block), None, None


rtn_quantize.register_autograd(_rtn_bwd, setup_context=_rtn_setup)


# --------------------------------------------------------------------------- lotion, kfac_diag curvature
def lotion_backward_factored_math(
    grad: Tensor, w: Tensor, a: Tensor, b: Tensor, count: Tensor, weight: Tensor, fmt: str,
    block: int, beta: float, curvature_scale: float, grad_accum_steps: int, scale_grad: bool,
) -> Tensor:
    """lotion_backward_math with g = b a^T formed here (state stays O(in + out)); each factor is an
    EMA with its own bias correction, so a second 1/(1 - beta^count) rides on `weight`."""
    g = b.float()[:, None] * a.float()[None, :]
    weight = weight * R.curvature_factor(count, beta, 1.0)
    return lotion_backward_math(grad, w, g, count, weight, fmt, block, beta, curvature_scale,
                                grad_accum_steps, False, scale_grad)


@torch.library.custom_op("lotion_fx::lotion_smooth_factored", mutates_args=())
def lotion_smooth_factored(
    w: Tensor, a: Tensor, b: Tensor, count: Tensor, weight: Tensor, fmt: str, block: int,
    beta: float, curvature_scale: float, grad_accum_steps: int, scale_grad: bool,
) -> Tensor:
    """Forward of `lotion` with the factored curvature g = b a^T (kfac_diag): the weight itself."""
    return w.clone()


@lotion_smooth_factored.register_fake
def _(w, a, b, count, weight, fmt, block, beta, curvature_scale, grad_accum_steps, scale_grad):
    return torch.empty_like(w)


@torch.library.custom_op("lotion_fx::lotion_backward_factored", mutates_args=())
def lotion_backward_factored(
    grad: Tensor, w: Tensor, a: Tensor, b: Tensor, count: Tensor, weight: Tensor, fmt: str,
    block: int, beta: float, curvature_scale: float, grad_accum_steps: int, scale_grad: bool,
) -> Tensor:
    """The kfac_diag lotion backward as one op (see lotion_backward_factored_math)."""
    return lotion_backward_factored_math(grad, w, a, b, count, weight, fmt, block, beta,
                                         curvature_scale, grad_accum_steps, scale_grad)


@lotion_backward_factored.register_fake
def _(grad, w, a, b, count, weight, fmt, block, beta, curvature_scale, grad_accum_steps, scale_grad):
    return torch.empty_like(grad)


def _factored_setup(ctx, inputs, output):
    w, a, b, count, weight, *rest = inputs
    ctx.save_for_backward(w)
    ctx.state = (a, b, count, weight)  # state read at backward time, as in _lotion_setup
    ctx.rest = rest


def _factored_bwd(ctx, grad):
    (w,) = ctx.saved_tensors
    gw = torch.ops.lotion_fx.lotion_backward_factored(grad, w, *ctx.state, *ctx.rest)
    return (gw,) + (None,) * 10


lotion_smooth_factored.register_autograd(_factored_bwd, setup_context=_factored_setup)


# --------------------------------------------------------------------------- kfac_diag observers
def kfac_observe_input_math(x: Tensor, sq_sum: Tensor, rows: Tensor) -> None:
    """sq_sum += sum over rows of x^2 (per input feature), rows += number of rows (all leading dims)."""
    x2 = x.reshape(-1, sq_sum.shape[0]).float()
    sq_sum.add_(x2.square().sum(0))
    rows.add_(x2.shape[0])


@torch.library.custom_op("lotion_fx::kfac_observe_input", mutates_args=("sq_sum", "rows"))
def kfac_observe_input(x: Tensor, sq_sum: Tensor, rows: Tensor) -> None:
    """kfac_diag: accumulate a Linear input's per-feature sum of squares and its row count."""
    kfac_observe_input_math(x, sq_sum, rows)


@kfac_observe_input.register_fake
def _(x, sq_sum, rows):
    return None


def kfac_output_backward_math(grad: Tensor, sq_sum: Tensor) -> None:
    """sq_sum += sum over rows of grad^2 (per output feature)."""
    sq_sum.add_(grad.reshape(-1, sq_sum.shape[0]).float().square().sum(0))


@torch.library.custom_op("lotion_fx::kfac_output_backward", mutates_args=("sq_sum",))
def kfac_output_backward(grad: Tensor, sq_sum: Tensor) -> None:
    """kfac_diag: accumulate the output gradient's per-feature sum of squares (in the backward)."""
    kfac_output_backward_math(grad, sq_sum)


@kfac_output_backward.register_fake
def _(grad, sq_sum):
    return None


@torch.library.custom_op("lotion_fx::kfac_observe_output", mutates_args=())
def kfac_observe_output(y: Tensor, sq_sum: Tensor) -> Tensor:
    """Identity on a Linear's output; its backward folds the output gradient into sq_sum."""
    return y.clone()


@kfac_observe_output.register_fake
def _(y, sq_sum):
    return torch.empty_like(y)


def _observe_output_setup(ctx, inputs, output):
    ctx.state = inputs[1]  # state, not a saved activation (see _lotion_setup)


def _observe_output_bwd(ctx, grad):
    torch.ops.lotion_fx.kfac_output_backward(grad, ctx.state)
    return grad, None


kfac_observe_output.register_autograd(_observe_output_bwd, setup_context=_observe_output_setup)
