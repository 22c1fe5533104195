"""`convert`: put torchao tensor subclasses, built from our own codes and scales, into the original module.

The dequantized weights equal `fake_quantize(w, fmt, block)` element for element, so the deployed
model computes what `quantized_eval` evaluated (up to the float rounding of torchao's matmul).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch
from tabulate import tabulate
from torch import nn

from lotion_fx.backends import torchao_export as X
from lotion_fx.backends.packed_linear import pack_linears

from .api import prepared_info, smoothed_weight, smoothers
from .checks import check_finite_weights
from .formats import FORMATS

_REPORT = "_lotion_convert_report"


@dataclass
class LayerReport:
    """One converted parameter: where it went and what it weighs now."""

    name: str
    format: str
    block: int
    target: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    tied: list[str] = field(default_factory=list)  # other names sharing this weight, and how


@dataclass
class ConvertReport:
    """What `convert` did, per layer and in total; `str(report)` is a tabulate table."""

    layers: list[LayerReport]
    device: str

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def table(self, tablefmt: str = "github") -> str:
        rows = [
            [r.name, r.format, r.block or "tensor", r.target, "x".join(map(str, r.shape)),
             r.bytes_before, r.bytes_after, f"{r.bytes_before / max(r.bytes_after, 1):.2f}x",
             ", ".join(r.tied)]
            for r in self.layers
        ]
        rows.append(["total", "", "", "", "", self.bytes_before, self.bytes_after,
                     f"{self.bytes_before / max(self.bytes_after, 1):.2f}x", ""])
        head = ["layer", "format", "block", "torchao tensor", "shape", "bytes before", "bytes after", "ratio", "tied"]
        return tabulate(rows, headers=head, tablefmt=tablefmt)

    def __str__(self) -> str:
        return self.table()


def conversion_report(model: nn.Module) -> ConvertReport:
    """The ConvertReport of a module returned by `convert`."""
    report = getattr(model, _REPORT, None)
    if report is None:
        raise TypeError(f"{type(model).__name__} was not returned by lotion_fx.convert")
    return report


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (root.get_submodule(owner) if owner else root), leaf


@dataclass
class _Plan:
    name: str
    aliases: list[str]
    weight: torch.Tensor  # (out, in): what the smoother quantized (param.t() for a Conv1D weight)
    fmt: str
    block: int
    target: str
    transposed: bool = False


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 Conv1D: y = x @ W + b with W stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def owners_linear_first(root: nn.Module, names: list[str]) -> list[tuple[str, nn.Module, str]]:
    """(name, owning module, attribute) for each name of a (tied) weight, an nn.Linear's first:
    convert builds the torchao tensor for that one, the primary."""
    found = [(n, *_owner(root, n)) for n in names]
    return sorted(found, key=lambda f: not isinstance(f[1], nn.Linear))


def placement(owner: nn.Module, leaf: str, transposed: bool, target: str) -> str:
    """How convert hands a quantized weight to one of its owners: "conv1d" (a GPT-2 Conv1D becomes an
    nn.Linear holding it), "shared" (the owner holds the torchao tensor) or "copy" (it gets a
    dequantized full-size copy: an (in, out) matmul weight, or a module torchao cannot serve)."""
    if transposed:
        return "conv1d" if _is_conv1d(owner) and leaf == "weight" else "copy"
    if isinstance(owner, nn.Linear) or (isinstance(owner, nn.Embedding) and target in X.EMBEDDING_OK):
        return "shared"
    return "copy"


def _as_linear(root: nn.Module, path: str, conv: nn.Module, q: nn.Parameter) -> None:
    """Replace the Conv1D at `path` by an nn.Linear holding q (out, in): the same function."""
    lin = nn.Linear(q.shape[1], q.shape[0], bias=conv.bias is not None, device="meta")
    lin.weight = q
    if conv.bias is not None:
        lin.bias = conv.bias
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, lin)


def _refuse_after_convert(module: nn.Module, args: object) -> None:
    raise RuntimeError(
        "this prepared model was converted by lotion_fx.convert: its Linear weights are now frozen "
        "torchao tensors, so training or evaluating the prepared handle would silently do nothing "
        "useful. Use the module convert returned; to train again, prepare a fresh model."
    )


def _warn_if_penalty_never_acted(smooth: Mapping[str, nn.Module]) -> None:
    """LOTION trained without curvature data is plain training: say so before it deploys as if smoothed."""
    idle = [name for name, sm in smooth.items() if sm.curvature_never_measured()]
    if not idle:
        return
    curvature = smooth[idle[0]].config.curvature
    where = ("in the training backward (did no backward run in train mode?)" if curvature == "ema" else
             "by lotion_fx.curvature_step(model, inputs), once per optimizer step (README, Quick start; "
             "lotion_fx.hf_trainer.LotionTrainer calls it for you)")
    warnings.warn(
        f"lotion_fx.convert: LOTION's penalty never acted on {len(idle)} of {len(smooth)} weights (e.g. "
        f"{idle[0]!r}): their curvature={curvature!r} estimate has no data, so they trained as plain "
        f"training and deploy as PTQ would. The curvature is measured {where}.",
        stacklevel=3,
    )


def convert(prepared: nn.Module, formats: Mapping[str, str] | None = None) -> nn.Module:
    """Return the original module with each prepared Linear weight replaced by a torchao tensor.

    formats: optional {our format: class name} overriding the defaults (int8, int4, nvfp4 ->
    LotionPackedTensor: our packed codes, Triton weight-only kernels on CUDA, plain torch on CPU;
    torchao's Int8Tensor / IntxUnpackedToInt8Tensor / NVFP4Tensor stay selectable). Every layer is
    checked before the first change; unprepared layers are left as they are. A weight tied to a
    non-Linear module (e.g. an Embedding) is shared with it when the torchao class supports
    embedding lookups, else that module gets the dequantized weight (what quantized_eval used).
    GPT-2 Conv1D layers become nn.Linear (same function, (out, in) quantized weight). A Linear holding
    a LotionPackedTensor becomes a `PackedLinear` (an nn.Linear keeping the tensor's codes and scales
    as buffers; `.weight` and the state dict still give the LotionPackedTensor) so torch.compile
    sees plain tensors: see backends/packed_linear.py. The prepared
    handle refuses to run afterwards (it shares the frozen weights); a capture="dynamo" model is
    the original itself and comes back with plain Linear layers. NaN/Inf weights are refused.
    """
    info = prepared_info(prepared)
    orig = info.original
    targets = {name: f.default_torchao_target for name, f in FORMATS.items()} | dict(formats or {})
    unknown = set(formats or {}) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats has unknown format names {sorted(unknown)}; known: {sorted(FORMATS)}")
    smooth = smoothers(prepared)
    check_finite_weights(((r.module_name, prepared.get_parameter(r.param_name)) for r in info.result.rewritten),
                         "lotion_fx.convert")
    _warn_if_penalty_never_acted(smooth)
    plans: list[_Plan] = []
    problems: list[str] = []
    for rec in info.result.rewritten:
        w = prepared.get_parameter(rec.param_name)
        try:
            mine = orig.get_parameter(rec.param_name)
        except AttributeError:
            mine = None
        if mine is not w:
            problems.append(f"layer {rec.module_name!r}: the original module no longer holds the prepared "
                            f"parameter {rec.param_name!r} (was it replaced after prepare?)")
            continue
        sm = smooth[rec.param_name]
        target = targets[sm.fmt]
        w = smoothed_weight(prepared, rec.param_name)
        why = X.unsupported_reason(sm.fmt, sm.block, target, tuple(w.shape), w.dtype, w.device)
        if why is not None:
            problems.append(f"layer {rec.module_name!r} (format {sm.fmt}, device {w.device}): {why}")
            continue
        names = [n for n, _, _ in owners_linear_first(orig, [rec.param_name, *rec.aliases])]
        plans.append(_Plan(names[0], names[1:], w, sm.fmt, sm.block, target, rec.transposed))
    if problems:
        raise ValueError("lotion_fx.convert changed nothing:\n  " + "\n  ".join(problems))

    # Build everything first, then assign: a failure while building leaves the model untouched.
    with torch.no_grad():
        built = [X.to_torchao(p.weight, p.fmt, p.block, p.target) for p in plans]
    layers = []
    for p, t in zip(plans, built):
        q = nn.Parameter(t, requires_grad=False)
        tied, extra = [], 0
        for name in [p.name, *p.aliases]:
            owner, leaf = _owner(orig, name)
            how = placement(owner, leaf, p.transposed, p.target)
            if how == "conv1d":
                _as_linear(orig, name.rpartition(".")[0], owner, q)
                tied.append(f"{name} (Conv1D -> Linear)")
            elif how == "shared":
                setattr(owner, leaf, q)
                if name != p.name:
                    tied.append(f"{name} (shared)")
            else:  # RTN values at full size; an (in, out) weight used by a plain matmul stays (in, out)
                deq = t.dequantize().to(p.weight.dtype)
                deq = nn.Parameter(deq.t() if p.transposed else deq, requires_grad=p.weight.requires_grad)
                setattr(owner, leaf, deq)
                tied.append(f"{name} (dequantized copy{', in x out' if p.transposed else ''})")
                extra += X.nbytes(deq)
        layers.append(LayerReport(p.name, p.fmt, p.block, p.target, tuple(p.weight.shape),
                                  X.nbytes(p.weight), X.nbytes(t) + extra, tied))
    device = str(plans[0].weight.device) if plans else "cpu"
    object.__setattr__(orig, _REPORT, ConvertReport(layers, device))
    if info.capture == "dynamo":  # the kept model: plain nn.Linear again, no smoother state
        from .module_capture import release

        release(orig)
    else:  # the prepared graph shares the now-frozen weights: refuse it (issue 12, item 7)
        prepared.register_forward_pre_hook(_refuse_after_convert)
    pack_linears(orig)  # LotionPackedTensor Linears -> PackedLinear: no per-call subclass unwrapping when compiled
    return orig
