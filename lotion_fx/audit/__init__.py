"""`audit`: what `prepare` rewrote, how each weight will quantize, and which layers will hurt.

One job per module: `run` (the `audit` call: read the plan and the rewrite, assemble the report),
`stats` (per-weight quantization statistics and export bytes), `sensitivity` (curvature estimate
and measured loss increase), `report` (the report, its tables and the JSON schema).
"""

from .report import SCHEMA, AuditReport, LayerAudit
from .run import audit
from .sensitivity import AuditData
from .stats import convert_bytes, export_bytes, layer_stats, spearman

__all__ = [
    "SCHEMA", "AuditData", "AuditReport", "LayerAudit", "audit", "convert_bytes", "export_bytes", "layer_stats",
    "spearman",
]
