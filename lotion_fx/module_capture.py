"""capture="dynamo": keep the user's model object and route each nn.Linear weight through a smoother.

Each rewritten `nn.Linear` becomes a `LotionLinear` (a subclass, switched in place, so
`isinstance(m, nn.Linear)` still holds for PEFT, transformers and `convert`) with a child `lotion`,
the `LotionSmoother` of its weight; its forward is `F.linear(x, self.lotion(self.weight), bias)`.
Eager calls run the smoothing op directly; under `torch.compile` Dynamo traces the same forward, so
the graph any backend receives holds one smoothing op per parameter and no graph break. The model
keeps its class and methods (`generate`, `save_pretrained`, ...) and every `state_dict` key; the
smoother's buffers appear beside them as `<linear>.lotion.<buffer>`. With `curvature="kfac_diag"`,
while curvature_step runs its sampled pass, the forward also hands the input and (through an
identity op whose backward sees it) the output gradient to the smoother.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lotion_fx import passes


SMOOTHER_ATTR = "lotion"


class LotionLinear(nn.Linear):
    """An nn.Linear whose weight passes through its `lotion` smoother before the matmul."""

    def forward(self, input: Tensor) -> Tensor:
        if _recomputing() and hasattr(self.lotion, "step"):
            # Activation checkpointing reruns this forward inside backward; lotion_sampled's noise is
            # keyed by a counter its forward advances, so step it back to redraw the same noise.
            self.lotion.step.sub_(1)
        sm = self.lotion
        if not sm.observing:
            return F.linear(input, sm(self.weight), self.bias)
        # kfac_diag, in curvature_step's sampled pass: the smoother sees x here and delta in the
        # backward of its output observer (a recomputed forward must not count x twice)
        if not _recomputing():
            sm.observe_input(input)
        return sm.observe_output(F.linear(input, sm(self.weight), self.bias))


def _recomputing() -> bool:
    """True when a forward runs inside autograd's backward (eager activation checkpointing).
    Compiled graphs recompute inside the graph, without running this Python again."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _hf_conv1d(mod: nn.Module) -> bool:
    t = type(mod)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers")


def rewrite_modules(
    model: nn.Module,
    *,
    skip: tuple[str, ...],
    resolve_block: Callable[[str, nn.Parameter], int],
    make_smoother: Callable[[str, nn.Parameter, int, int], nn.Module],
) -> passes.RewriteResult:
    """Give every nn.Linear of `model` (in place) a smoother for its weight; returns what was done.

    Same contract as passes.insert_smoothing_nodes: resolve_block validates a layer and returns its
    block, make_smoother builds the smoother; every layer is checked before the first edit.
    """
    names, aliases = passes.parameter_names(model)

    skipped: list[passes.SkippedOp] = []
    plan: list[tuple[str, nn.Linear, passes.RewrittenWeight]] = []
    owner_of: dict[int, str] = {}
    for mod_name, mod in model.named_modules():
        if _hf_conv1d(mod):
            skipped.append(passes.SkippedOp(mod_name, "Conv1D", names.get(id(mod.weight)),
                                            "transformers Conv1D keeps its weight as (in, out); not a Linear weight"))
            continue
        if not isinstance(mod, nn.Linear):
            continue
        pname = names.get(id(mod.weight))
        if type(mod) is not nn.Linear:
            why = (f"{type(mod).__name__} overrides nn.Linear.forward" if type(mod).forward is not nn.Linear.forward
                   else f"{type(mod).__name__} is a subclass of nn.Linear; capture='dynamo' rewrites nn.Linear itself")
            skipped.append(passes.SkippedOp(mod_name, type(mod).__name__, pname, why))
            continue
        if pname is None:  # weight is not a registered Parameter (e.g. a plain tensor attribute)
            skipped.append(passes.SkippedOp(mod_name, "Linear", None, "weight is not a Parameter"))
            continue
        pattern = passes.skip_pattern(skip, [pname, *aliases[id(mod.weight)], mod_name])
        if pattern is not None:
            skipped.append(passes.SkippedOp(mod_name, "Linear", pname, f"skipped by pattern {pattern!r}"))
            continue
        if id(mod.weight) in owner_of:
            raise ValueError(
                f"parameter {pname!r} is the weight of two nn.Linear layers ({owner_of[id(mod.weight)]!r} and "
                f"{mod_name!r}); capture='dynamo' smooths per layer and would smooth it twice. Use "
                "capture='fx' or capture='export' (one smoothing node per parameter), or skip one layer"
            )
        if hasattr(mod, SMOOTHER_ATTR):
            raise ValueError(f"layer {mod_name!r} already has an attribute {SMOOTHER_ATTR!r}; rename it to prepare")
        owner_of[id(mod.weight)] = mod_name
        block = resolve_block(mod_name, mod.weight)
        rec = passes.RewrittenWeight(
            param_name=pname, module_name=mod_name, smoother=f"{mod_name}.{SMOOTHER_ATTR}",
            shape=tuple(mod.weight.shape), block=block, aliases=aliases[id(mod.weight)],
            consumers=[mod_name],
        )
        plan.append((mod_name, mod, rec))

    for index, (_, mod, rec) in enumerate(plan):
        mod.add_module(SMOOTHER_ATTR, make_smoother(rec.param_name, mod.weight, rec.block, index))
        mod.__class__ = LotionLinear
    return passes.RewriteResult([rec for _, _, rec in plan], skipped)


def release(model: nn.Module) -> nn.Module:
    """Undo capture='dynamo' in place: plain nn.Linear layers again, smoothers and their state dropped.

    Use it to prepare the same model again with another config. `lotion_fx.convert` calls it itself
    (the converted model holds no training state and saves with exactly the original keys); calling
    it again, on a released or never-prepared model, changes nothing. The weights are kept as they
    are (full precision, or torchao tensors after convert).
    """
    from .api import _INFO  # api imports this module

    for mod in model.modules():
        if isinstance(mod, LotionLinear):
            del mod._modules[SMOOTHER_ATTR]
            mod.__class__ = nn.Linear
    model.__dict__.pop(_INFO, None)
    return model


def is_hf_model(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (checked by name: transformers need not be imported)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)
