"""Make mode-dependent ops of a captured graph follow the GraphModule's train()/eval() at run time.

Capture evaluates `self.training` once: torch.export turns `F.dropout(x, p, self.training)` into
`aten.dropout(x, p, True)` and `dropout_p=p if self.training else 0.0` into the constant `p`, and
symbolic_trace does the same for functional dropout. Left alone, eval() and quantized_eval would
still drop (two identical calls differ). This pass inserts one `TrainingFlag` submodule, which
returns its own `training` flag (nn.Module.train/eval set it with the rest of the model), and feeds
it to every such op: the train flag of dropout and batch norm, and `dropout_p * flag` of attention.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

aten = torch.ops.aten

FLAG_NAME = "lotion_train_mode"

# target -> (positional index, keyword name) of the train flag; the probability is argument 1 / "p"
DROPOUT_FLAG = {
    aten.dropout.default: (2, "train"),
    aten.feature_dropout.default: (2, "train"),
    aten.alpha_dropout.default: (2, "train"),
    aten.feature_alpha_dropout.default: (2, "train"),
    torch.dropout: (2, "train"),
    F.dropout: (2, "training"),
    F.dropout1d: (2, "training"),
    F.dropout2d: (2, "training"),
    F.dropout3d: (2, "training"),
    F.alpha_dropout: (2, "training"),
    F.feature_alpha_dropout: (2, "training"),
}
DROPOUT_DEFAULT_TRAINING = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}  # training=True default
ATTENTION_P = {aten.scaled_dot_product_attention.default: (4, "dropout_p"), F.scaled_dot_product_attention: (4, "dropout_p")}
# batch_norm(input, weight|running_mean, ...): the train flag is argument 5 for both signatures
BATCH_NORM_FLAG = {aten.batch_norm.default: (5, "training", 3), F.batch_norm: (5, "training", 1)}


class TrainingFlag(nn.Module):
    """Returns `self.training`: the graph reads the module's current mode through this node."""

    def forward(self) -> bool:
        return self.training


@dataclass(frozen=True)
class _Site:
    node: Node
    kind: str  # "dropout" | "attention" | "batch_norm"
    index: int
    key: str
    value: object  # the value the capture fixed


def _arg(node: Node, index: int, key: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def mode_sites(gm: GraphModule) -> list[_Site]:
    """Every op of gm whose behaviour depends on the train flag, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if t in DROPOUT_FLAG:
            i, k = DROPOUT_FLAG[t]
            sites.append(_Site(node, "dropout", i, k, _arg(node, i, k, t in DROPOUT_DEFAULT_TRAINING)))
        elif t in ATTENTION_P:
            i, k = ATTENTION_P[t]
            sites.append(_Site(node, "attention", i, k, _arg(node, i, k, 0.0)))
        elif t in BATCH_NORM_FLAG:
            i, k, stats = BATCH_NORM_FLAG[t]
            running = _arg(node, stats, "running_mean", None)
            if running is not None:  # without running statistics batch norm always uses the batch
                sites.append(_Site(node, "batch_norm", i, k, _arg(node, i, k, False)))
    return sites


def _active(site: _Site) -> bool:
    if site.kind == "attention":
        return isinstance(site.value, (int, float)) and site.value > 0
    if site.kind == "dropout":
        p = _arg(site.node, 1, "p", 0.5)
        return site.value is True and not (isinstance(p, (int, float)) and p == 0)
    return site.value is True


def follow_train_mode(gm: GraphModule, eval_capture: GraphModule | None = None) -> list[str]:
    """Rewrite gm (captured in train mode) so its mode-dependent ops follow gm.training.

    eval_capture: the same model captured in eval mode. Where both captures have the same
    sequence of mode-dependent ops, an op still active in the eval capture (e.g. dropout with
    training=True written literally) is left as it is. Returns the names of the rewritten nodes.
    """
    sites = mode_sites(gm)
    always_on: set[int] = set()
    if eval_capture is not None:
        others = mode_sites(eval_capture)
        if [(s.kind, s.node.target) for s in others] == [(s.kind, s.node.target) for s in sites]:
            always_on = {i for i, s in enumerate(others) if _active(s)}
    todo = [s for i, s in enumerate(sites) if _active(s) and i not in always_on]
    if not todo:
        return []
    if hasattr(gm, FLAG_NAME):
        raise ValueError(f"the model already has an attribute {FLAG_NAME!r}; rename it to prepare")
    gm.add_submodule(FLAG_NAME, TrainingFlag())
    graph = gm.graph
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(anchor):
        flag = graph.call_module(FLAG_NAME, ())
    for s in todo:
        value: object = flag
        if s.kind == "attention":
            with graph.inserting_before(s.node):
                value = graph.call_function(operator.mul, (s.value, flag))  # p * True = p, p * False = 0.0
        if len(s.node.args) > s.index:
            s.node.update_arg(s.index, value)
        else:
            s.node.update_kwarg(s.key, value)
    graph.lint()
    gm.recompile()
    return [s.node.name for s in todo]
