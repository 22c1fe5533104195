"""Capture front-ends: turn a user's nn.Module into a torch.fx GraphModule that shares its Parameters."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves, tree_map

from .train_mode import FLAG_NAME, follow_train_mode, mode_sites


class CaptureError(RuntimeError):
    """The model could not be captured; the message says which capture failed and what to do."""


def normalize_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept `(args...)`, or `(args_tuple, kwargs_dict)` given as a pair with a dict second."""
    if isinstance(example_inputs, torch.Tensor):
        raise TypeError(
            "example_inputs must be a tuple of the positional arguments of model.forward, "
            "e.g. example_inputs=(x,), not a bare tensor"
        )
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError(
            f"example_inputs must be a tuple of forward's positional arguments (e.g. (ids,)), "
            f"got {type(example_inputs).__name__}"
        )
    if len(example_inputs) == 2 and isinstance(example_inputs[1], dict) and isinstance(example_inputs[0], (tuple, list)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    return tuple(example_inputs), {}


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put every submodule in train or eval mode for a capture; restore each one's own mode after."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _capture_following_mode(model: nn.Module, capture: Callable[[], GraphModule]) -> GraphModule:
    """Capture in train mode (so dropout is in the graph at all), then make the mode-dependent ops
    follow the GraphModule's train()/eval(); an eval-mode capture tells which ops are always on."""
    with _mode(model, True):
        gm = capture()
    eval_gm = None
    if mode_sites(gm):
        with _mode(model, False):
            eval_gm = capture()
    follow_train_mode(gm, eval_gm)
    # the capture's mode is the model's; only gm and its own flag are set (the model's submodules,
    # which a traced graph shares, keep their modes)
    gm.training = model.training
    if hasattr(gm, FLAG_NAME):
        getattr(gm, FLAG_NAME).training = model.training
    return gm


def symbolic_trace(model: nn.Module) -> GraphModule:
    """torch.fx.symbolic_trace; the GraphModule holds the model's own submodules and Parameters,
    and its dropout follows its train()/eval() mode."""

    def trace() -> GraphModule:
        try:
            return torch.fx.symbolic_trace(model)
        except Exception as e:  # tracing raises many types (TraceError, TypeError, AttributeError...)
            raise CaptureError(
                f"torch.fx.symbolic_trace failed on {type(model).__name__}: {type(e).__name__}: {e}. "
                "Pass example_inputs=(...) to lotion_fx.prepare to capture with torch.export instead."
            ) from e

    return _capture_following_mode(model, trace)


def export(model: nn.Module, example_inputs: Any) -> GraphModule:
    """torch.export (training IR, non-strict) and unlift to a GraphModule sharing the Parameters;
    its dropout and batch norm follow its train()/eval() mode."""
    args, kwargs = normalize_example_inputs(example_inputs)
    # Dim.AUTO: every tensor dim is dynamic where the model allows it, so the captured graph
    # also runs other batch sizes and sequence lengths than the example's.
    auto = lambda t: {i: torch.export.Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as e:
        raise TypeError(
            f"example_inputs do not fit {type(model).__name__}.forward{inspect.signature(model.forward)}: "
            f"{e}; pass a tuple of forward's positional arguments, or ((args...), {{kwargs}})"
        ) from None
    # with kwargs torch.export wants the specs keyed by forward's parameter names
    dynamic = {k: tree_map(auto, v) for k, v in bound.items()} if kwargs else tree_map(auto, args)

    def capture() -> GraphModule:
        try:
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
        except Exception as e:
            hint = "Check that example_inputs match model.forward's arguments."
            if "register a pytree" in str(e):  # e.g. a Hugging Face DynamicCache in the output
                hint = ("The output holds a type torch.export cannot flatten; for Hugging Face models pass "
                        "use_cache=False (config.use_cache = False, or example_inputs=((ids,), {'use_cache': False})).")
            raise CaptureError(
                f"torch.export failed on {type(model).__name__} with the given example_inputs: "
                f"{type(e).__name__}: {e}. {hint}"
            ) from e
        return ep.module(check_guards=False)

    gm = _capture_following_mode(model, capture)
    _share_parameters(model, gm)
    # ep.module() replaces train()/eval() by methods that raise; the class's own ones are right
    # here (the mode-dependent ops read the mode through a submodule), and unlike those bound
    # methods they survive pickling.
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    if not any(isinstance(leaf, nn.Module) for leaf in tree_leaves((args, kwargs))):
        _drop_local_hooks(gm)
    # unpickling re-traces forward's code with graph._tracer_cls; export's tracer cannot be
    # rebuilt without its scope (torch.fx's own Tracer can)
    gm.graph._tracer_cls = gm._tracer_cls = None
    return gm


def _drop_local_hooks(gm: nn.Module) -> None:
    """Remove the hooks ep.module() adds for nn.Module graph inputs (no-ops without such inputs):
    they are local lambdas, which pickle cannot save."""
    for hooks in (gm._forward_pre_hooks, gm._forward_hooks):
        for key, fn in list(hooks.items()):
            if getattr(fn, "__name__", "") == "<lambda>":
                del hooks[key]
                gm._forward_hooks_always_called.pop(key, None)


def _share_parameters(model: nn.Module, gm: nn.Module) -> None:
    """Make sure gm's Parameters are the very objects of model (an optimizer on either works)."""
    originals = dict(model.named_parameters(remove_duplicate=False))
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        orig = originals.get(name)
        if orig is None or orig is p:
            continue
        owner, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, orig)
