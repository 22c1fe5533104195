"""lotion_fx: train PyTorch models for low-precision (INT8, INT4, FP4) deployment with LOTION.

`prepare` rewrites a captured model so each Linear weight routes through a smoothing node;
`quantized_eval` evaluates the deployment-quantized model; `penalty` reports the smoothing term.
"""

from . import ops  # noqa: F401  (registers torch.ops.lotion_fx before anything is traced)
from .backends.lowering import exact_division, register as _register_lowering  # fused Inductor code for the ops
from .api import (
    PreparedInfo,
    attach_optimizer,
    is_prepared,
    original,
    penalty,
    prepare,
    prepared_info,
    quantized_eval,
    smoothers,
)
from .audit import AuditData, AuditReport, audit
from .config import LotionConfig
from .curvature import curvature_step, sampled_target_loss
from .convert import ConvertReport, conversion_report, convert  # torchao export (issue 4)
from .formats import FORMATS, Format, get_format
from .reference import fake_quantize, quantize, rounding_variance
from .smoother import LotionSmoother
from .hf_state import load_smoother_state  # reload a capture="dynamo" model's state (issue 13)
from .module_capture import release  # undo capture="dynamo" (issue 13)
from . import distributed  # noqa: F401  DDP / FSDP2 wrapping under torchrun (issue 7)
from . import hf_trainer  # noqa: F401  hf_trainer.LotionTrainer: transformers imported on first access

_register_lowering()
__version__ = "0.1.0"

__all__ = [
    "AuditData",
    "AuditReport",
    "audit",
    "FORMATS",
    "Format",
    "LotionConfig",
    "LotionSmoother",
    "PreparedInfo",
    "attach_optimizer",
    "curvature_step",
    "exact_division",
    "sampled_target_loss",
    "ConvertReport", "conversion_report", "convert",  # export (issue 4)
    "fake_quantize",
    "get_format",
    "is_prepared",
    "load_smoother_state",
    "original",
    "penalty",
    "prepare",
    "prepared_info",
    "quantize",
    "quantized_eval",
    "release",
    "rounding_variance",
    "smoothers",
]
