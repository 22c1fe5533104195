"""The smoothing node: one small module per rewritten parameter, holding its curvature state."""

from __future__ import annotations

import dataclasses
import json
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers torch.ops.lotion_fx)
from . import reference as R
from .config import LotionConfig

# g's storage: the sampled-target estimate is written to bf16 with stochastic rounding (unbiased,
# 2 bytes per weight); the per-step `ema` folds in the backward op, in fp32.
G_DTYPE = {"gn_sampled": torch.bfloat16, "ema": torch.float32}


def data_parallel() -> bool:
    """True under an initialized process group of more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class LotionSmoother(nn.Module):
    """Routes one Linear weight through the quantize/smoothing op chosen by `config.method`.

    Buffers (saved in the prepared model's state_dict): `config_json` (the LotionConfig as JSON
    bytes, checked on load); for `lotion`, `lam_now` (lam along its warm-up), `steps` (optimizer
    steps seen by curvature_step) and, for the `gn_sampled` / `ema` curvature, `g` and `count`;
    for `kfac_diag`, `kfac_in` (in,), `kfac_out` (out,) and `count` (plus unsaved accumulators);
    `step` for the noise of `lotion_sampled`. They keep their dtype when the model is cast.
    """

    def __init__(
        self, param_name: str, weight: Tensor, block: int, config: LotionConfig, index: int
    ) -> None:
        super().__init__()
        self.param_name = param_name
        self.fmt = config.format
        self.block = block
        self.config = config
        self.seed = R.mix_seed(config.seed, index)
        self.passthrough = False  # set by quantized_eval: the weight is already RTN(w)
        # set by lotion_fx.distributed.wrap: the penalty and the EMA of g are applied after the
        # gradient reduction (on the all-reduced gradient), so the node is the identity.
        self.after_reduction = False
        self._optimizer: weakref.ref | None = None
        self._host_steps: int | None = None  # see steps_taken()
        self._g_offset = 0  # flat index of this process's first element of g (FSDP2 row shard)
        self.observing = False  # kfac_diag: set by curvature_step around its sampled pass
        self.sampling = False  # set around curvature_step's sampled pass (set_sampling_all)
        # config.qat_from_step reached: the node rounds like `qat`. A host bool that flips once (a Python int
        # read in forward would make Dynamo recompile every step); set by advance_all and on load.
        self.qat_phase = self.qat_finish_at(0)
        dev = weight.device
        # the config travels in the state dict (as JSON bytes: torch.save and safetensors alike), so a
        # checkpoint is never loaded into a model prepared differently
        self.register_buffer("config_json", self.config_json_tensor(dev))
        if config.method == "lotion":
            self.register_buffer("lam_now", torch.tensor(self._lam_at(0), dtype=torch.float32, device=dev))
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=dev))
            if config.curvature in G_DTYPE:
                self.register_buffer("g", torch.zeros(weight.shape, dtype=G_DTYPE[config.curvature], device=dev))
                self.register_buffer("count", torch.zeros((), dtype=torch.int64, device=dev))
            if config.curvature == "kfac_diag":
                n_out, n_in = weight.shape
                f32 = dict(dtype=torch.float32, device=dev)
                # EMAs over refreshes of mean_m x_mj^2 and sum_m delta_mi^2; g = kfac_out kfac_in^T
                self.register_buffer("kfac_in", torch.zeros(n_in, **f32))
                self.register_buffer("kfac_out", torch.zeros(n_out, **f32))
                self.register_buffer("count", torch.zeros((), dtype=torch.int64, device=dev))
                # this refresh's sums, written by the observers (not saved: zero between refreshes)
                self.register_buffer("kfac_in_acc", torch.zeros(n_in, **f32), persistent=False)
                self.register_buffer("kfac_out_acc", torch.zeros(n_out, **f32), persistent=False)
                self.register_buffer("kfac_rows", torch.zeros((), **f32), persistent=False)
        if config.method == "lotion_sampled":
            self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=dev))

    def extra_repr(self) -> str:
        c = self.config
        return f"{self.param_name}, method={c.method}, format={self.fmt}, block={self.block}"

    # ------------------------------------------------------------------ state
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # Module.to(dtype)/.half() would cast the curvature state; follow device moves only.
        def keep_dtype(t: Tensor) -> Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(device=out.device)

        return super()._apply(keep_dtype, recurse)

    def config_json_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """This smoother's config (and resolved block) as a uint8 tensor of JSON bytes."""
        data = json.dumps(self._config_record(), sort_keys=True).encode()
        dev = device if device is not None else self._buffers["config_json"].device
        return torch.tensor(list(data), dtype=torch.uint8, device=dev)

    def _config_record(self) -> dict[str, Any]:
        """What a checkpoint must agree on; grad_accum_steps, the refresh's batch fraction and the step that
        starts the QAT finish are the loop's business and may change."""
        rec = {**dataclasses.asdict(self.config), "skip": list(self.config.skip), "block": self.block}
        del rec["grad_accum_steps"], rec["curvature_batch_fraction"], rec["qat_from_step"]
        return rec

    def check_loadable(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Raise, before anything is loaded, when `state_dict` holds this smoother's state saved under
        another config, or non-finite curvature (it would NaN the weights within two steps)."""
        saved = state_dict.get(prefix + "config_json")
        if isinstance(saved, Tensor) and saved.device.type != "meta":
            theirs = json.loads(bytes(saved.cpu().tolist()).decode())
            theirs.setdefault("scale_grad", False)  # saved before the option existed: scales held constant
            mine = self._config_record()
            if theirs != mine:
                diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
                raise ValueError(
                    f"{self.param_name}: checkpoint was saved under another config (saved, this model): "
                    f"{diff}; prepare the model with the checkpoint's LotionConfig to resume, or load "
                    "only the original model's keys (lotion_fx.original(prepared).load_state_dict)"
                )
        for name in ("g", "lam_now", "kfac_in", "kfac_out"):
            t = state_dict.get(prefix + name)
            if isinstance(t, Tensor) and t.device.type != "meta" and not torch.isfinite(t).all():
                raise ValueError(
                    f"{self.param_name}: checkpoint's curvature state {prefix + name!r} holds NaN/Inf; "
                    "it would NaN the weights within two steps. Load an earlier checkpoint, or drop "
                    "the lotion.* keys and load with strict=False to restart the curvature from zero"
                )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        self.check_loadable(state_dict, prefix)
        if prefix + "config_json" in state_dict:  # same config, maybe another JSON (older keys)
            state_dict[prefix + "config_json"] = self._buffers["config_json"]
        self._host_steps = None  # the loaded `steps` buffer is the truth again
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.config.qat_from_step is not None and self.steps.device.type != "meta":
            self.qat_phase = self.qat_finish_at(self.steps_taken())

    # ------------------------------------------------------------------ curvature
    def _lam_at(self, step: int) -> float:
        c = self.config
        return c.lam if c.lam_warmup == 0 else c.lam * min(1.0, step / c.lam_warmup)

    def qat_finish_at(self, calls: int) -> bool:
        """Whether the training step after `calls` calls of curvature_step (step index calls - 1) is in the
        QAT finish."""
        q = self.config.qat_from_step
        return q is not None and calls - 1 >= q

    def curvature(self, w: Tensor) -> tuple[Tensor, Tensor, float, bool] | None:
        """(g, count, beta, update-in-backward) for the penalty, or None while no curvature exists."""
        c = self.config
        if c.curvature in G_DTYPE:
            return self.g, self.count, c.beta, c.curvature == "ema"
        if c.curvature == "kfac_diag":  # g as its outer product; g_hat corrects both factors
            return torch.outer(self.kfac_out, self.kfac_in), self.count, c.beta, False
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is None:
            raise RuntimeError(
                f"{self.param_name}: curvature='adam' reads the optimizer's exp_avg_sq; call "
                "lotion_fx.attach_optimizer(prepared, optimizer) after building the optimizer"
            )
        state = opt.state.get(w)
        if not state or "exp_avg_sq" not in state:
            return None  # before the optimizer's first step: no curvature yet, no penalty
        beta2 = next(grp["betas"][1] for grp in opt.param_groups if any(p is w for p in grp["params"]))
        step = state["step"]
        step = step if isinstance(step, Tensor) else torch.tensor(float(step))
        return state["exp_avg_sq"], step, beta2, False

    def g_hat(self, w: Tensor) -> Tensor | None:
        """The curvature the penalty uses now (bias-corrected, times curvature_scale), fp32, whole (an
        FSDP2 shard is gathered: every rank calls it together); None before the estimator has data."""
        curv = self.curvature(w) if self.config.method == "lotion" else None
        if curv is None or float(curv[1]) == 0:
            return None
        g, count, beta, _ = curv
        if type(g).__name__ == "DTensor":
            g = g.full_tensor()
        factor = R.curvature_factor(count, beta, self.config.curvature_scale).to(g.device)
        if self.config.curvature == "kfac_diag":  # each factor is its own bias-corrected EMA
            factor = factor * R.curvature_factor(count, beta, 1.0).to(g.device)
        return g.float() * factor

    def curvature_never_measured(self) -> bool:
        """True for a `lotion` node whose estimator never produced data (its count is still 0): the
        penalty never acted, so the weight trained as plain training would. `adam` is not judged here
        (it reads the optimizer's state)."""
        c = self.config
        return c.method == "lotion" and c.curvature != "adam" and int(self.count) == 0

    # ------------------------------------------------------------------ modes (set by their owners' calls)
    def use_rounded_weights(self, on: bool) -> None:
        """quantized_eval: the weight already holds RTN(w), so the node is the identity."""
        self.passthrough = on

    def defer_to_after_reduction(self) -> None:
        """distributed.wrap: the penalty and the `ema` update run on the all-reduced gradient
        (a DDP comm hook / FSDP2 post-accumulate hook), so the node is the identity."""
        self.after_reduction = True

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """curvature='adam': read this optimizer's exp_avg_sq (held weakly)."""
        self._optimizer = weakref.ref(optimizer)

    def shard_curvature(self, local: Tensor, mesh: Any, placements: list, shape: torch.Size,
                        stride: tuple[int, ...], first_row: int = 0) -> None:
        """FSDP2: hold g as the DTensor shard (rows from `first_row`) that matches the sharded weight."""
        from torch.distributed.tensor import DTensor

        self._buffers["g"] = DTensor.from_local(local, mesh, placements, run_check=False,
                                                shape=shape, stride=stride)
        self._g_offset = first_row * (shape[1] if len(shape) > 1 else 1)

    def holds_g_shard(self) -> bool:
        """Whether g is an FSDP2 row shard (lotion_fx.distributed.wrap(..., "fsdp"))."""
        return type(self._buffers.get("g")).__name__ == "DTensor"

    def g_local(self) -> tuple[Tensor, int]:
        """(g as this process holds it, the flat index of its first element in the whole g): all of g,
        or under FSDP2 after `shard_curvature` its row shard."""
        return (self.g.to_local() if self.holds_g_shard() else self.g), self._g_offset

    def steps_taken(self) -> int:
        """Optimizer steps seen by curvature_step. Mirrored on the host (read from the buffer once,
        and again after a load), so that a training step never waits for the GPU."""
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        return self._host_steps

    # ------------------------------------------------------------------ kfac_diag observers
    @torch.no_grad()
    def start_observing(self) -> None:
        """kfac_diag, before curvature_step's sampled pass: zero the accumulators, observers on."""
        for name in ("kfac_in_acc", "kfac_out_acc", "kfac_rows"):
            self._buffers[name].zero_()
        self.observing = True

    def stop_observing(self) -> None:
        """After the sampled pass: the observers are the identity again."""
        self.observing = False

    def observed(self) -> list[Tensor]:
        """This refresh's accumulators (curvature_step averages them over data-parallel ranks)."""
        return [self.kfac_in_acc, self.kfac_out_acc, self.kfac_rows]

    def observe_input(self, x: Tensor) -> Tensor:
        """kfac_diag: returns x; while observing, adds sum_m x_m^2 (per input feature) and M rows."""
        if self.observing:
            torch.ops.lotion_fx.kfac_observe_input(x.detach(), self.kfac_in_acc, self.kfac_rows)
        return x

    def observe_output(self, y: Tensor) -> Tensor:
        """kfac_diag: returns y; while observing, its backward adds sum_m delta_m^2 per output feature."""
        if self.observing:
            return torch.ops.lotion_fx.kfac_observe_output(y, self.kfac_out_acc)
        return y

    @torch.no_grad()
    def fold_observed(self) -> None:
        """Sampled grad v_ij = sum_m delta_mi x_mj: GN_ij = E v_ij^2 = sum_m E[delta_mi^2] x_mj^2 (rows uncorrelated);
        delta indep. of x: GN_ij ~= M mean_m(delta_mi^2) mean_m(x_mj^2) = kfac_out_i kfac_in_j (EMAs of both)."""
        beta = self.config.beta
        mean_in = self.kfac_in_acc / self.kfac_rows.clamp(min=1.0)
        self.kfac_in.mul_(beta).add_(mean_in, alpha=1.0 - beta)
        self.kfac_out.mul_(beta).add_(self.kfac_out_acc, alpha=1.0 - beta)
        self.count.add_(1)

    def forward(self, w: Tensor) -> Tensor:
        c = self.config
        if self.passthrough or not self.training or c.method in ("none", "ptq"):
            return w
        if c.method == "qat" or self.qat_phase:
            if self._triton_kernel_for(w, stochastic=False):
                return torch.ops.lotion_fx.rtn_quantize_triton(w, self.fmt, self.block)
            return torch.ops.lotion_fx.rtn_quantize(w, self.fmt, self.block)
        if c.method == "lotion_sampled":
            self.step.add_(1)
            if self._triton_kernel_for(w, stochastic=True):
                return torch.ops.lotion_fx.sr_quantize_triton(w, self.step, self.fmt, self.block, self.seed)
            return torch.ops.lotion_fx.sr_quantize(w, self.step, self.fmt, self.block, self.seed)
        # lotion: identity forward; the penalty gradient (and the `ema` update) run in backward. Not in
        # curvature_step's sampled pass (`sampling`, a host flag: under torch.compile that pass is its own
        # graph, without the penalty's kernels).
        if self.after_reduction or self.sampling or not (torch.is_grad_enabled() and w.requires_grad):
            return w
        if c.curvature == "kfac_diag":  # g = kfac_out kfac_in^T is formed in the backward only
            return torch.ops.lotion_fx.lotion_smooth_factored(
                w, self.kfac_in, self.kfac_out, self.count, self.lam_now, self.fmt, self.block, c.beta,
                c.curvature_scale, c.grad_accum_steps, c.scale_grad,
            )
        curv = self.curvature(w)
        if curv is None:
            return w
        g, count, beta, update = curv
        if update and data_parallel():
            raise RuntimeError(
                f"{self.param_name}: curvature='ema' folds each rank's *local* gradient into g, so plain "
                "DistributedDataParallel / fully_shard would train differently from one process. Wrap "
                "with lotion_fx.distributed.wrap(prepared) (it applies the update after the gradient "
                "reduction), or use the default curvature='gn_sampled' (its estimate is averaged over ranks)"
            )
        return torch.ops.lotion_fx.lotion_smooth(
            w, g, count, self.lam_now, self.fmt, self.block, beta, c.curvature_scale,
            c.grad_accum_steps, update, c.scale_grad,
        )

    def _triton_kernel_for(self, w: Tensor, stochastic: bool) -> bool:
        """Whether the fake-quant forward of w runs the hand-written Triton kernel (CUDA only; which weights,
        RTN or stochastic, is `backends/triton_fake_quant.use_for`'s call)."""
        if not w.is_cuda:
            return False
        from lotion_fx.backends import triton_fake_quant

        return triton_fake_quant.use_for(w, self.fmt, self.block, stochastic)

    @torch.no_grad()
    def penalty(self, w: Tensor) -> Tensor:
        """Current (lam/2) sum g_hat sigma^2(w) of this weight, lam as scheduled (0 before curvature)."""
        g_hat = self.g_hat(w)
        if g_hat is None:
            return torch.zeros((), dtype=torch.float32, device=w.device)
        lam = float(self.lam_now)
        return R.penalty_value(w.detach(), g_hat, self.fmt, self.block, lam).float()


# Every smoother of a model moves together once per optimizer step: grouped updates cost one
# foreach launch per buffer kind instead of one kernel per weight (~50 on GPT-2, every step).
@torch.no_grad()
def advance_all(smoothers: list[LotionSmoother]) -> None:
    """One optimizer step passed for each smoother: count it, move lam along its warm-up (and into the QAT
    finish at `qat_from_step`)."""
    if not smoothers:
        return
    taken = [sm.steps_taken() for sm in smoothers]  # read (after a load: from the buffer) before adding
    torch._foreach_add_([sm.steps for sm in smoothers], 1)
    moved = []
    for sm, before in zip(smoothers, taken):
        n = before + 1
        sm._host_steps = n
        sm.qat_phase = sm.qat_finish_at(n)
        if sm._lam_at(n) != sm._lam_at(n - 1):  # after the warm-up: nothing to write
            moved.append((sm.lam_now, sm._lam_at(n)))
    _fill_all(moved)


def _fold_math(gs: list[Tensor], grads: list[Tensor], seeds: list[int], offsets: list[int], counts: list[Tensor],
               beta: float, square: bool) -> list[Tensor]:
    """beta g + (1 - beta) grad^2 (grad already squared unless `square`), bf16 g stochastically rounded
    (noise keyed by each element's index in the whole g: a row shard rounds as the whole would)."""
    out = []
    for g, gr, seed, offset, count in zip(gs, grads, seeds, offsets, counts):
        sq = gr.float().square() if square else gr.float()
        new = beta * g.float() + (1.0 - beta) * sq
        out.append(R.to_bfloat16_stochastic(new, seed, count, offset) if g.dtype == torch.bfloat16 else new)
    return out


# On CUDA the fold runs compiled: eager, the counter-based noise alone is ~20 int64 kernels per weight
# (64 ms per refresh on GPT-2 124M, H100: benchmarks/profile_refresh.py); fused it reads each gradient
# and g once. Compiled lazily: importing lotion_fx compiles nothing.
_FOLD_COMPILED: Any = None


@torch.no_grad()
def fold_sampled_all(pairs: list[tuple["LotionSmoother", Tensor]], square: bool, compiled: bool | None = None) -> None:
    """For each (smoother, sampled gradient in its (out, in) view, or of its g shard under FSDP2):
    g <- beta g + (1 - beta) grad^2, count += 1. `square=False`: the gradients are squared already
    (averaged over ranks). `compiled`: None = on CUDA only."""
    global _FOLD_COMPILED
    if not pairs:
        return
    gs, offsets = map(list, zip(*(sm.g_local() for sm, _ in pairs)))
    counts = [sm.count for sm, _ in pairs]
    fold = _fold_math
    if compiled if compiled is not None else gs[0].is_cuda:
        if _FOLD_COMPILED is None:
            _FOLD_COMPILED = torch.compile(_fold_math, fullgraph=True, dynamic=False)
        fold = _FOLD_COMPILED
    new = fold(gs, [gr for _, gr in pairs], [sm.seed for sm, _ in pairs], offsets, counts, pairs[0][0].config.beta,
               square)
    torch._foreach_copy_(gs, new)
    torch._foreach_add_(counts, 1)


def set_sampling_all(smoothers: list[LotionSmoother], on: bool) -> None:
    """Mark curvature_step's sampled pass on the host: the node is the identity (no penalty in that
    backward, so g never contains the penalty's own gradient), and lotion_fx.distributed's hooks skip it."""
    for sm in smoothers:
        sm.sampling = on


def _fill_all(pairs: list[tuple[Tensor, float]]) -> None:
    by_value: dict[float, list[Tensor]] = {}
    for t, v in pairs:
        by_value.setdefault(v, []).append(t)
    for v, ts in by_value.items():
        torch._foreach_mul_(ts, 0.0)
        torch._foreach_add_(ts, v)


def observe_linear_input(smoother: LotionSmoother, x: Tensor) -> Tensor:
    """The FX observer node on a Linear's input (kfac_diag): `smoother.observe_input(x)`."""
    return smoother.observe_input(x)


def observe_linear_output(smoother: LotionSmoother, y: Tensor) -> Tensor:
    """The FX observer node on a Linear's output (kfac_diag): `smoother.observe_output(y)`."""
    return smoother.observe_output(y)
