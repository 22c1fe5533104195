"""The FX pass: route every Linear weight through one smoothing node per parameter.

Linear-like ops recognised: call_module nn.Linear, F.linear / aten.linear, and mm / addmm /
matmul whose weight operand is a transposed parameter (what Linear decomposes into) or a
parameter stored as (in, out) (Hugging Face's Conv1D: addmm(bias, x, W)). The smoothing node
always sees the (out, in) matrix, so blocks run along in_features: an (in, out) weight is
transposed around its smoothing node. Nothing else in the graph changes. Everything is checked
before the first edit, so a bad layer raises with the graph untouched. Linear-like ops left
alone for any reason but a `skip` pattern are reported in a warning that names them.
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
from torch.fx import GraphModule, Node

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


def insert_smoothing_nodes(
    gm: GraphModule,
    *,
    skip: tuple[str, ...],
    resolve_block: Callable[[str, nn.Parameter], int],
    make_smoother: Callable[[str, nn.Parameter, int, int], nn.Module],
) -> RewriteResult:
    """Rewrite gm in place; returns what was rewritten and what was left alone (and why).

    resolve_block(module_name, weight) validates the layer and returns its block size;
    make_smoother(param_name, weight, block, index) builds the smoothing module.
    """
    names, aliases = parameter_names(gm)

    uses, skipped = _find_uses(gm, names)
    layouts: dict[int, set[bool]] = {}
    for use in uses:
        layouts.setdefault(id(use.param), set()).add(use.kind == "matmul_in_out")

    # ---- plan and validate (no edits yet)
    kept: list[_Use] = []
    plan: dict[int, RewrittenWeight] = {}
    for use in uses:
        module_name = use.param_name.rpartition(".")[0]
        # A tied weight is skipped if any of its names (or the consuming module) matches.
        module = str(use.node.target) if use.kind == "module" else None
        pattern = skip_pattern(skip, [use.param_name, *aliases[id(use.param)]], module)
        if pattern is not None:
            skipped.append(SkippedOp(use.node.name, _describe(use.node), use.param_name,
                                     f"skipped by pattern {pattern!r}", warn=False))
            continue
        if use.param.dim() != 2:
            skipped.append(SkippedOp(use.node.name, _describe(use.node), use.param_name,
                                     f"weight has shape {tuple(use.param.shape)}, not 2-D"))
            continue
        if len(layouts[id(use.param)]) > 1:
            skipped.append(SkippedOp(use.node.name, _describe(use.node), use.param_name,
                                     "parameter is used both as an (out, in) and as an (in, out) matrix"))
            continue
        transposed = use.kind == "matmul_in_out"
        if id(use.param) not in plan:
            block = resolve_block(module_name, use.param.t() if transposed else use.param)
            plan[id(use.param)] = RewrittenWeight(
                param_name=use.param_name, module_name=module_name,
                smoother=f"{SMOOTHER_ROOT}.{use.param_name.replace('.', '_')}",
                shape=tuple(use.param.shape), block=block, aliases=aliases[id(use.param)],
                transposed=transposed,
            )
        kept.append(use)
    _warn_skipped([s for s in skipped if s.warn])
    if hasattr(gm, SMOOTHER_ROOT) and plan:
        raise ValueError(f"the model already has an attribute {SMOOTHER_ROOT!r}; rename it to prepare")

    # ---- edit
    graph = gm.graph
    smoothed: dict[int, Node] = {}
    anchor = _insertion_point(gm)
    for index, (pid, rec) in enumerate(plan.items()):
        first = next(u for u in kept if id(u.param) == pid)
        param = first.param
        gm.add_submodule(rec.smoother, make_smoother(rec.param_name, param.t() if rec.transposed else param,
                                                     rec.block, index))
        with graph.inserting_before(anchor):
            w = graph.get_attr(rec.param_name)
            if rec.transposed:
                # smooth param.t(), which is (out, in), and hand its transpose back to the matmul
                t = aten.t.default if isinstance(first.node.target, torch._ops.OpOverload) else torch.t
                s = graph.call_module(rec.smoother, (graph.call_function(t, (w,)),))
                smoothed[pid] = graph.call_function(t, (s,))
            else:
                smoothed[pid] = graph.call_module(rec.smoother, (w,))
    orphans: list[Node] = []
    for use in kept:
        new_w = smoothed[id(use.param)]
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
        plan[id(use.param)].consumers.append(node.name)
    for node in dict.fromkeys(orphans):  # ordered, deduplicated: transposes before their inputs
        if not node._erased and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return RewriteResult(list(plan.values()), skipped)


def _warn_skipped(skipped: list[SkippedOp]) -> None:
    """One warning naming every Linear-like op left alone by accident."""
    shown = skipped
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
