"""Capture front-ends and graph passes (installed as `lotion_fx.passes`)."""

from .capture import CaptureError, export, normalize_example_inputs, symbolic_trace
from .rewrite import (
    RewriteResult, RewrittenWeight, SkippedOp, insert_smoothing_nodes, parameter_names, skip_pattern, verify,
)

__all__ = [
    "CaptureError",
    "RewriteResult",
    "RewrittenWeight",
    "SkippedOp",
    "export",
    "insert_smoothing_nodes",
    "parameter_names",
    "skip_pattern",
    "normalize_example_inputs",
    "symbolic_trace",
    "verify",
]
