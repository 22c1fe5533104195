"""The FX pass: route every Linear weight through one smoothing node per parameter.

Linear-like ops recognised: call_module nn.Linear, F.linear / aten.linear, and mm / addmm /
matmul whose weight operand is a transposed parameter (what Linear decomposes into) or a
parameter stored as (in, out) (Hugging Face's Conv1D: addmm(bias, x, W)). The smoothing node
always sees the (out, in) matrix, so blocks run along in_features: an (in, out) weight is
transposed around its smoothing node. Nothing else in the graph changes.

Two steps: `plan_rewrite` finds the weights and the ops left alone (and why) without editing
anything, so audit and the CLI read the same plan prepare uses; `apply_rewrite` validates every
layer, then inserts the nodes, so a bad layer raises with the graph untouched.
`insert_smoothing_nodes` is the two in a row, plus one warning naming the Linear-like ops left
alone for any reason but a `skip` pattern.
"""

from __future__ import annotations

import fnmatch
import operator
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node

aten = torch.ops.aten

SMOOTHER_ROOT = "lotion"

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, aten.linear.default}
# target -> index of the (transposed) weight operand
MATMUL_FUNCTIONS = {
    aten.mm.default: 1,
    aten.addmm.default: 2,
    aten.matmul.default: 1,
    torch.matmul: 1,
    operator.matmul: 1,
    torch.mm: 1,  # what symbolic_trace records for torch.mm / torch.addmm
    torch.addmm: 2,
}
TRANSPOSE_FUNCTIONS = {aten.t.default, aten.transpose.int, aten.permute.default, torch.t, torch.transpose}
TRANSPOSE_METHODS = {"t", "transpose", "permute"}


@dataclass
class PlannedWeight:
    """One parameter the rewrite would route through a smoothing node (nothing edited yet)."""

    param_name: str
    module_name: str
    smoother: str  # qualified name the LotionSmoother submodule would get
    shape: tuple[int, ...]
    aliases: list[str] = field(default_factory=list)  # other names of a tied parameter
    transposed: bool = False  # stored (in, out), as Hugging Face's Conv1D: smoothed as param.t()
    nodes: list[str] = field(default_factory=list)  # the Linear-like ops it feeds, before the rewrite


@dataclass
class RewrittenWeight:
    """One parameter now routed through a smoothing node."""

    param_name: str
    module_name: str
    smoother: str  # qualified name of the LotionSmoother submodule
    shape: tuple[int, ...]
    block: int
    consumers: list[str] = field(default_factory=list)  # graph nodes now fed by the smoother
    aliases: list[str] = field(default_factory=list)  # other names of a tied parameter
    # True: the parameter is stored (in, out) (Conv1D); the smoother, its block and its state
    # are those of param.t(), and quantizing the parameter means quantizing param.t()
    transposed: bool = False

    def as_out_in(self, w: torch.Tensor) -> torch.Tensor:
        """The (out, in) view of this parameter (or of a tensor shaped like it): what is blocked
        along its last dim and quantized; applying it twice gives back the parameter's layout."""
        return w.t() if self.transposed else w


@dataclass
class SkippedOp:
    """A Linear-like op the pass left alone, and why."""

    node: str
    op: str
    param_name: str | None
    reason: str
    warn: bool = True  # False for skips the user asked for and matmuls of two activations


@dataclass
class RewriteResult:
    rewritten: list[RewrittenWeight]
    skipped: list[SkippedOp]


@dataclass
class _Use:
    node: Node
    kind: str  # "module" | "linear" | "matmul" (x @ param.t()) | "matmul_in_out" (x @ param)
    param: nn.Parameter
    param_name: str
    weight_arg: Node | None  # get_attr node (linear, matmul_in_out) or transpose node (matmul)


def _describe(node: Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target}"
    t = node.target
    return f"{node.op} {getattr(t, '__name__', None) or str(t)}"


def _is_transpose(node: Node) -> bool:
    if node.op == "call_function" and node.target in TRANSPOSE_FUNCTIONS:
        if node.target in (aten.permute.default,):
            return list(node.args[1]) in ([1, 0], [-1, -2])
        return True
    if node.op == "call_method" and node.target in TRANSPOSE_METHODS:
        return node.target != "permute" or list(node.args[1:]) in ([1, 0], [[1, 0]])
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return True
    return False


def _parameter(gm: GraphModule, node: object) -> nn.Parameter | None:
    if isinstance(node, Node) and node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.Parameter):
            return obj
    return None


def _find_uses(gm: GraphModule, names: dict[int, str]) -> tuple[list[_Use], list[SkippedOp]]:
    uses: list[_Use] = []
    skipped: list[SkippedOp] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if not isinstance(mod, nn.Linear):
                for sub_name, sub in mod.named_modules():  # a leaf module hiding Linear layers
                    if isinstance(sub, nn.Linear) and sub_name:
                        skipped.append(SkippedOp(node.name, _describe(node), names.get(id(sub.weight)),
                                                 f"nn.Linear {sub_name!r} inside leaf module {type(mod).__name__}, "
                                                 "which the capture did not trace into (try example_inputs=...)"))
                continue
            if type(mod).forward is not nn.Linear.forward:
                skipped.append(SkippedOp(node.name, _describe(node), names.get(id(mod.weight)),
                                         f"{type(mod).__name__} overrides nn.Linear.forward"))
                continue
            uses.append(_Use(node, "module", mod.weight, names[id(mod.weight)], None))
        elif node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            p = _parameter(gm, w)
            if p is None:
                skipped.append(SkippedOp(node.name, _describe(node), None, "weight is not fed by a parameter"))
                continue
            uses.append(_Use(node, "linear", p, names[id(p)], w))
        elif node.op == "call_function" and node.target in MATMUL_FUNCTIONS:
            idx = MATMUL_FUNCTIONS[node.target]
            operand = node.args[idx] if len(node.args) > idx else None
            if isinstance(operand, Node) and _is_transpose(operand):
                p = _parameter(gm, operand.args[0])
                if p is not None:
                    uses.append(_Use(node, "matmul", p, names[id(p)], operand))
                    continue
            p = _parameter(gm, operand)
            if p is not None:  # an (in, out) weight, as Hugging Face's Conv1D stores it
                uses.append(_Use(node, "matmul_in_out", p, names[id(p)], operand))
                continue
            # x @ y of two activations (attention scores) is not a Linear layer: recorded, no warning
            skipped.append(SkippedOp(node.name, _describe(node), None, "weight operand is not fed by a parameter",
                                     warn=False))
    return uses, skipped


def _input_slot(node: Node) -> int | str | None:
    """Where a Linear-like node takes its input x (argument index or keyword); None when x is not a
    graph value or the op scales x W^T (addmm's alpha), so an observer could not see the Linear's input."""
    if node.op == "call_module" or node.target in LINEAR_FUNCTIONS:
        slot: int | str = 0 if node.args else "input"
    else:
        slot = MATMUL_FUNCTIONS[node.target] - 1  # x sits just before the weight operand
        if node.kwargs.get("alpha", 1) != 1:
            return None
    x = node.args[slot] if isinstance(slot, int) and len(node.args) > slot else node.kwargs.get(str(slot))
    return slot if isinstance(x, Node) else None


def _insert_observers(graph: Graph, node: Node, smoother: Node, observe: tuple[Callable, Callable]) -> None:
    """Feed node's input through observe[0](smoother, x) and its output through observe[1](smoother, y)."""
    slot = _input_slot(node)
    x = node.args[slot] if isinstance(slot, int) else node.kwargs[slot]
    with graph.inserting_before(node):
        obs_in = graph.call_function(observe[0], (smoother, x))
    if isinstance(slot, int):
        node.update_arg(slot, obs_in)
    else:
        node.update_kwarg(slot, obs_in)
    with graph.inserting_after(node):
        obs_out = graph.call_function(observe[1], (smoother, node))
    node.replace_all_uses_with(obs_out, delete_user_cb=lambda user: user is not obs_out)


def _insertion_point(gm: GraphModule) -> Node:
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr"):
            return node
    raise AssertionError("graph has no output node")


def parameter_names(module: nn.Module) -> tuple[dict[int, str], dict[int, list[str]]]:
    """id(parameter) -> its first name, and -> its other names (a tied weight has several)."""
    names: dict[int, str] = {}
    aliases: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in names:
            aliases[id(p)].append(name)
        else:
            names[id(p)], aliases[id(p)] = name, []
    return names, aliases


def skip_pattern(skip: tuple[str, ...], param_names: list[str], module_name: str | None = None) -> str | None:
    """The first `skip` pattern matching any name of the parameter, its owners, or the consuming module."""
    candidates = [*param_names, *(n.rpartition(".")[0] for n in param_names)]
    if module_name is not None:
        candidates.append(module_name)
    return next((pat for pat in skip if any(fnmatch.fnmatchcase(c, pat) for c in candidates)), None)


@dataclass
class RewritePlan:
    """What the rewrite of one graph would do: the weights it would smooth, in order, and the
    Linear-like ops it leaves alone and why. Reading it edits nothing (audit and the CLI use it)."""

    weights: list[PlannedWeight]
    skipped: list[SkippedOp]
    _uses: list[_Use] = field(default_factory=list, repr=False)  # the graph nodes apply edits


def plan_rewrite(gm: GraphModule, skip: tuple[str, ...]) -> RewritePlan:
    """Find the Linear weights of gm to route through smoothing nodes, without editing gm."""
    names, aliases = parameter_names(gm)
    uses, skipped = _find_uses(gm, names)
    layouts: dict[int, set[bool]] = {}
    for use in uses:
        layouts.setdefault(id(use.param), set()).add(use.kind == "matmul_in_out")

    kept: list[_Use] = []
    weights: dict[int, PlannedWeight] = {}
    for use in uses:
        # A tied weight is skipped if any of its names (or the consuming module) matches.
        module = str(use.node.target) if use.kind == "module" else None
        pattern = skip_pattern(skip, [use.param_name, *aliases[id(use.param)]], module)
        why = None
        if pattern is not None:
            why = f"skipped by pattern {pattern!r}"
        elif use.param.dim() != 2:
            why = f"weight has shape {tuple(use.param.shape)}, not 2-D"
        elif len(layouts[id(use.param)]) > 1:
            why = "parameter is used both as an (out, in) and as an (in, out) matrix"
        if why is not None:
            skipped.append(SkippedOp(use.node.name, _describe(use.node), use.param_name, why, warn=pattern is None))
            continue
        if id(use.param) not in weights:
            weights[id(use.param)] = PlannedWeight(
                param_name=use.param_name, module_name=use.param_name.rpartition(".")[0],
                smoother=f"{SMOOTHER_ROOT}.{use.param_name.replace('.', '_')}", shape=tuple(use.param.shape),
                aliases=aliases[id(use.param)], transposed=use.kind == "matmul_in_out",
            )
        weights[id(use.param)].nodes.append(use.node.name)
        kept.append(use)
    return RewritePlan(list(weights.values()), skipped, kept)


def apply_rewrite(
    gm: GraphModule,
    plan: RewritePlan,
    *,
    resolve_block: Callable[[str, nn.Parameter], int],
    make_smoother: Callable[[str, nn.Parameter, int, int], nn.Module],
    observe: tuple[Callable, Callable] | None = None,
) -> RewriteResult:
    """Insert the smoothing nodes `plan` (from plan_rewrite(gm, ...)) lists; every layer is
    validated by resolve_block before the first edit, so a bad layer raises with gm untouched.

    resolve_block(module_name, weight) validates the layer and returns its block size;
    make_smoother(param_name, weight, block, index) builds the smoothing module; observe, if given,
    is (fn(smoother, x) -> x, fn(smoother, y) -> y), called on each consumer's input and output
    (curvature="kfac_diag").
    """
    params = {u.param_name: u.param for u in plan._uses}
    out_in = {w.param_name: params[w.param_name].t() if w.transposed else params[w.param_name]
              for w in plan.weights}
    records = [
        RewrittenWeight(param_name=w.param_name, module_name=w.module_name, smoother=w.smoother,
                        shape=w.shape, block=resolve_block(w.module_name, out_in[w.param_name]),
                        aliases=list(w.aliases), transposed=w.transposed)
        for w in plan.weights
    ]
    if hasattr(gm, SMOOTHER_ROOT) and records:
        raise ValueError(f"the model already has an attribute {SMOOTHER_ROOT!r}; rename it to prepare")
    blind = [u for u in plan._uses if _input_slot(u.node) is None] if observe is not None else []
    if blind:
        u = blind[0]
        raise ValueError(
            f"layer {u.param_name.rpartition('.')[0] or u.param_name!r} (node {u.node.name}, {_describe(u.node)}, weight "
            f"{u.param_name}): curvature='kfac_diag' needs the Linear's input x, which this op does not take "
            "as a plain graph value (or scales x W^T by alpha); use LotionConfig(curvature='gn_sampled'), "
            "or skip the layer"
        )

    graph = gm.graph
    smoothed: dict[str, Node] = {}
    smoother_nodes: dict[str, Node] = {}
    anchor = _insertion_point(gm)
    for index, rec in enumerate(records):
        first = next(u for u in plan._uses if u.param_name == rec.param_name)
        gm.add_submodule(rec.smoother, make_smoother(rec.param_name, out_in[rec.param_name], rec.block, index))
        with graph.inserting_before(anchor):
            w = graph.get_attr(rec.param_name)
            if rec.transposed:
                # smooth param.t(), which is (out, in), and hand its transpose back to the matmul
                t = aten.t.default if isinstance(first.node.target, torch._ops.OpOverload) else torch.t
                s = graph.call_module(rec.smoother, (graph.call_function(t, (w,)),))
                smoothed[rec.param_name] = graph.call_function(t, (s,))
            else:
                smoothed[rec.param_name] = graph.call_module(rec.smoother, (w,))
            if observe is not None:  # the smoother module itself, handed to its observers
                smoother_nodes[rec.param_name] = graph.get_attr(rec.smoother)
    by_name = {r.param_name: r for r in records}
    orphans: list[Node] = []
    for use in plan._uses:
        new_w = smoothed[use.param_name]
        node = use.node
        if use.kind == "module":
            mod = gm.get_submodule(str(node.target))
            x = node.args[0] if node.args else node.kwargs["input"]
            with graph.inserting_before(node):
                bias = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                lin = graph.call_function(F.linear, (x, new_w, bias))
            lin.meta.update(node.meta)
            node.replace_all_uses_with(lin)
            graph.erase_node(node)
            node = lin
        elif use.kind == "linear":
            if len(node.args) > 1:
                node.update_arg(1, new_w)
            else:
                node.update_kwarg("weight", new_w)
            orphans.append(use.weight_arg)
        elif use.kind == "matmul_in_out":
            node.update_arg(MATMUL_FUNCTIONS[node.target], new_w)
            orphans.append(use.weight_arg)
        else:
            t = use.weight_arg
            with graph.inserting_before(node):
                t_new = graph.node_copy(t, lambda n: new_w if n is t.args[0] else n)
            node.update_arg(MATMUL_FUNCTIONS[node.target], t_new)
            orphans += [t, t.args[0]]
        if observe is not None:
            _insert_observers(graph, node, smoother_nodes[use.param_name], observe)
        by_name[use.param_name].consumers.append(node.name)
    for node in dict.fromkeys(orphans):  # ordered, deduplicated: transposes before their inputs
        if not node._erased and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return RewriteResult(records, list(plan.skipped))


def insert_smoothing_nodes(
    gm: GraphModule,
    *,
    skip: tuple[str, ...],
    resolve_block: Callable[[str, nn.Parameter], int],
    make_smoother: Callable[[str, nn.Parameter, int, int], nn.Module],
    observe: tuple[Callable, Callable] | None = None,
) -> RewriteResult:
    """Rewrite gm in place (plan_rewrite, then apply_rewrite); returns what was rewritten and what
    was left alone (and why), and warns once about the Linear-like ops left alone by accident."""
    plan = plan_rewrite(gm, skip)
    result = apply_rewrite(gm, plan, resolve_block=resolve_block, make_smoother=make_smoother, observe=observe)
    _warn_skipped(plan.skipped)
    return result


def _warn_skipped(skipped: list[SkippedOp]) -> None:
    """One warning naming every Linear-like op left alone by accident."""
    shown = [s for s in skipped if s.warn]
    if shown:
        lines = "; ".join(f"{s.node} ({s.op}, weight {s.param_name or '-'}): {s.reason}" for s in shown)
        warnings.warn(f"lotion_fx left {len(shown)} Linear-like op(s) unquantized: {lines}. Pass "
                      "skip=[...] to leave layers alone on purpose (no warning).", stacklevel=3)


def verify(gm: GraphModule, result: RewriteResult) -> None:
    """Check the rewritten graph: one smoothing node per parameter, each feeding its consumers."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(SMOOTHER_ROOT + ".")]
    targets = [str(n.target) for n in calls]
    if len(targets) != len(set(targets)) or set(targets) != {r.smoother for r in result.rewritten}:
        raise AssertionError(f"expected one smoothing node per parameter, found {targets}")
    for n in calls:
        if not n.users:
            raise AssertionError(f"smoothing node {n.name} feeds nothing")
