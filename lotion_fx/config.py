"""The user-facing configuration of `prepare`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .formats import as_block_spec, get_format

METHODS = ("lotion", "lotion_sampled", "qat", "ptq", "none")
CURVATURES = ("gn_sampled", "ema", "adam", "kfac_diag")
# EMA decay of g when the config leaves beta=None: per optimizer step for `ema`, per refresh
# (every `curvature_every` steps) for `gn_sampled`.
DEFAULT_BETA = {"ema": 0.999, "gn_sampled": 0.95, "adam": 0.999, "kfac_diag": 0.95}
# lam warm-up (optimizer steps) when the config leaves lam_warmup=None: curvature_step advances it,
# so only the estimator that needs that call in the loop gets one (README: choosing the default).
DEFAULT_LAM_WARMUP = {"gn_sampled": 500, "ema": 0, "adam": 0, "kfac_diag": 500}


@dataclass(frozen=True)
class LotionConfig:
    """How `prepare` rewrites Linear weights and what the smoothing node does in training.

    method: "lotion" (smoothed loss via the curvature-weighted variance penalty, default),
        "lotion_sampled" (stochastic rounding in the forward, straight-through backward),
        "qat" (round-to-nearest forward, straight-through backward), "ptq" (training untouched),
        "none" (capture and pass only; the node is the identity).
    format / block_size: the deployment format and its block ("row", "tensor", k columns, or
        None for the format's default: int8 per row, int4 32, nvfp4 16, mxfp4 32); torchao's
        PerGroup(k), PerAxis(0) / PerRow() and PerTensor() are accepted and stored as k, "row", "tensor".
    lam: weight of the penalty (lam / 2) * sum g * sigma^2. With a curvature of the right scale
        (`gn_sampled`), lam = 1 is the second-order expansion of E[L(SR(w))].
    lam_warmup: optimizer steps (calls of `lotion_fx.curvature_step`) over which lam ramps linearly
        from 0 (None: 500 for "gn_sampled"/"kfac_diag", 0 for "ema"/"adam"; 0 = constant lam from the
        first step). Full strength from the start snaps weights to the grid before they have settled
        (README: choosing the default). Only curvature_step advances it: without that call lam stays at
        its step-0 value.
    curvature: where g, the diagonal Gauss-Newton estimate, comes from.
        "gn_sampled" (default): a backward with targets sampled from the model's own predictions,
        every `curvature_every` steps, in `lotion_fx.curvature_step(model, inputs)`; unbiased for
        the GN diagonal of a loss that is a mean over examples/tokens (README: the estimators).
        "ema": EMA of squared task-loss (batch-mean) gradients, updated in the backward (no loop
        change; about a batch size too small, and zero when the fit is exact).
        "adam": the optimizer's exp_avg_sq, after `attach_optimizer` (same scale as "ema").
        "kfac_diag": factored, g_ij = (sum_m delta_mi^2) * mean_m x_mj^2 from the Linear's input x and
        output gradient delta in the same sampled-target pass; state O(in + out) per layer.
    qat_from_step: from this optimizer step on (counted by `lotion_fx.curvature_step`, like the warm-up), a
        `lotion` node rounds its forward to nearest with a straight-through backward, as `qat` does, and the
        curvature refresh stops: LOTION smooths the start of the run, QAT fine-tunes from its weights. None
        (default): LOTION throughout. On small MLPs and classifiers, where LOTION alone loses to QAT, half the
        run beat QAT on 7 of 9 held-out testbeds (docs/curvature.md: "Finishing with QAT"). Not saved with a
        checkpoint's config: it is the loop's business, like the run's length.
    curvature_every: steps between two sampled-target backward passes of "gn_sampled"/"kfac_diag".
    curvature_batch_fraction: that pass runs on the first ceil(fraction * B) examples of the step's
        inputs (every tensor argument whose leading dim is B, the first tensor argument's): its cost
        scales with it, while one refresh's estimate is about as noisy at any batch (a squared sum).
    curvature_scale: multiplies g (1 = the estimator's own scale).
    scale_grad: differentiate the penalty through the block scales too (default True): an absmax
        scale (int4, int8) is set by the block's largest |w|, so the penalty also pulls that weight
        in, which shrinks every other weight's rounding variance; nvfp4 through its fp32 tensor scale
        only, mxfp4 not at all (its scales are powers of two). False holds the scales constant
        (the behaviour before this option). docs/curvature.md: "Through the scale".
    beta: EMA decay of g (bias-corrected like Adam); None = 0.999 for "ema" (per step), 0.95 for
        "gn_sampled" and for each factor of "kfac_diag" (per refresh).
    grad_accum_steps: micro-batches per optimizer step; the loss is assumed divided by it, as in
        the usual accumulation loop. The penalty gradient is split across micro-steps so that it
        counts once per optimizer step, and the gradient fed to the EMA is rescaled to full size.
    skip: fnmatch patterns of module names (e.g. "lm_head", "*.attn.*") whose weights stay as they are.
    seed: seeds the stochastic rounding of lotion_sampled (same seed, same noise, on any device).
    """

    method: str = "lotion"
    format: str = "int4"
    block_size: int | str | None = None
    lam: float = 1.0
    lam_warmup: int | None = None
    qat_from_step: int | None = None
    curvature: str = "gn_sampled"
    curvature_every: int = 10
    curvature_batch_fraction: float = 0.25
    curvature_scale: float = 1.0
    scale_grad: bool = True
    beta: float | None = None
    grad_accum_steps: int = 1
    skip: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {list(METHODS)}")
        get_format(self.format)
        object.__setattr__(self, "block_size", as_block_spec(self.block_size))  # torchao PerGroup(32) -> 32
        if isinstance(self.block_size, int) and not isinstance(self.block_size, bool) and self.block_size < 1:
            raise ValueError(
                f"block_size must be a positive int, 'row', 'tensor' or None, got {self.block_size!r}"
                + (" (for one block per tensor pass block_size='tensor')" if self.block_size == 0 else "")
            )
        if self.curvature not in CURVATURES:
            raise ValueError(
                f"unknown curvature {self.curvature!r}: choose one of {list(CURVATURES)}"
            )
        for name in ("lam", "curvature_scale"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.scale_grad, bool):
            raise ValueError(f"scale_grad must be True or False, got {self.scale_grad!r}")
        f = self.curvature_batch_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < f <= 1.0):
            raise ValueError(f"curvature_batch_fraction must be in (0, 1], got {f!r}")
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA[self.curvature])
        if self.lam_warmup is None:
            object.__setattr__(self, "lam_warmup", DEFAULT_LAM_WARMUP[self.curvature])
        if not (0.0 <= self.beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        for name, low in (("grad_accum_steps", 1), ("curvature_every", 1), ("lam_warmup", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        q = self.qat_from_step
        if q is not None:
            if isinstance(q, bool) or not isinstance(q, int) or q < 0:
                raise ValueError(f"qat_from_step must be None or an int >= 0 (an optimizer step), got {q!r}")
            if self.method != "lotion":
                raise ValueError(
                    f"qat_from_step switches a method='lotion' run to QAT's forward; method={self.method!r} "
                    "has no LOTION phase: leave qat_from_step=None, or use method='lotion'"
                )
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        else:
            object.__setattr__(self, "skip", tuple(self.skip))
