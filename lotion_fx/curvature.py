"""The `gn_sampled` curvature: a Gauss-Newton diagonal of the right scale, from sampled targets.

For a loss that is a mean over N terms (examples, or tokens), L = (1/N) sum_n l(f_n(w), y_n), the
Gauss-Newton matrix is G = (1/N) sum_n J_n^T H_n J_n (H_n: the Hessian of l in the model output).
Draw a target from the model's own predictive distribution for every term and backpropagate
u_n = (1/sqrt(N)) * dl(f_n, y~_n)/df_n: its covariance is H_n / N (the Fisher of an exponential
family equals its Gauss-Newton matrix), the terms are independent with mean zero, so the squared
gradient v = sum_n J_n^T u_n is an unbiased estimate of diag(G) at the scale of the user's loss
(Sophia's "Gauss-Newton-Bartlett" estimator, Liu et al. 2023). Unlike squared task gradients it
does not shrink as the fit improves, and it contains no penalty gradient (no feedback).

`kfac_diag` reads the same pass inside each Linear instead of squaring its weight gradient: with x_m
its input rows and delta_m the gradient of its output rows (m over all leading dims, delta carrying
the 1/sqrt(N)), v_ij = sum_m delta_mi x_mj, and for uncorrelated rows E[v_ij^2] = sum_m E[delta_mi^2]
x_mj^2. Taking delta independent of x (K-FAC's assumption) factorises that into
M * mean_m(delta_mi^2) * mean_m(x_mj^2) = (sum_m delta_mi^2) * mean_m(x_mj^2): two vectors, the same
scale as `gn_sampled`, exact in expectation when delta does not depend on x (e.g. a Linear model
under MSE). Each factor is an EMA over refreshes with its own bias correction.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import reference as R
from .api import prepared_info, smoothed_weight, smoothers
from .smoother import advance_all, data_parallel, fold_sampled_all, set_sampling_all

LOSSES = ("cross_entropy", "mse")
SAMPLED = ("gn_sampled", "kfac_diag")  # the estimators refreshed by curvature_step's sampled pass


class _WithGradient(torch.autograd.Function):
    """`value` in the forward, the precomputed `grad` (times the incoming gradient) in the backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, value: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None


def _sampled_cross_entropy(logits: Tensor, key: Tensor, first_row: int = 0, n: int | None = None
                           ) -> tuple[Tensor, Tensor]:
    """(summed cross-entropy / sqrt(n), its gradient in `logits` (rows, V)) at labels drawn from
    softmax(logits) by the Gumbel-max trick, argmax(logits - log(-log(U))), with U the counter-based
    noise keyed by `key` (24 bits, taken at bin centres: the Gumbel tail is cut at 17.3, a 3e-8
    chance per logit). Pointwise and row reductions only, so Inductor fuses it into two passes.
    `first_row`, `n`: these rows are a slice of n (the same noise and scale as the whole)."""
    x = logits.float()
    n = x.shape[0] if n is None else n
    u = R.uniform_noise(x.numel(), key, 0, x.device, first_row * x.shape[-1]).reshape(x.shape) + 2.0**-25
    target = (x - torch.log(-torch.log(u))).argmax(-1, keepdim=True)
    p = x.softmax(-1)
    picked = p.gather(-1, target)
    hit = torch.arange(x.shape[-1], device=x.device) == target
    grad = torch.where(hit, p - 1.0, p) * (1.0 / math.sqrt(n))
    return -picked.log().sum() / math.sqrt(n), grad.to(logits.dtype)


def _sampled_cross_entropy_in_slices(logits: Tensor, key: Tensor, elements: int = 1 << 22
                                     ) -> tuple[Tensor, Tensor]:
    """_sampled_cross_entropy over slices of about `elements` logits: the same labels and gradient with
    O(elements) temporaries (eager, the noise alone holds ~3 int64 copies of its input)."""
    n, v = logits.shape
    rows = max(1, elements // max(v, 1))
    parts = [_sampled_cross_entropy(logits[i:i + rows], key, i, n) for i in range(0, max(n, 1), rows)]
    return torch.stack([p[0] for p in parts]).sum(), torch.cat([p[1] for p in parts])


# On CUDA compiled (eager, the noise is ~20 int64 kernels over N x V, and softmax, sampling and the
# gradient are separate full passes over the logits: 10 ms per refresh on GPT-2, batch 8 x 1024).
_SAMPLED_CE_COMPILED: Any = None


def sampled_target_loss(
    output: Tensor, loss: str = "cross_entropy", generator: torch.Generator | None = None
) -> Tensor:
    """A scalar whose gradient in `output` is sum_n u_n, with Cov(u_n) = the Hessian of the mean loss.

    loss="cross_entropy": `output` holds logits over its last dim, the user's loss is the mean
        cross-entropy over all other positions (F.cross_entropy's default); targets ~ softmax.
        The value and gradient are F.cross_entropy's (summed, / sqrt(N)) at the sampled targets.
    loss="mse": the user's loss is F.mse_loss's mean over all elements, (1/M) sum (y - f)^2, whose
        Hessian is 2/M per element; u ~ N(0, 2/M).
    """
    if loss == "cross_entropy":
        global _SAMPLED_CE_COMPILED
        logits = output.reshape(-1, output.shape[-1])
        dev = generator.device if generator is not None else logits.device
        key = torch.randint(0, 2**31, (), generator=generator, device=dev).to(logits.device)
        with torch.no_grad():
            if logits.is_cuda:
                if _SAMPLED_CE_COMPILED is None:
                    _SAMPLED_CE_COMPILED = torch.compile(_sampled_cross_entropy, fullgraph=True)
                value, grad = _SAMPLED_CE_COMPILED(logits.detach(), key)
            else:  # eager: a few full-size int64 temporaries each, so bounded slices of rows
                value, grad = _sampled_cross_entropy_in_slices(logits.detach(), key)
        return _WithGradient.apply(logits, value, grad)
    out = output.float()
    if loss == "mse":
        noise = torch.randn(out.shape, generator=generator, device=out.device)
        return (out * noise.mul_(math.sqrt(2.0 / out.numel()))).sum()
    raise ValueError(f"unknown loss {loss!r}: choose one of {list(LOSSES)}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The prepared module under torch.compile (OptimizedModule) and/or DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or not isinstance(inner, nn.Module):
            return model
        model = inner


def _forward_module(model: nn.Module) -> nn.Module:
    """What curvature_step runs: `model`, minus a DistributedDataParallel wrapper, whose reducer
    expects every forward to be followed by a .backward() (the ranks' estimates are averaged in
    _all_reduce_mean instead)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, DDP):
        return inner.module
    return model.module if isinstance(model, DDP) else model


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"curvature_step needs the model output as a tensor of logits/predictions (or an object "
        f"with .logits), got {type(out).__name__}; pass output_fn=lambda out: <the predictions>"
    )


def curvature_step(
    model: nn.Module,
    *inputs: Any,
    loss: str = "cross_entropy",
    loss_scale: float = 1.0,
    output_fn: Any = None,
    batch_fraction: float | None = None,
    **kwargs: Any,
) -> bool:
    """Call once per optimizer step with the step's inputs; returns True when g was refreshed.

    Every `curvature_every` calls (the first call included) it runs `model(*inputs, **kwargs)` with
    targets sampled from the model's own predictions, one backward with the penalty switched off,
    and folds the squared gradient of every smoothed weight into its `g` (the `gn_sampled`
    estimator), or the Linear's input and output-gradient statistics into its factors
    (`kfac_diag`); it also moves lam along its warm-up schedule. Pass the same callable you train
    (the torch.compile'd module works and reuses its graphs). `loss_scale`: the user's loss is
    loss_scale times `loss` (e.g. 0.5 * sum over K outputs of a squared error = K/2 * "mse").
    No .grad is written, so call it before or after the training forward/backward, not between.
    The sampled pass runs on the first examples only (`LotionConfig.curvature_batch_fraction`, see
    `first_examples`); `batch_fraction` overrides it for this call (1.0: inputs already cut, as
    LotionTrainer does so that its labels match). Cost: one extra forward and backward on that part
    of the batch every `curvature_every` steps.
    """
    prepared = _unwrap(model)
    info = prepared_info(prepared)
    cfg = info.config
    smooth = smoothers(prepared)
    if cfg.method != "lotion" or not smooth:
        return False
    first = next(iter(smooth.values()))
    step = first.steps_taken()
    refresh = cfg.curvature in SAMPLED and step % cfg.curvature_every == 0 and not first.qat_finish_at(step + 1)
    if refresh:
        if not (inputs or kwargs):
            raise ValueError(
                f"curvature={cfg.curvature!r} needs the step's inputs: lotion_fx.curvature_step(model, x) "
                "(the same arguments as model(x))"
            )
        fraction = cfg.curvature_batch_fraction if batch_fraction is None else batch_fraction
        inputs, kwargs = first_examples(inputs, kwargs, fraction)
        _refresh(model, prepared, smooth, cfg.seed, step, loss, loss_scale, output_fn,
                 inputs, kwargs)
    advance_all(list(smooth.values()))
    return refresh


def first_examples(inputs: tuple, kwargs: dict, fraction: float) -> tuple[tuple, dict]:
    """The sampled pass's arguments: the first ceil(fraction * B) examples of every tensor argument
    whose leading dim is B, the batch size of the first tensor argument; anything else as given.
    The estimate stays unbiased: the GN diagonal of a mean loss is the mean over examples."""
    if fraction >= 1.0:
        return inputs, kwargs
    first = next((t for t in (*inputs, *kwargs.values()) if isinstance(t, Tensor) and t.dim() >= 1), None)
    if first is None:
        return inputs, kwargs
    b = first.shape[0]
    k = max(1, math.ceil(fraction * b))

    def cut(t: Any) -> Any:
        return t[:k] if isinstance(t, Tensor) and t.dim() >= 1 and t.shape[0] == b else t

    return tuple(cut(t) for t in inputs), {n: cut(t) for n, t in kwargs.items()}


def _refresh(model, prepared, smooth, seed, step, loss, loss_scale, output_fn, inputs, kwargs) -> None:
    names = [n for n in smooth if prepared.get_parameter(n).requires_grad]
    params = [prepared.get_parameter(n) for n in names]
    if not any(type(p).__name__ == "DTensor" for p in params):
        return _refresh_with(model, prepared, smooth, names, params, False, seed, step, loss, loss_scale,
                             output_fn, inputs, kwargs)
    # FSDP2 (fully_shard): the sampled backward writes .grad through FSDP's reduce-scatter, which can
    # land after the backward returns; the user's gradients are put back once the refresh is over.
    everything = list(prepared.parameters())
    saved = [p.grad for p in everything]
    for p in everything:
        p.grad = None
    try:
        _refresh_with(model, prepared, smooth, names, params, True, seed, step, loss, loss_scale,
                      output_fn, inputs, kwargs)
    finally:
        for p, g in zip(everything, saved):
            p.grad = g


def _refresh_with(model, prepared, smooth, names, params, sharded, seed, step, loss, loss_scale, output_fn,
                  inputs, kwargs) -> None:
    curvature = prepared_info(prepared).config.curvature
    factored = curvature == "kfac_diag"
    set_sampling_all(list(smooth.values()), True)
    for sm in smooth.values():
        if factored:
            sm.start_observing()
    try:
        with torch.enable_grad():
            out = _forward_module(model)(*inputs, **kwargs)
            pred = output_fn(out) if output_fn is not None else _logits(out)
            gen = torch.Generator(device=pred.device).manual_seed(R.mix_seed(R.mix_seed(seed, step), _rank()))
            target_loss = sampled_target_loss(pred, loss, gen) * math.sqrt(loss_scale)
            if sharded:
                sq = _fsdp_squared_grads(params, target_loss, [smooth[n].holds_g_shard() for n in names])
            else:
                grads = torch.autograd.grad(target_loss, params, allow_unused=True)
    finally:
        set_sampling_all(list(smooth.values()), False)
        for sm in smooth.values():
            if factored:
                sm.stop_observing()
    if sharded:
        grads = sq  # already squared and the same on every rank (kfac_diag: only which are missing)
    missing = [n for n, gr in zip(names, grads) if gr is None]
    if missing:
        warnings.warn(
            f"curvature_step got no gradient for {len(missing)} trainable smoothed weights (e.g. "
            f"{missing[0]!r}): their g was not refreshed. Reentrant gradient checkpointing does this "
            "(use use_reentrant=False); so do weights the forward does not use", stacklevel=3,
        )
    if factored:  # the observers saw x and delta during that pass; the gradients are not needed
        live = [smooth[n] for n, gr in zip(names, grads) if gr is not None]
        _all_reduce_mean([t for sm in live for t in sm.observed()])
        for sm in live:
            sm.fold_observed()
        return
    square = False  # FSDP2: sq holds the squares already
    if not sharded and data_parallel():  # DDP: the ranks' squared gradients are averaged, then folded
        sq = [None if gr is None else gr.float().square() for gr in grads]
        _all_reduce_mean([s for s in sq if s is not None])
    elif not sharded:  # one process: the fold squares them in its fused pass
        sq, square = grads, True
    # in the smoother's (out, in) view of the weight, or already the rows of its g shard
    fold_sampled_all([(smooth[n], s if smooth[n].holds_g_shard() else smoothed_weight(prepared, n, s))
                      for n, s in zip(names, sq) if s is not None], square=square)


def _fsdp_squared_grads(params: list[Tensor], target_loss: Tensor, local: list[bool]) -> list[Tensor | None]:
    """FSDP2: the backward reduce-scatters the ranks' sampled gradients into their mean, sharded by
    rows. Each rank's targets are independent and zero-mean, so E[R * mean^2] = mean_r E[v_r^2] (what
    DDP averages): unbiased. Returned as this rank's rows where `local` (g held as the same row shard),
    else as full tensors, identical on every rank."""
    import torch.distributed as dist

    target_loss.backward()
    out: list[Tensor | None] = []
    for p, keep in zip(params, local):
        if p.grad is None:
            out.append(None)
        elif type(p.grad).__name__ != "DTensor":
            raise RuntimeError(
                "curvature_step under FSDP2 needs the gradient reduction on: call it with "
                "set_requires_gradient_sync(True) (e.g. before the first micro-batch of a step)"
            )
        else:
            sq = p.grad.float().square() * dist.get_world_size()
            out.append(sq.to_local() if keep else sq.full_tensor())
    return out


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average the squared sampled gradients (or kfac_diag's sums) over data-parallel ranks (each is
    unbiased locally)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
