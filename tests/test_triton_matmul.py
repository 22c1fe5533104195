"""Triton weight-only matmuls (backends/triton_matmul.py) against fake_quantize and float64 math.

On CPU the kernels run under TRITON_INTERPRET=1 (CI sets it); without it the CPU tests skip.
The gpu-marked tests run them compiled, at realistic sizes, and under torch.compile + CUDA graphs.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import lotion_fx
from lotion_fx.backends import torchao_export as X
from lotion_fx.backends import triton_matmul as T

# (format, block spec, in_features): odd numbers of blocks everywhere, N = 40 is no tile multiple.
CASES = [("int8", "row", 72), ("int8", 16, 48), ("int4", 32, 96), ("int4", 64, 192), ("int4", 128, 384),
         ("int4", "tensor", 64), ("nvfp4", 16, 80)]
N = 40

interpret = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels on CPU need TRITON_INTERPRET=1",
)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _weight(n: int, k: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    w[1, :16] = 0  # an all-zero block stays zero
    return w.to(device, dtype)


def _packed(w: torch.Tensor, fmt: str, block) -> X.LotionPackedTensor:
    b = lotion_fx.reference.resolve_block(block, fmt, w.shape[1])
    return X.to_torchao(w, fmt, b, X.PACKED)


def _run(x: torch.Tensor, t: X.LotionPackedTensor, bias=None) -> torch.Tensor:
    return T.weight_only_linear(x, t.qdata, t.scale, t.tensor_scale, bias, t.fmt)


def _f64_linear(x: torch.Tensor, wq: torch.Tensor, bias=None) -> torch.Tensor:
    out = x.double() @ wq.double().T
    return out + bias.double() if bias is not None else out


def _dev() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("fmt,block,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_dequantize_is_fake_quantize(fmt: str, block, k: int, dtype: torch.dtype) -> None:
    w = _weight(N, k, dtype, "cpu")
    t = _packed(w, fmt, block)
    assert torch.equal(T.dequantize_reference(t.qdata, t.scale, t.tensor_scale, fmt, dtype),
                       lotion_fx.fake_quantize(w, fmt, block))
    assert torch.equal(T.unpack_codes(t.qdata, fmt), lotion_fx.reference.quantize(w, fmt, block)[0].float())
    bits = {"int8": 8, "int4": 4, "nvfp4": 4}[fmt]
    assert t.qdata.numel() * t.qdata.element_size() == N * k * bits // 8


@interpret
@pytest.mark.parametrize("fmt,block,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernel_dequantization_is_bit_exact(fmt: str, block, k: int, dtype: torch.dtype, m: int) -> None:
    """One-hot rows of x pick single weight columns: the output is the dequantized weight, exactly."""
    w = _weight(N, k, dtype, _dev(), seed=m)
    t = _packed(w, fmt, block)
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(m))[:m].to(w.device)
    x = F.one_hot(cols, k).to(dtype)
    got = _run(x, t)  # M <= 4: tl.sum GEMV (split K here); M = 17: dequantize, then F.linear
    assert torch.equal(got, lotion_fx.fake_quantize(w, fmt, block)[:, cols].T)


@interpret
@pytest.mark.parametrize("fmt,block,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 17])
def test_kernel_matches_float64_on_noncontiguous_3d(fmt: str, block, k: int, dtype: torch.dtype, m: int) -> None:
    torch.manual_seed(m)
    w = _weight(N, k, dtype, _dev())
    t = _packed(w, fmt, block)
    x = torch.randn(k, 2, m, device=w.device).to(dtype).permute(1, 2, 0)  # (2, m, k), not contiguous
    bias = torch.randn(N, device=w.device).to(dtype)
    assert not x.is_contiguous()
    got = _run(x, t, bias)
    want = _f64_linear(x, lotion_fx.fake_quantize(w, fmt, block), bias)
    assert got.shape == (2, m, N) and got.dtype == dtype
    scale = want.abs().amax()
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # output rounding to bf16, fp32 accumulation
    assert (got.double() - want).abs().max() <= tol * scale
    ref = T.linear_reference(x, t.qdata, t.scale, t.tensor_scale, bias, fmt)  # the CPU path, same bound
    assert (ref.double() - want).abs().max() <= tol * scale


@interpret
@pytest.mark.parametrize("fmt,block,k", [CASES[0], CASES[1], CASES[2], CASES[5], CASES[6]])
@pytest.mark.parametrize("path", ["dot_gemv", "gemm"])
def test_dot_gemv_and_dequant_paths(fmt: str, block, k: int, path: str, monkeypatch) -> None:
    """M = 8 (tl.dot GEMV, split K) and the tiled tl.dot GEMM at M = 18 (by default M > 16 dequantizes,
    then F.linear: the M = 17 cases above), one-hot and float64."""
    m = 8 if path == "dot_gemv" else 18
    if path == "gemm":
        monkeypatch.setattr(T, "DEQUANT_MIN_M", 1 << 30)
    w = _weight(N, k, torch.bfloat16, _dev(), seed=m)
    t = _packed(w, fmt, block)
    wq = lotion_fx.fake_quantize(w, fmt, block)
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(m))[:m].to(w.device)
    assert torch.equal(_run(F.one_hot(cols, k).to(torch.bfloat16), t), wq[:, cols].T)
    x = torch.randn(m, k, device=w.device).to(torch.bfloat16)
    bias = torch.randn(N, device=w.device).to(torch.bfloat16)
    want = _f64_linear(x, wq, bias)
    assert (_run(x, t, bias).double() - want).abs().max() <= 8e-3 * want.abs().amax()


def test_fake_impl_and_bad_input() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = _weight(N, 64, torch.bfloat16, "cpu")
    t = _packed(w, "int4", 32)
    with FakeTensorMode():
        x = torch.empty(2, 5, 64, dtype=torch.bfloat16)
        q, s, ts = (torch.empty(v.shape, dtype=v.dtype) for v in (t.qdata, t.scale, t.tensor_scale))
        out = torch.ops.lotion_fx.weight_only_linear(x, q, s, ts, None, "int4")
    assert out.shape == (2, 5, N) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="input has 48 features but the weight has in_features 64"):
        _run(torch.zeros(1, 48, dtype=torch.bfloat16), t)
    with pytest.raises(ValueError, match="unknown packed format 'mxfp4'"):
        T.weight_only_linear(torch.zeros(1, 64), t.qdata, t.scale, t.tensor_scale, None, "mxfp4")


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("fmt,block", [("int8", "row"), ("int4", 32), ("int4", 128), ("nvfp4", 16)])
@pytest.mark.parametrize("m", [1, 3, 8, 512])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1536, 8192)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_realistic_sizes(fmt: str, block, m: int, n: int, k: int) -> None:
    torch.manual_seed(0)
    w = _weight(n, k, torch.bfloat16, "cuda")
    t = _packed(w, fmt, block)
    wq = lotion_fx.fake_quantize(w, fmt, block)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    got = F.linear(x, t)  # the subclass dispatches to the Triton op on CUDA
    want = _f64_linear(x, wq)
    assert (got.double() - want).abs().max() <= 8e-3 * want.abs().amax()
    cols = torch.randperm(k, device="cuda")[:m]
    assert torch.equal(_run(F.one_hot(cols, k).to(torch.bfloat16), t), wq[:, cols].T)


@pytest.mark.parametrize("fmt", ["int8", "int4", "nvfp4"])
def test_compiled_cpu_linear_equals_dequantized(fmt: str) -> None:
    """torch.compile of a packed Linear on CPU (the dequantize path) traces and computes F.linear with
    the fake-quantized weight (a module-level lookup table once broke nvfp4's fake tensors)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24, bias=True)
    wq = lotion_fx.fake_quantize(lin.weight.detach(), fmt)
    lin.weight = torch.nn.Parameter(_packed(lin.weight.detach(), fmt, None), requires_grad=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        got = torch.compile(lin, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, F.linear(x, wq, lin.bias))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int8", "int4", "nvfp4"])
@pytest.mark.parametrize("freezing", [False, True])
def test_gpu_compile_cuda_graphs_no_graph_break(fmt: str, freezing: bool) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 512, bias=True).to("cuda", torch.bfloat16)
    wq = lotion_fx.fake_quantize(lin.weight.detach(), fmt)
    lin.weight = torch.nn.Parameter(_packed(lin.weight.detach(), fmt, None), requires_grad=False)
    x = torch.randn(2, 1024, device="cuda", dtype=torch.bfloat16)
    explain = torch._dynamo.explain(lin)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    step = torch.compile(lin, fullgraph=True, options={"triton.cudagraphs": True, "freezing": freezing})
    with torch.no_grad():
        for _ in range(3):
            got = step(x).clone()
    want = _f64_linear(x, wq, lin.bias)
    assert (got.double() - want).abs().max() <= 8e-3 * want.abs().amax()
