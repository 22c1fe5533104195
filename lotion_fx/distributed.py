"""Data-parallel training of prepared models: DDP and FSDP2 under torchrun, and gathering for export.

The `lotion` curvature must see the *all-reduced* task gradient, so that N processes with 1/N of the
batch each train exactly like one process with the whole batch. `wrap` therefore switches the
`lotion` (ema) smoothing nodes to the identity and applies the penalty gradient and the EMA update
of g right after the gradient reduction: in a DDP communication hook, or in FSDP2's
post-accumulate-grad hook on each sharded parameter. Under FSDP2, g is held as a DTensor sharded
like its parameter (whole rows, so blocks along in_features are never split); the per-tensor amax
that nvfp4 and per-tensor blocks need is all-reduced (one scalar per weight).
The default `gn_sampled` needs this only for memory: its penalty can run in the graph with a g
replicated on every rank (identical there, so the reduction keeps it; what DDP and a plain
`fully_shard` do), and curvature_step makes g the same everywhere (all-reduce of squared gradients
under DDP; world size x the squared reduce-scattered mean under FSDP2). `wrap(..., "fsdp")` shards
it like `ema`'s (2 / world bytes per weight per rank): the penalty moves to the post-accumulate hook
and curvature_step folds each rank's rows of the squared mean into its shard. Weights stored (in, out)
(GPT-2's Conv1D), whose row shards are not rows of g, keep the replicated g. `kfac_diag` needs none
of this (its factors' sums are averaged over ranks in both).
"""

import functools
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import reference as R
from .api import prepared_info, smoothers
from .ops import lotion_backward_math
from .smoother import LotionSmoother

# No `from __future__ import annotations`: DDP checks the comm hook's annotations at runtime.
MODES = ("ddp", "fsdp")


# --------------------------------------------------------------------------- process group
def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init() -> tuple[int, int, torch.device]:
    """(rank, world_size, device): joins the torchrun process group (nccl on CUDA, gloo on CPU).

    Without torchrun's environment (RANK, WORLD_SIZE) returns (0, 1, default device), no group.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), _default_device()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, _default_device()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; run without torchrun")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def cleanup() -> None:
    """Destroy the process group, if one was made (safe to call in single-process runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the update after reduction
@torch.no_grad()
def penalty_grad_rows(
    w: Tensor, g_hat: Tensor, fmt: str, block: int, lam: float, scale_grad: bool = False,
    tensor_amax: Tensor | None = None, group: Any = None,
) -> Tensor:
    """Penalty gradient of a block of whole rows of a weight, with the scales of the whole weight.

    Blocks run along in_features, so rows hold whole blocks; only the per-tensor part of a scale
    (nvfp4's fp32 tensor scale, or block 0 = one block per tensor) needs the whole weight's
    absmax, passed as `tensor_amax`. A sentinel row carrying that absmax makes `reference` compute
    exactly the whole-tensor scale; its own entries are dropped. With scale_grad, the per-tensor
    scale's share and its tie count are all-reduced over `group` (every rank calls this together).
    """
    if tensor_amax is None:
        return R.penalty_grad(w, g_hat, fmt, block, lam, scale_grad)
    sentinel = torch.zeros((1, w.shape[-1]), dtype=w.dtype, device=w.device)
    sentinel[0, 0] = tensor_amax.to(w.dtype)
    ext_w = torch.cat([w.reshape(-1, w.shape[-1]), sentinel])
    ext_g = torch.cat([g_hat.reshape(-1, w.shape[-1]), torch.zeros_like(sentinel, dtype=g_hat.dtype)])

    def reduce(share: Tensor, ties: Tensor) -> tuple[Tensor, Tensor]:
        both = torch.stack([share.reshape(()), ties.reshape(()) - 1])  # - 1: this rank's sentinel
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(both, group=group)
        return both[0], both[1]

    return R.penalty_grad(ext_w, ext_g, fmt, block, lam, scale_grad, reduce)[:-1].reshape(w.shape)


@torch.no_grad()
def _apply_after_reduction(
    sm: LotionSmoother, w: Tensor, grad: Tensor, g: Tensor, tensor_amax: Tensor | None = None,
    group: Any = None,
) -> None:
    """The lotion backward (ops.lotion_backward_math: penalty from g of earlier steps, then for
    `ema` the update of g) applied in place to the reduced (global-batch mean) task gradient, once per
    optimizer step. w, grad, g are the local rows (all of them under DDP)."""
    if sm.qat_phase:  # the QAT finish: the task gradient (straight-through) is all there is
        return
    c = sm.config
    pen = functools.partial(penalty_grad_rows, tensor_amax=tensor_amax, group=group)
    out = lotion_backward_math(grad, w, g, sm.count, sm.lam_now, sm.fmt, sm.block, c.beta,
                               c.curvature_scale, 1, c.curvature == "ema", c.scale_grad, penalty_grad=pen)
    grad.copy_(out)


class _SyncState:
    """Counts training forwards, so the update runs once per optimizer step under grad accumulation."""

    def __init__(self, by_param: dict[int, LotionSmoother], grad_accum_steps: int) -> None:
        self.by_param = by_param
        self.k = grad_accum_steps
        self.micro = 0

    @torch.compiler.disable  # plain Python state: no guard on the count, no recompiles
    def count_forward(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled() and not self.sampling():
            self.micro += 1

    def sampling(self) -> bool:
        """In curvature_step's sampled pass: its forward and backward are not a training micro-step."""
        return any(sm.sampling for sm in self.by_param.values())

    def last_micro_step(self) -> bool:
        return self.micro % self.k == 0


def _ddp_comm_hook(state: _SyncState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average the bucket (as DDP's default hook), then apply the LOTION update to its weights."""
    buf = bucket.buffer()
    buf.div_(dist.get_world_size())
    fut = dist.all_reduce(buf, async_op=True).get_future()

    def after(f: torch.futures.Future) -> Tensor:
        out = f.value()[0]
        if state.last_micro_step():
            for p, grad in zip(bucket.parameters(), bucket.gradients()):
                sm = state.by_param.get(id(p))
                if sm is not None:
                    _apply_after_reduction(sm, p.detach(), grad, sm.g)
        return out

    return fut.then(after)


def _fsdp_hook(state: _SyncState, sm: LotionSmoother):
    def hook(p: Tensor) -> None:
        if sm.sampling or not state.last_micro_step():
            return
        w, grad, g = p.to_local().detach(), p.grad.to_local(), sm.g.to_local()
        amax = None
        if R.get_format(sm.fmt).needs_tensor_absmax(sm.block):
            amax = w.abs().amax().to(torch.float32) if w.numel() else torch.zeros((), device=w.device)
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=p.device_mesh.get_group())
        _apply_after_reduction(sm, w, grad, g, amax, p.device_mesh.get_group())

    return hook


# --------------------------------------------------------------------------- wrap
def _inner(model: nn.Module) -> nn.Module:
    """The prepared GraphModule under a torch.compile wrapper (OptimizedModule), if any."""
    return getattr(model, "_orig_mod", model)


def wrap(prepared: nn.Module, mode: str = "ddp") -> nn.Module:
    """Wrap a prepared model (optionally already torch.compile'd) for data-parallel training.

    mode "ddp": DistributedDataParallel; "fsdp": FSDP2 `fully_shard` of the whole prepared graph
    (its module hierarchy is flattened into one graph, so it is one FSDP unit). Without a process
    group (world size 1) the model is returned unchanged. With grad_accum_steps k > 1 the update
    of g runs once, after the k-th training forward's backward (with or without no_sync /
    set_requires_gradient_sync on the first k-1 micro-batches).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {list(MODES)}")
    inner = _inner(prepared)
    info = prepared_info(inner)
    if info.config.method == "lotion" and info.config.curvature == "adam" and mode == "fsdp":
        raise NotImplementedError(
            "curvature='adam' reads the optimizer state of the whole parameter, which FSDP2 shards; "
            "use LotionConfig(curvature='ema') or wrap(..., mode='ddp')"
        )
    in_out = [r.param_name for r in info.result.rewritten if r.transposed]
    if info.config.method == "lotion" and info.config.curvature == "ema" and mode == "fsdp" and in_out:
        raise ValueError(
            f"curvature='ema' under FSDP2 holds g as row shards of each weight, but {in_out} are stored "
            "(in, out) (like GPT-2's Conv1D): their row shards are columns of g. Use the default "
            "curvature='gn_sampled' (their g stays whole) or wrap(..., mode='ddp')"
        )
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prepared
    cfg = info.config
    smooth = smoothers(inner)
    # the smoothers whose penalty (and `ema` update) runs after the gradient reduction
    deferred = {name: sm for name, sm in smooth.items() if cfg.method == "lotion" and cfg.curvature == "ema"}
    if mode == "fsdp" and cfg.method == "lotion" and cfg.curvature == "gn_sampled":  # g sharded, see above
        rows_of_g = {r.param_name for r in info.result.rewritten if not r.transposed}
        deferred = {name: sm for name, sm in smooth.items() if name in rows_of_g}
    tied = [r.param_name for r in info.result.rewritten if r.aliases and r.param_name in deferred
            and cfg.curvature == "ema"]
    if tied and dist.get_rank() == 0:
        warnings.warn(
            f"{tied}: tied weights (also used outside their Linear) feed g with the parameter's whole "
            "reduced gradient under DDP/FSDP, not only the Linear's share as in one process",
            stacklevel=2,
        )
    for sm in deferred.values():
        sm.defer_to_after_reduction()
    by_param = {id(inner.get_parameter(n)): sm for n, sm in deferred.items()}
    state = _SyncState(by_param, cfg.grad_accum_steps)
    device = next(inner.parameters()).device
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(prepared, device_ids=[device] if device.type == "cuda" else None)
        model.register_comm_hook(state, _ddp_comm_hook)
        if state.k > 1:
            model.register_forward_pre_hook(state.count_forward)
        return model
    return _wrap_fsdp(prepared, inner, deferred, state, device)


def _wrap_fsdp(prepared: nn.Module, inner: nn.Module, deferred: dict[str, LotionSmoother],
               state: _SyncState, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    fully_shard(inner, mesh=mesh)  # Shard(0): each rank holds whole rows
    rank, world = mesh.get_local_rank(), mesh.size()
    for name, sm in deferred.items():  # g sharded like the weight
        p = inner.get_parameter(name)
        if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
            raise AssertionError(f"{name}: expected FSDP2 to shard it as Shard(0), got {type(p).__name__}")
        full = sm.g
        chunks = list(torch.chunk(full, world, dim=0))  # FSDP2's row split (torch.chunk)
        local = chunks[rank].clone() if rank < len(chunks) else full.new_zeros((0, *full.shape[1:]))
        first_row = sum(c.shape[0] for c in chunks[:rank])
        if local.shape != p.to_local().shape:
            raise AssertionError(f"{name}: g shard {tuple(local.shape)} != parameter shard "
                                 f"{tuple(p.to_local().shape)}")
        sm.shard_curvature(local, mesh, [Shard(0)], full.shape, full.stride(), first_row)
        p.register_post_accumulate_grad_hook(_fsdp_hook(state, sm))
    if state.k > 1:
        inner.register_forward_pre_hook(state.count_forward)
    return prepared


# --------------------------------------------------------------------------- gather
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded, unwrapped-key) CPU state dict on rank 0, {} on other ranks.

    Keys match a freshly prepared model, so rank 0 can `load_state_dict` it and call
    `lotion_fx.convert` / `lotion_fx.audit` there. Collective: every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        inner = _inner(getattr(model, "module", model))
        return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.get_rank() == 0 else {}
