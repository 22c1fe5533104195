"""The audit report: per-layer records, the terminal / markdown tables and the JSON schema.

The JSON schema ("lotion_fx.audit/1") is documented in docs/audit.md; keys are only ever added.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from tabulate import tabulate

from lotion_fx.passes.graph_diff import GraphDiff

SCHEMA = "lotion_fx.audit/1"


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
