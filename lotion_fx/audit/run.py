"""`audit`: read what prepare planned and rewrote, gather each weight's statistics and sensitivity,
and assemble the report."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any, Callable, Iterable, Sequence

from torch import Tensor, nn

from lotion_fx import passes
from lotion_fx.passes.graph_diff import graph_diff

from ..api import is_prepared, prepare, prepared_info
from ..config import LotionConfig
from .report import AuditReport, LayerAudit
from .sensitivity import AuditData, as_data, data_curvature, measure, penalty_estimates, state_curvature
from .stats import convert_bytes, layer_stats, spearman


def audit(
    prepared: nn.Module,
    data: AuditData | tuple[Iterable[Any], Callable[[nn.Module, Any], Tensor]] | None = None,
    *,
    config: LotionConfig | None = None,
    example_inputs: Any = None,
) -> AuditReport:
    """Audit a prepared model (or prepare an unprepared one with `config`/`example_inputs` first).

    With `data` (batches, loss_fn(model, batch)) the report also measures the loss increase of
    quantizing each layer alone and all together; weights and train/eval mode are restored.
    """
    data = as_data(data)
    if data is not None and len(data.batches) == 0:
        raise ValueError("data has no batches: pass a few (inputs, targets) batches for the loss function")
    original_model = prepared
    if not is_prepared(prepared):
        config = config or LotionConfig()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare(prepared, config, example_inputs)
        if prepared is original_model:
            capture, plan = _plan(original_model, config, example_inputs)
            return _empty_report(original_model, config, capture, plan)
    info = prepared_info(prepared)
    cfg = info.config
    result = info.result

    layers: list[LayerAudit] = []
    report_warnings: list[str] = []
    for rec in result.rewritten:
        w = prepared.get_parameter(rec.param_name)
        layers.append(LayerAudit(
            param=rec.param_name, aliases=list(rec.aliases), module=rec.module_name,
            smoother=rec.smoother, consumers=list(rec.consumers), shape=list(rec.shape),
            dtype=str(w.dtype).replace("torch.", ""), format=cfg.format, block=rec.block,
            method=cfg.method, **layer_stats(rec.as_out_in(w), cfg.format, rec.block),
        ))
        converted = convert_bytes(info.original, rec, w, cfg.format)
        if converted is None:
            report_warnings.append(f"convert cannot export {rec.param_name!r} in format {cfg.format}; "
                                   "its 'bytes export' is the ideal packed size")
        else:
            layers[-1].bytes_export = converted

    was_training = prepared.training
    try:
        prepared.eval()
        g = state_curvature(prepared)
        source = cfg.curvature if g is not None else "none"
        if g is None and data is not None:
            g, source = data_curvature(prepared, data, cfg.curvature_scale), "data"
        estimates = penalty_estimates(prepared, g) if g is not None else {}
        for l in layers:  # frozen weights get no data estimate
            l.penalty_estimate = estimates.get(l.param)
        base = everything = rho = None
        if data is not None:
            base, alone, everything = measure(prepared, data, [l.param for l in layers])
            for l in layers:
                l.measured_increase = alone[l.param]
            if g is not None and all(l.penalty_estimate is not None for l in layers):
                rho = spearman([l.penalty_estimate for l in layers], [l.measured_increase for l in layers])
    finally:
        prepared.train(was_training)
    if source == "none":
        report_warnings.append("no curvature yet (train a few steps with method='lotion', or pass data=...): "
                               "no sensitivity estimate")
    return AuditReport(
        model=type(info.original).__name__, capture=info.capture, config=_config_dict(cfg), layers=layers,
        skipped=_not_rewritten(info.original, result.rewritten, result.skipped), warnings=report_warnings,
        curvature_source=source, base_loss=base, measured_all=everything, spearman=rho,
        diff=graph_diff(info.graph_before, prepared.graph) if info.graph_before is not None else None,
    )


def _plan(model: nn.Module, config: LotionConfig, example_inputs: Any) -> tuple[str, passes.RewritePlan]:
    """Capture and plan the rewrite without editing anything: for a model prepare left unchanged."""
    if example_inputs is None:
        gm, capture = passes.symbolic_trace(model), "symbolic_trace"
    else:
        gm, capture = passes.export(model, example_inputs), "export"
    return capture, passes.plan_rewrite(gm, config.skip)


def _not_rewritten(model: nn.Module, weights: Sequence[passes.PlannedWeight | passes.RewrittenWeight],
                   skipped: Sequence[passes.SkippedOp]) -> list[dict]:
    """Report rows for the ops the pass left alone, then for the nn.Linear modules of the original
    model whose weight it neither rewrote nor reported (never called in the captured graph)."""
    rows = [dict(node=s.node, op=s.op, param=s.param_name, reason=s.reason) for s in skipped]
    seen = {n for w in weights for n in (w.param_name, *w.aliases)} | {s.param_name for s in skipped if s.param_name}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and f"{name}.weight" not in seen:
            rows.append(dict(node="-", op=f"module {name}", param=f"{name}.weight",
                             reason="nn.Linear never called in the captured graph (unused, or hidden "
                                    "in code the capture could not see)"))
    return rows


def _config_dict(cfg: LotionConfig) -> dict:
    d = asdict(cfg)
    d["skip"] = list(d["skip"])
    return d


def _empty_report(model: nn.Module, config: LotionConfig, capture: str, plan: passes.RewritePlan) -> AuditReport:
    msg = (f"NO LINEAR WEIGHT WAS REWRITTEN in {type(model).__name__}: training it with lotion_fx changes "
           "nothing. See 'Not rewritten' for why each Linear-like op was left alone.")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return AuditReport(model=type(model).__name__, capture=capture, config=_config_dict(config), layers=[],
                       skipped=_not_rewritten(model, plan.weights, plan.skipped), warnings=[msg],
                       curvature_source="none")
