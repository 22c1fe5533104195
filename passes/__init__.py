"""Capture front-ends and graph passes (installed as `lotion_fx.passes`)."""

from .capture import CaptureError, export, normalize_example_inputs, symbolic_trace
from .rewrite import (
    PlannedWeight, RewritePlan, RewriteResult, RewrittenWeight, SkippedOp, apply_rewrite, insert_smoothing_nodes,
    parameter_names, plan_rewrite, skip_pattern, verify,
)

__all__ = [
    "CaptureError",
    "PlannedWeight",
    "RewritePlan",
    "RewriteResult",
    "RewrittenWeight",
    "SkippedOp",
    "apply_rewrite",
    "export",
    "insert_smoothing_nodes",
    "parameter_names",
    "plan_rewrite",
    "skip_pattern",
    "normalize_example_inputs",
    "symbolic_trace",
    "verify",
]
