"""The Inductor lowering: compiled prepared models equal eager ones, with the ops fused, not extern.

One compiled graph covers every method and format (a container of twelve prepared one-layer
nets), so the whole check costs a single CPU Inductor compile.
"""
import copy
import re

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

import lotion_fx
from lotion_fx.backends import lowering

FORMATS = ("int8", "int4", "nvfp4", "mxfp4")


METHODS = ("lotion", "lotion_sampled", "qat")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class AllMethodsFormats(nn.Module):
    """One prepared net per (method, format), summed: 12 smoothing nodes in one graph. lotion uses
    the `ema` curvature, whose update is an in-place mutation inside the compiled backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.nets = nn.ModuleList(
            lotion_fx.prepare(Net(), lotion_fx.LotionConfig(method=m, format=f, block_size=16, seed=3,
                                                            curvature="ema", curvature_scale=100.0))
            for m in METHODS
            for f in FORMATS
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(net(x) for net in self.nets)


def _train(model: nn.Module, fn, x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    outs = []
    for _ in range(steps):
        out = fn(x)
        out.square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.5 * p.grad)
                p.grad = None
        outs.append(out.detach())
    return outs


def test_private_apis_pinned() -> None:
    assert all(lowering.private_apis().values()), lowering.private_apis()
    assert lowering.mode() == "inductor-decomp"
    from torch._inductor.decomposition import select_decomp_table

    table = select_decomp_table()
    for name in ("rtn_quantize", "rtn_ste_backward", "sr_quantize", "lotion_smooth"):
        assert getattr(torch.ops.lotion_fx, name).default in table
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "lotion_fx::lotion_backward", torch._C.DispatchKey.CompositeImplicitAutograd
    )


def test_import_changes_no_global_inductor_setting() -> None:
    """Importing lotion_fx must not change how unrelated models compile; exact_division is opt-in."""
    from torch._inductor import config as C

    key = lowering._division_key()
    assert key is not None
    get = lambda: C.eager_numerics.division_rounding if "." in key else getattr(C, key)  # noqa: E731
    assert get() is False
    with lowering.exact_division():
        assert get() is True
    assert get() is False


def test_compiled_equals_eager_fused_no_recompile() -> None:
    eager = AllMethodsFormats()
    comp = copy.deepcopy(eager)
    torch.manual_seed(1)
    x = torch.randn(16, 64)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(comp, backend=counter)
    ref = _train(eager, eager, x, 3)
    (first,), codes = run_and_get_code(lambda: _train(comp, compiled, x, 1))
    got = [first] + _train(comp, compiled, x, 2)

    # no graph break, no recompile across steps
    assert counter.frame_count == 1, counter.frame_count
    # forward outputs, parameters (so gradients) and curvature / noise buffers
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    for (n, a), (_, b) in zip(eager.named_buffers(), comp.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)

    code = "\n".join(codes)
    assert "torch.ops.lotion_fx" not in code, "an op of ours fell back to an extern call"
    # Inductor generated the smoothing math itself: fused kernels with the block absmax in them.
    fused = re.findall(r"^(cpp_fused_\w+|triton_\w+) = async_compile", code, flags=re.M)
    smoothing = [k for k in fused if "amax" in k or "abs" in k]
    assert smoothing, fused
    # at most one kernel per smoothing node (Inductor may also fuse nodes horizontally), plus
    # one per-tensor amax for each nvfp4 node (its E4M3 scales sit under a tensor scale).
    assert len(smoothing) <= 12 + 3, smoothing


def test_sr_compiled_reproducible_from_seed() -> None:
    """Stochastic rounding under compile: same bits as the eager reference, and seed-keyed."""
    from lotion_fx import reference as R

    torch.manual_seed(0)
    w = torch.randn(32, 64)
    step = torch.tensor(5)
    f = torch.compile(lambda w, s, seed: torch.ops.lotion_fx.sr_quantize(w, s, "nvfp4", 16, seed))
    a = f(w, step, 7)
    ref = R.fake_quantize(w, "nvfp4", 16, rounding="stochastic", seed=7, step=5)
    assert torch.equal(a, ref)
    assert torch.equal(f(w, step, 7), a)
    assert not torch.equal(f(w, step + 1, 7), a)
