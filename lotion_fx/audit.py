"""`audit`: what `prepare` rewrote, how each weight will quantize, and which layers will hurt.

Export size (bytes_export) is what `convert` produces: the bytes of the torchao tensor built for
the weight (and of any dequantized copy a tied non-Linear owner gets). bytes_ideal is the ideal
packed size:
    ceil(numel * bits / 8) + num_blocks * scale_bytes + tensor_bytes
with scale_bytes = 4 (fp32) for int8/int4, 1 (E4M3) for nvfp4, 1 (E8M0) for mxfp4, and
tensor_bytes = 4 for nvfp4's per-tensor fp32 scale, else 0. Where convert cannot export a layer,
bytes_export is bytes_ideal and the report warns. Biases are not counted (not quantized).

The JSON schema ("lotion_fx.audit/1") is documented in README.md; keys are only ever added.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from tabulate import tabulate
from torch import Tensor, nn

from lotion_fx import passes
from lotion_fx.backends import torchao_export as X
from lotion_fx.passes.graph_diff import GraphDiff, graph_diff

from . import reference as R
from .api import is_prepared, prepare, prepared_info, smoothers
from .config import LotionConfig
from .formats import get_format

SCHEMA = "lotion_fx.audit/1"
SCALE_BYTES = {"absmax": (4, 0), "nvfp4": (1, 4), "mxfp4": (1, 0)}  # (per block, per tensor)


@dataclass
class AuditData:
    """A few batches and `loss_fn(model, batch) -> scalar mean loss` for the measured sensitivity."""

    batches: Sequence[Any]
    loss_fn: Callable[[nn.Module, Any], Tensor]


@dataclass
class LayerAudit:
    """One rewritten weight: where it is used, how it quantizes, and its sensitivity."""

    param: str
    aliases: list[str]
    module: str
    smoother: str
    consumers: list[str]
    shape: list[int]
    dtype: str
    format: str
    block: int  # columns per block; 0 = one block for the whole tensor
    method: str
    num_blocks: int
    scale_min: float
    scale_max: float
    mean_variance: float
    rtn_rel_error: float
    frac_clamped: float
    bytes_full: int
    bytes_export: int  # what convert produces
    bytes_ideal: int  # ideal packed size (module docstring)
    penalty_estimate: float | None = None  # (1/2) sum g sigma^2
    measured_increase: float | None = None  # loss(RTN of this layer alone) - loss(full precision)


@dataclass
class AuditReport:
    """The audit of one prepared model; str() is a terminal table, plus to_markdown / to_json."""

    model: str
    capture: str
    config: dict
    layers: list[LayerAudit]
    skipped: list[dict]
    warnings: list[str]
    curvature_source: str  # "gn_sampled" | "ema" | "adam" | "data" | "none"
    base_loss: float | None = None
    measured_all: float | None = None  # loss with every layer RTN-quantized, minus base_loss
    spearman: float | None = None  # rank correlation of penalty_estimate vs measured_increase
    diff: GraphDiff | None = None

    # ------------------------------------------------------------------ summary numbers
    @property
    def bytes_full(self) -> int:
        return sum(l.bytes_full for l in self.layers)

    @property
    def bytes_export(self) -> int:
        return sum(l.bytes_export for l in self.layers)

    @property
    def block_summary(self) -> str:
        """The block size as resolved per layer (0 = per tensor), with the configured spec."""
        spec = self.config["block_size"]
        blocks = sorted({l.block for l in self.layers})
        shown = ", ".join("tensor" if b == 0 else str(b) for b in blocks) or "-"
        if spec is None:
            return f"{shown} (format default)"
        return shown if str(spec) == shown else f"{spec} ({shown})"

    @property
    def estimate_total(self) -> float | None:
        vals = [l.penalty_estimate for l in self.layers]
        return None if not vals or any(v is None for v in vals) else float(sum(vals))

    # ------------------------------------------------------------------ rendering
    def _tables(self, fmt: str) -> list[tuple[str, str]]:
        def g(v: float | None) -> str:
            return "-" if v is None else f"{v:.3g}"

        rewrite = [
            [l.param + "".join(f" (= {a})" for a in l.aliases), ", ".join(l.consumers), l.smoother,
             l.format, l.block or "tensor", l.method]
            for l in self.layers
        ]
        stats = [
            [l.param, "x".join(map(str, l.shape)), l.num_blocks, f"{g(l.scale_min)}..{g(l.scale_max)}",
             g(l.mean_variance), g(l.rtn_rel_error), g(l.frac_clamped), l.bytes_full, l.bytes_export]
            for l in self.layers
        ]
        sens = [[l.param, g(l.penalty_estimate), g(l.measured_increase)] for l in self.layers]
        sens.append(["(all layers)", g(self.estimate_total), g(self.measured_all)])
        out = [
            ("Rewrite", tabulate(rewrite, ["weight", "feeds nodes", "smoother", "format", "block", "method"],
                                 tablefmt=fmt)),
            ("Quantization", tabulate(stats, ["weight", "shape", "blocks", "scale range", "mean var",
                                              "RTN rel err", "clamped", "bytes fp", "bytes export"],
                                      tablefmt=fmt, disable_numparse=True)),
            (f"Sensitivity (estimate: 1/2 sum g sigma^2, g from {self.curvature_source}; "
             "measured: loss increase with RTN weights)",
             tabulate(sens, ["weight", "estimate", "measured"], tablefmt=fmt, disable_numparse=True)),
        ] if self.layers else []
        if self.curvature_source == "none" and self.base_loss is None:
            out = out[:2]  # nothing to show in the sensitivity table
        if self.skipped:
            out.append(("Not rewritten", tabulate([[s["node"], s["op"], s["param"] or "-", s["reason"]]
                                                   for s in self.skipped],
                                                  ["node", "op", "weight", "reason"], tablefmt=fmt)))
        return out

    def _header(self) -> list[str]:
        c = self.config
        lines = [
            f"lotion_fx audit of {self.model} (capture: {self.capture}; method={c['method']}, "
            f"format={c['format']}, block_size={self.block_summary})",
            f"{len(self.layers)} weights rewritten, {len(self.skipped)} Linear-like ops not rewritten; "
            f"{self.bytes_full} bytes -> {self.bytes_export} bytes after export",
        ]
        if self.base_loss is not None:
            rho = "-" if self.spearman is None else f"{self.spearman:.3f}"
            lines.append(f"base loss {self.base_loss:.4g}; Spearman(estimate, measured) = {rho}")
        return [f"WARNING: {w}" for w in self.warnings] + lines

    def __str__(self) -> str:
        parts = ["\n".join(self._header())]
        parts += [f"{title}\n{table}" for title, table in self._tables("simple")]
        return "\n\n".join(parts)

    def to_markdown(self) -> str:
        """GitHub markdown: the same tables, plus the graph diff in a code block."""
        parts = ["\n".join(f"**{line}**" if line.startswith("WARNING") else line for line in self._header())]
        parts += [f"### {title}\n\n{table}" for title, table in self._tables("github")]
        if self.diff is not None:
            parts.append(f"### Graph diff\n\n```diff\n{self.diff}\n```")
        return "\n\n".join(parts) + "\n"

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "capture": self.capture,
            "config": dict(self.config),
            "summary": {
                "rewritten": len(self.layers),
                "skipped": len(self.skipped),
                "bytes_full": self.bytes_full,
                "bytes_export": self.bytes_export,
                "curvature_source": self.curvature_source,
                "estimate_total": self.estimate_total,
                "base_loss": self.base_loss,
                "measured_all": self.measured_all,
                "spearman": self.spearman,
            },
            "warnings": list(self.warnings),
            "layers": [asdict(l) for l in self.layers],
            "skipped": [dict(s) for s in self.skipped],
            "graph_diff": self.diff.to_dict() if self.diff is not None else None,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The documented JSON schema (README.md); NaN/inf are written as null."""
        return json.dumps(_finite(self.to_dict()), indent=indent)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------------- statistics
def export_bytes(numel: int, num_blocks: int, format: str) -> int:
    """Ideal packed size of a quantized weight (formula in the module docstring)."""
    fmt = get_format(format)
    per_block, per_tensor = SCALE_BYTES[fmt.scale_rule]
    return math.ceil(numel * fmt.bits / 8) + num_blocks * per_block + per_tensor


@torch.no_grad()
def layer_stats(w: Tensor, format: str, block: int) -> dict:
    """Quantization statistics of one weight, computed in float64 from the reference functions."""
    fmt = get_format(format)
    w64 = w.detach().to(torch.float64)
    s = R.block_scales(w64, fmt, block)
    q = R.fake_quantize(w64, fmt, block)
    clamped = ~R.unclamped_mask(w64, fmt, block)
    norm = torch.linalg.vector_norm(w64)
    return dict(
        num_blocks=s.numel(),
        scale_min=float(s.min()),
        scale_max=float(s.max()),
        mean_variance=float(R.rounding_variance(w64, fmt, block).mean()),
        rtn_rel_error=float(torch.linalg.vector_norm(w64 - q) / norm) if norm > 0 else 0.0,
        frac_clamped=float(clamped.double().mean()),
        bytes_full=w.numel() * w.element_size(),
        bytes_export=export_bytes(w.numel(), s.numel(), fmt.name),
        bytes_ideal=export_bytes(w.numel(), s.numel(), fmt.name),
    )


@torch.no_grad()
def convert_bytes(original: nn.Module, rec: passes.RewrittenWeight, w: Tensor, fmt: str) -> int | None:
    """Bytes `convert` stores for this weight with its default torchao target: the tensor it
    builds, plus a dequantized copy for each tied owner that can hold neither (None: convert
    cannot export this layer)."""
    target = X.DEFAULT_TARGETS[fmt]
    wq = rec.as_out_in(w.detach())
    if X.unsupported_reason(fmt, rec.block, target, tuple(wq.shape), wq.dtype, wq.device) is not None:
        return None
    total = X.nbytes(X.to_torchao(wq, fmt, rec.block, target))
    owners = [_owner(original, n) for n in [rec.param_name, *rec.aliases]]
    linear_first = sorted(owners, key=lambda m: not isinstance(m, nn.Linear))
    for owner in linear_first[1:]:  # convert keeps the first (a Linear if any) as the primary
        if not (isinstance(owner, nn.Linear) or (isinstance(owner, nn.Embedding) and target in X.EMBEDDING_OK)):
            total += w.numel() * w.element_size()
    return total


def _owner(root: nn.Module, name: str) -> nn.Module:
    owner = name.rpartition(".")[0]
    return root.get_submodule(owner) if owner else root


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


# ---------------------------------------------------------------------- sensitivity
def _as_data(data: Any) -> AuditData | None:
    if data is None or isinstance(data, AuditData):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and callable(data[1]):
        return AuditData(list(data[0]), data[1])
    raise TypeError(
        "data must be lotion_fx.AuditData(batches, loss_fn) or a pair (batches, loss_fn) with "
        "loss_fn(model, batch) -> scalar loss"
    )


def _curvature(prepared: nn.Module) -> dict[str, Tensor] | None:
    """g_hat (bias-corrected, times curvature_scale) per parameter from the smoothing nodes' state."""
    out: dict[str, Tensor] = {}
    for name, sm in smoothers(prepared).items():
        if sm.config.method != "lotion":
            return None
        try:
            g_hat = sm.g_hat(prepared.get_parameter(name))
        except RuntimeError:  # curvature='adam' without attach_optimizer
            return None
        if g_hat is None:
            return None
        out[name] = g_hat.detach().double()
    return out


def _mean_loss(prepared: nn.Module, data: AuditData) -> float:
    with torch.no_grad():
        return sum(float(data.loss_fn(prepared, b)) for b in data.batches) / len(data.batches)


def _data_curvature(prepared: nn.Module, data: AuditData, scale: float) -> dict[str, Tensor]:
    """g = curvature_scale * mean over batches of the squared mini-batch gradient (eval mode, so the
    smoothing nodes are the identity and their state is untouched; no .grad is left behind)."""
    names = [n for n in smoothers(prepared) if prepared.get_parameter(n).requires_grad]
    params = [prepared.get_parameter(n) for n in names]
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for b in data.batches:
        grads = torch.autograd.grad(data.loss_fn(prepared, b), params, allow_unused=True)
        for a, gr in zip(acc, grads):
            if gr is not None:
                a.add_(gr.double() ** 2)
    recs = {r.param_name: r for r in prepared_info(prepared).result.rewritten}
    return {n: recs[n].as_out_in(a) * (scale / len(data.batches)) for n, a in zip(names, acc)}  # smoother layout


def _fake_quantize(prepared: nn.Module, name: str) -> Tensor:
    """RTN of a rewritten parameter in its smoother's format, in the parameter's own layout."""
    sm = smoothers(prepared)[name]
    rec = next(r for r in prepared_info(prepared).result.rewritten if r.param_name == name)
    return rec.as_out_in(R.fake_quantize(rec.as_out_in(prepared.get_parameter(name)), sm.fmt, sm.block))


def _measure(prepared: nn.Module, data: AuditData, names: list[str]) -> tuple[float, dict[str, float], float]:
    """(base loss, loss increase of each layer quantized alone, increase with all quantized)."""
    base = _mean_loss(prepared, data)
    alone: dict[str, float] = {}
    for name in names:
        p = prepared.get_parameter(name)
        saved = p.detach().clone()
        try:
            with torch.no_grad():
                p.copy_(_fake_quantize(prepared, name))
            alone[name] = _mean_loss(prepared, data) - base
        finally:
            with torch.no_grad():
                p.copy_(saved)
    saved_all = {n: prepared.get_parameter(n).detach().clone() for n in names}
    try:
        with torch.no_grad():
            for n in names:
                prepared.get_parameter(n).copy_(_fake_quantize(prepared, n))
        everything = _mean_loss(prepared, data) - base
    finally:
        with torch.no_grad():
            for n, w in saved_all.items():
                prepared.get_parameter(n).copy_(w)
    return base, alone, everything


# ---------------------------------------------------------------------- the audit
def _unreached_linears(model: nn.Module, result: passes.RewriteResult) -> list[dict]:
    """nn.Linear modules of the original model whose weight the pass neither rewrote nor reported."""
    seen = {r.param_name for r in result.rewritten} | {a for r in result.rewritten for a in r.aliases}
    seen |= {s.param_name for s in result.skipped if s.param_name}
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and f"{name}.weight" not in seen:
            out.append(dict(node="-", op=f"module {name}", param=f"{name}.weight",
                            reason="nn.Linear never called in the captured graph (unused, or hidden "
                                   "in code the capture could not see)"))
    return out


def _dry_run(model: nn.Module, config: LotionConfig, example_inputs: Any) -> tuple[str, passes.RewriteResult]:
    """Capture and find Linear ops without keeping anything: for a model prepare left unchanged."""
    if example_inputs is None:
        gm, capture = passes.symbolic_trace(model), "symbolic_trace"
    else:
        gm, capture = passes.export(model, example_inputs), "export"

    def never(*_: Any) -> Any:  # only called for weights that would be rewritten
        raise AssertionError("prepare rewrote nothing, but the dry run found a weight to rewrite")

    with warnings.catch_warnings():  # prepare has already warned about the skipped ops
        warnings.simplefilter("ignore")
        return capture, passes.insert_smoothing_nodes(gm, skip=config.skip, resolve_block=never,
                                                      make_smoother=never)


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
    data = _as_data(data)
    if data is not None and len(data.batches) == 0:
        raise ValueError("data has no batches: pass a few (inputs, targets) batches for the loss function")
    original_model = prepared
    if not is_prepared(prepared):
        config = config or LotionConfig()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare(prepared, config, example_inputs)
        if prepared is original_model:
            capture, result = _dry_run(original_model, config, example_inputs)
            return _empty_report(original_model, config, capture, result)
    info = prepared_info(prepared)
    cfg = info.config
    result = info.result
    smooth = smoothers(prepared)
    skipped = [dict(node=s.node, op=s.op, param=s.param_name, reason=s.reason) for s in result.skipped]
    skipped += _unreached_linears(info.original, result)

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
        g = _curvature(prepared)
        source = cfg.curvature if g is not None else "none"
        if g is None and data is not None:
            g, source = _data_curvature(prepared, data, cfg.curvature_scale), "data"
        if g is not None:
            for l in (l for l in layers if l.param in g):  # frozen weights get no data estimate
                sm = smooth[l.param]
                rec = next(r for r in result.rewritten if r.param_name == l.param)
                l.penalty_estimate = float(R.penalty_value(
                    rec.as_out_in(prepared.get_parameter(l.param).detach().double()), g[l.param],
                    sm.fmt, sm.block, 1.0))
        base = everything = rho = None
        if data is not None:
            base, alone, everything = _measure(prepared, data, [l.param for l in layers])
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
        skipped=skipped, warnings=report_warnings, curvature_source=source, base_loss=base,
        measured_all=everything, spearman=rho,
        diff=graph_diff(info.graph_before, prepared.graph) if info.graph_before is not None else None,
    )


def _config_dict(cfg: LotionConfig) -> dict:
    d = asdict(cfg)
    d["skip"] = list(d["skip"])
    return d


def _empty_report(model: nn.Module, config: LotionConfig, capture: str, result: passes.RewriteResult) -> AuditReport:
    msg = (f"NO LINEAR WEIGHT WAS REWRITTEN in {type(model).__name__}: training it with lotion_fx changes "
           "nothing. See 'Not rewritten' for why each Linear-like op was left alone.")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    skipped = [dict(node=s.node, op=s.op, param=s.param_name, reason=s.reason) for s in result.skipped]
    skipped += _unreached_linears(model, result)
    return AuditReport(model=type(model).__name__, capture=capture, config=_config_dict(config), layers=[],
                       skipped=skipped, warnings=[msg], curvature_source="none")
