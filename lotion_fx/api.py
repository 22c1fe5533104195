"""Public entry points: prepare, quantized_eval, penalty, attach_optimizer."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.fx import Graph, GraphModule

from lotion_fx import passes

from . import module_capture
from . import reference as R
from .checks import check_materialized, non_finite_summary
from .config import LotionConfig
from .smoother import LotionSmoother, observe_linear_input, observe_linear_output

_INFO = "_lotion_info"


@dataclass
class PreparedInfo:
    """What prepare did, kept on the prepared module (not in its state_dict)."""

    config: LotionConfig
    original: nn.Module
    capture: str  # "symbolic_trace" | "export" | "dynamo"
    result: passes.RewriteResult
    graph_before: Graph | None  # None for "dynamo" (the model keeps its forward) and after pickling

    def __getstate__(self) -> dict:
        # an exported graph holds C++ objects pickle cannot save; the graph before the rewrite only
        # serves the audit's diff, which a pickled copy does without
        return {**self.__dict__, "graph_before": None}


# GraphModule.__deepcopy__ rebuilds the module from its graph and keeps only the attributes listed
# here (torch.fx's "user preserved attributes", stored in gm.meta), so the info survives
# copy.deepcopy; pickling keeps both __dict__ and meta.
_PRESERVED = "_user_preserved_attributes"


def _attach_info(gm: GraphModule, info: PreparedInfo) -> None:
    """Attach `info` to gm so that it survives copy.deepcopy and pickling."""
    object.__setattr__(gm, _INFO, info)
    gm.meta.setdefault(_PRESERVED, {})[_INFO] = info


def is_prepared(model: nn.Module) -> bool:
    """True for a module returned by lotion_fx.prepare (or a deepcopy / unpickled copy of one)."""
    return getattr(model, _INFO, None) is not None


def prepared_info(prepared: nn.Module) -> PreparedInfo:
    """The PreparedInfo of a prepared model; a clear error for anything else."""
    info = getattr(prepared, _INFO, None)
    if info is None:
        raise TypeError(
            f"{type(prepared).__name__} is not a prepared model: call lotion_fx.prepare(model, config) "
            "first and pass the module it returns"
        )
    return info


def smoothers(prepared: nn.Module) -> dict[str, LotionSmoother]:
    """Parameter name -> its smoothing module."""
    prepared_info(prepared)
    return {m.param_name: m for m in prepared.modules() if isinstance(m, LotionSmoother)}


def smoothed_weight(prepared: nn.Module, name: str, t: Tensor | None = None) -> Tensor:
    """Parameter `name` (or a tensor of its shape, such as its gradient) as its smoother sees it:
    (out, in), a transposed view for an (in, out) weight such as GPT-2's Conv1D (blocks always
    run along the input dimension)."""
    t = prepared.get_parameter(name) if t is None else t
    for rec in prepared_info(prepared).result.rewritten:
        if rec.param_name == name:
            return rec.as_out_in(t)
    return t


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects an nn.Module, got {type(model).__name__}")
    if is_prepared(model) or any(isinstance(m, LotionSmoother) for m in model.modules()):
        raise ValueError(
            "this model is already prepared; call lotion_fx.prepare on the original module "
            "(lotion_fx.original(prepared)) with the new config instead"
        )
    check_materialized(model, "lotion_fx.prepare")


def _check_finite(gm: nn.Module, name: str, weight: Tensor) -> None:
    why = non_finite_summary(weight)
    if why is not None:
        raise ValueError(
            f"layer {name!r}: weight has non-finite values (NaN/Inf: {why}); fix the initialization "
            "or checkpoint before prepare (the model was left unchanged)"
        )


CAPTURES = ("auto", "fx", "export", "dynamo")


def _choose_capture(model: nn.Module, capture: str, example_inputs: Any) -> str:
    """The capture to use; a clear error for an unknown name or inputs that do not fit it."""
    if capture not in CAPTURES:
        raise ValueError(f"unknown capture {capture!r}: choose one of {list(CAPTURES)}")
    if capture == "dynamo" and example_inputs is not None:
        raise ValueError(
            "capture='dynamo' keeps the model and needs no example_inputs (torch.compile sees the real "
            "inputs at each call); drop example_inputs, or use capture='export' to capture with them"
        )
    if capture == "export" and example_inputs is None:
        raise ValueError("capture='export' needs example_inputs=(args...) for torch.export; pass them, "
                         "or use capture='fx' or capture='dynamo'")
    if capture == "fx" and example_inputs is not None:
        raise ValueError("capture='fx' (torch.fx.symbolic_trace) uses no example_inputs; drop them, "
                         "or use capture='export' to capture with them")
    if capture == "auto":
        if example_inputs is not None:
            return "export"
        return "dynamo" if module_capture.is_hf_model(model) else "fx"
    return capture


def prepare(
    model: nn.Module,
    config: LotionConfig | None = None,
    example_inputs: Any = None,
    *,
    capture: str = "auto",
) -> nn.Module:
    """Route every Linear weight of `model` through one LOTION smoothing node.

    capture:
      "fx": torch.fx.symbolic_trace; returns a GraphModule sharing the model's Parameters.
      "export": torch.export with example_inputs (a tuple of forward's positional args), for models
          that tracing cannot handle; returns a GraphModule sharing the Parameters.
      "dynamo": returns the same model object, class and methods kept (generate, save_pretrained,
          Trainer); each nn.Linear calls its smoother in eager and under torch.compile.
      "auto" (default): "export" when example_inputs are given, else "dynamo" for a Hugging Face
          PreTrainedModel, else "fx".
    A model with no Linear layer to rewrite is returned unchanged, with a warning.
    """
    config = config or LotionConfig()
    _check_model(model)
    capture = _choose_capture(model, capture, example_inputs)

    def resolve_block(module_name: str, weight: nn.Parameter) -> int:
        _check_finite(model, module_name, weight)
        try:
            return R.resolve_block(config.block_size, config.format, weight.shape[-1])
        except ValueError as e:
            raise ValueError(f"layer {module_name!r} (weight {tuple(weight.shape)}): {e}") from None

    def make_smoother(name: str, weight: nn.Parameter, block: int, index: int) -> nn.Module:
        return LotionSmoother(name, weight, block, config, index)

    if capture == "dynamo":
        result = module_capture.rewrite_modules(
            model, skip=config.skip, resolve_block=resolve_block, make_smoother=make_smoother
        )
        if not result.rewritten:
            _warn_unprepared(model, result)
            return model
        object.__setattr__(model, _INFO, PreparedInfo(config, model, "dynamo", result, None))
        return model

    if capture == "fx":
        gm, capture = passes.symbolic_trace(model), "symbolic_trace"
    else:
        gm = passes.export(model, example_inputs)
    before = Graph()
    out = before.graph_copy(gm.graph, {})
    before.output(out)
    observe = None
    if config.method == "lotion" and config.curvature == "kfac_diag":  # x and delta to the smoother
        observe = (observe_linear_input, observe_linear_output)
    result = passes.insert_smoothing_nodes(
        gm, skip=config.skip, resolve_block=resolve_block, make_smoother=make_smoother, observe=observe
    )
    if not result.rewritten:
        _warn_unprepared(model, result)
        return model
    passes.verify(gm, result)
    gm.train(model.training)
    _attach_info(gm, PreparedInfo(config, model, capture, result, before))
    return gm


def _warn_unprepared(model: nn.Module, result: passes.RewriteResult) -> None:
    import warnings

    reasons = "; ".join(f"{s.node}: {s.reason}" for s in result.skipped) or "no Linear layers found"
    warnings.warn(
        f"lotion_fx.prepare found no Linear weight to rewrite in {type(model).__name__} "
        f"({reasons}); returning the model unprepared",
        stacklevel=3,
    )


def original(prepared: nn.Module) -> nn.Module:
    """The module prepare was called on (it shares its Parameters with the prepared one)."""
    return prepared_info(prepared).original


def attach_optimizer(prepared: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Let curvature='adam' smoothing nodes read `optimizer`'s exp_avg_sq for their parameter."""
    smooth = smoothers(prepared)
    owned = {id(p) for grp in optimizer.param_groups for p in grp["params"]}
    if "betas" not in optimizer.defaults:
        raise TypeError(
            f"{type(optimizer).__name__} keeps no Adam second moment (no 'betas'); use an Adam-family "
            "optimizer or LotionConfig(curvature='ema')"
        )
    for name, sm in smooth.items():
        if id(prepared.get_parameter(name)) not in owned:
            raise ValueError(f"parameter {name!r} is not in the optimizer's param_groups")
        if smoothed_weight(prepared, name) is not prepared.get_parameter(name):
            raise ValueError(
                f"parameter {name!r} is an (in, out) weight (e.g. GPT-2 Conv1D), whose optimizer state "
                "is transposed to the smoother's view; use LotionConfig(curvature='gn_sampled')"
            )
        sm.attach_optimizer(optimizer)


def penalty(prepared: nn.Module, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
    """Current value of (lam/2) * sum g * sigma^2 over all smoothed weights, for logging. Under FSDP2
    the sharded weights (and g) are gathered, so every rank must call it."""
    def whole(t: Tensor) -> Tensor:
        return t.full_tensor() if type(t).__name__ == "DTensor" else t

    values = {name: sm.penalty(whole(smoothed_weight(prepared, name))) for name, sm in smoothers(prepared).items()}
    if per_layer:
        return values
    return torch.stack([v.cpu() for v in values.values()]).sum()


@contextlib.contextmanager
def quantized_eval(prepared: nn.Module, names: Iterable[str] | None = None) -> Iterator[nn.Module]:
    """Inside the block the Linear weights are RTN(w) in the deployment format and the model is
    in eval mode; on exit (also on error) the exact full-precision weights and mode come back.
    names: quantize only these rewritten parameters (default: all), e.g. to measure one layer."""
    smooth = smoothers(prepared)
    if names is not None:
        names = list(names)
        unknown = sorted(set(names) - set(smooth))
        if unknown:
            raise ValueError(f"not rewritten parameters: {unknown}; choose among {sorted(smooth)}")
        smooth = {n: smooth[n] for n in names}
    saved: dict[str, Tensor] = {}
    was_training = prepared.training
    try:
        with torch.no_grad():
            for name, sm in smooth.items():
                p = smoothed_weight(prepared, name)
                saved[name] = p.detach().clone()
                p.copy_(R.fake_quantize(p, sm.fmt, sm.block))
                sm.use_rounded_weights(True)
        prepared.eval()
        yield prepared
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                smoothed_weight(prepared, name).copy_(w)
        for sm in smooth.values():
            sm.use_rounded_weights(False)
        prepared.train(was_training)
