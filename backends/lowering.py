"""Teach Inductor to generate fused code for the `torch.ops.lotion_fx.*` ops.

The ops stay opaque to Dynamo and AOTAutograd (one node per smoothing site, custom autograd), and
are replaced by the plain-torch reference math (lotion_fx.reference: elementwise ops, floor,
per-block amax, int64 hashing) before Inductor schedules, so Inductor emits the code itself
(Triton on CUDA, C++ on CPU) and fuses it with neighbours such as the cast to the matmul dtype.

Two private hooks are used, both pinned by tests/test_lowering.py:
- functional ops: entries in Inductor's decomposition table
  (`torch._inductor.decomposition.register_decomposition`, read by `select_decomp_table`);
- the mutating `lotion_backward` (updates g, count) and kfac_diag's observers (`kfac_observe_input`,
  `kfac_output_backward`: update the smoother's accumulators): a CompositeImplicitAutograd kernel. Under
  torch.compile, FunctionalTensorMode decomposes every mutable op that has one
  (FunctionalTensorMode.__torch_dispatch__: mutable schema -> can decompose -> `func.decompose`), so the
  in-place EMA update is functionalised into a graph-input mutation that Inductor writes in place,
  in the same pass over w as the penalty gradient, instead of an opaque extern call.
Eager dispatch is unchanged: the op's CompositeExplicitAutograd kernel wins over the implicit one.
If the decomposition-table hook is missing, a CompositeImplicitAutograd kernel is registered for
the functional ops too and `torch.compile` still compiles them (with a warning).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

from lotion_fx import reference as R
from lotion_fx.ops import (
    kfac_observe_input_math,
    kfac_output_backward_math,
    lotion_backward_factored_math,
    lotion_backward_math,
)

_lib: torch.library.Library | None = None
_STATE: dict[str, str] = {"mode": "unregistered"}


# --------------------------------------------------------------------------- reference bodies
def rtn_quantize(w: Tensor, fmt: str, block: int) -> Tensor:
    block = int(block)  # a SymInt here would fail resolve_block; blocks are static
    return R.fake_quantize(w, fmt, block, rounding="nearest")


def rtn_ste_backward(grad: Tensor, w: Tensor, fmt: str, block: int) -> Tensor:
    block = int(block)  # a SymInt here would fail resolve_block; blocks are static
    return grad * R.unclamped_mask(w, fmt, block).to(grad.dtype)


def sr_quantize(w: Tensor, step: Tensor, fmt: str, block: int, seed: int) -> Tensor:
    block = int(block)  # a SymInt here would fail resolve_block; blocks are static
    return R.fake_quantize(w, fmt, block, rounding="stochastic", seed=seed, step=step)


def lotion_smooth(w: Tensor, g: Tensor, count: Tensor, *rest: object) -> Tensor:
    return w.clone()


def lotion_smooth_factored(w: Tensor, *rest: object) -> Tensor:
    return w.clone()


def lotion_backward_factored(grad: Tensor, w: Tensor, a: Tensor, b: Tensor, count: Tensor,
                             weight: Tensor, fmt: str, block: int, *rest: object) -> Tensor:
    return lotion_backward_factored_math(grad, w, a, b, count, weight, fmt, int(block), *rest)


def kfac_observe_output(y: Tensor, sq_sum: Tensor) -> Tensor:
    return y.clone()


# The mutating ops' bodies are shared with the eager kernels (written with traceable ops only).
lotion_backward = lotion_backward_math
_MUTATING = {
    "lotion_backward": lotion_backward,
    "kfac_observe_input": kfac_observe_input_math,
    "kfac_output_backward": kfac_output_backward_math,
}


_FUNCTIONAL = {
    "rtn_quantize": rtn_quantize,
    "rtn_ste_backward": rtn_ste_backward,
    "sr_quantize": sr_quantize,
    "lotion_smooth": lotion_smooth,
    "lotion_smooth_factored": lotion_smooth_factored,
    "lotion_backward_factored": lotion_backward_factored,
    "kfac_observe_output": kfac_observe_output,
}


# --------------------------------------------------------------------------- private API pins
def private_apis() -> dict[str, bool]:
    """Which private hooks this torch has (tests assert all are True on supported versions)."""
    import inspect

    from torch._subclasses import functional_tensor as ft

    ft_src = inspect.getsource(ft)

    try:
        from torch._inductor import decomposition as D
    except ImportError:  # pragma: no cover
        D = None
    return {
        "inductor.decomposition.register_decomposition": hasattr(D, "register_decomposition"),
        "inductor.decomposition.decompositions": isinstance(getattr(D, "decompositions", None), dict),
        "inductor.decomposition.select_decomp_table": hasattr(D, "select_decomp_table"),
        # functionalization decomposes mutable ops through their CompositeImplicitAutograd kernel
        "FunctionalTensorMode decomposes mutable ops": "_schema.is_mutable" in ft_src
        and "func.decompose(" in ft_src,
        "OpOverload.decompose": hasattr(torch._ops.OpOverload, "decompose"),
    }


def mode() -> str:
    """'inductor-decomp' (normal), 'composite-fallback' (hook missing) or 'unregistered'."""
    return _STATE["mode"]


def _division_key() -> str | None:
    from torch._inductor import config as C

    if hasattr(C, "eager_numerics") and hasattr(C.eager_numerics, "division_rounding"):
        return "eager_numerics.division_rounding"
    if hasattr(C, "emulate_divison_rounding"):  # older spelling (torch <= 2.11)
        return "emulate_divison_rounding"
    return None


def exact_division() -> contextlib.AbstractContextManager:
    """Context: Inductor compiles fp32 division as IEEE round-to-nearest (`div_rn`), as eager is.

    Triton's `/` is an approximate reciprocal; w / s off by one ulp can flip an RTN tie or an SR
    decision, so compiled CUDA quantization may differ from eager by one grid step on a few
    elements. Compile (i.e. make the first call of the compiled model) inside this context when
    you need eager == compiled bit for bit; the switch is Inductor's own and affects only what is
    compiled inside the context (opt-in: importing lotion_fx changes no global setting).
    """
    from torch._inductor import config as C

    key = _division_key()
    if key is None:
        warnings.warn("lotion_fx: Inductor has no division-rounding switch; compiled CUDA "
                      "quantization may differ from eager by one grid step at rounding ties",
                      stacklevel=2)
        return contextlib.nullcontext()
    return C.patch({key: True})


def register() -> str:
    """Install the decompositions once (idempotent); called on `import lotion_fx`."""
    global _lib
    if _STATE["mode"] != "unregistered":
        return _STATE["mode"]
    import lotion_fx.ops  # noqa: F401  (defines the ops)

    ops = torch.ops.lotion_fx
    _lib = torch.library.Library("lotion_fx", "IMPL")
    # Mutating ops: functionalization decomposes them through this kernel (see module docstring).
    for name, fn in _MUTATING.items():
        _lib.impl(name, fn, "CompositeImplicitAutograd")
    apis = private_apis()
    if all(apis.values()):
        from torch._inductor import decomposition as D

        for name, fn in _FUNCTIONAL.items():
            op = getattr(ops, name).default
            if op not in D.decompositions:
                D.register_decomposition(op)(fn)
        _STATE["mode"] = "inductor-decomp"
    else:
        missing = [k for k, ok in apis.items() if not ok]
        warnings.warn(
            f"lotion_fx: this torch lacks Inductor hooks {missing}; registering composite kernels "
            "instead (torch.compile still compiles the smoothing math, but pin torch<=2.13 for "
            "the tested fused lowering)",
            stacklevel=2,
        )
        for name, fn in _FUNCTIONAL.items():
            _lib.impl(name, fn, "CompositeImplicitAutograd")
        _STATE["mode"] = "composite-fallback"
    return _STATE["mode"]
