"""GPU: the compiled prepared model equals eager, and Inductor's Triton source holds our fused kernels."""
import copy
import os
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from lotion_fx import reference as R
from lotion_fx.backends import lowering

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_gpu_compiled_equals_eager_triton_fused() -> None:
    from test_lowering import AllMethodsFormats, _train

    eager = AllMethodsFormats().cuda()
    comp = copy.deepcopy(eager)
    torch.manual_seed(1)
    x = torch.randn(16, 64, device="cuda")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(comp, backend=counter)
    ref = _train(eager, eager, x, 3)
    with lowering.exact_division():  # compiled inside: IEEE division, so RTN ties match eager
        (first,), codes = run_and_get_code(lambda: _train(comp, compiled, x, 1))
    got = [first] + _train(comp, compiled, x, 2)
    assert counter.frame_count == 1
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=n)
    for (n, a), (_, b) in zip(eager.named_buffers(), comp.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=n)
    code = "\n".join(codes)
    if os.environ.get("OUT"):  # keep the generated Triton source for README.md
        with open(os.path.join(os.environ["OUT"], "triton_code.py"), "w") as f:
            f.write(code)
    assert "torch.ops.lotion_fx" not in code
    kernels = re.findall(r"^def (triton_\w+)\(", code, flags=re.M)
    smoothing = [k for k in kernels if "amax" in k or "abs" in k]
    assert smoothing and len(smoothing) <= 12 + 3, kernels
    assert "@triton.jit" in code


def test_gpu_sr_same_bits_as_cpu() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    f = torch.compile(lambda w, s: torch.ops.lotion_fx.sr_quantize(w, s, "int4", 32, 11))
    with lowering.exact_division():  # compiled inside: IEEE division, as eager
        cuda = f(w.cuda(), torch.tensor(4, device="cuda")).cpu()
    ref = R.fake_quantize(w, "int4", 32, rounding="stochastic", seed=11, step=4)
    # Same noise bits and the same rounding decisions: any flipped decision moves a value by a
    # whole grid step (>= 1/14 of the block absmax). Inductor may compute amax / 7 as
    # amax * (1 / 7), so the scale itself can differ from eager in its last bit.
    torch.testing.assert_close(cuda, ref, rtol=1e-6, atol=0)
