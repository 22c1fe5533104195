"""Triton weight-only matmuls (backends/triton_matmul.py) against fake_quantize and float64 math.

On CPU the kernels run under TRITON_INTERPRET=1 (CI sets it); without it the CPU tests skip.
The gpu-marked tests run them compiled, at realistic sizes, and under torch.compile + CUDA graphs.
The M <= 16 tests run both GEMV switches (T.GEMV_KERNEL "v3": _gemv3_kernel for every M <= 16; "v2": the
tl.sum GEMV for M <= 4, the tl.dot GEMV above) and count v3's launches. Under the interpreter v3's inline asm
(int4 / int8 decode, bf16 rounding ROUND 1 / 2) runs as the equivalent plain Triton, so only the gpu tests
check the asm itself.
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


def _use_kernel(monkeypatch, kernel: str) -> list:
    """Set the GEMV switch; the returned list gets one entry per launch v3 takes (not declined): "v3" for
    _gemv3_kernel, "v3dot" for _gemv3dot_kernel (told apart by the launch-config function each one calls)."""
    monkeypatch.setattr(T, "GEMV_KERNEL", kernel)
    launched, chosen, gemv3 = [], [], T._gemv3
    for name, fn in [("v3", T._gemv3_config), ("v3dot", T._gemv3dot_config)]:
        monkeypatch.setattr(T, fn.__name__, lambda *a, _fn=fn, _name=name: chosen.append(_name) or _fn(*a))

    def counted(*args, **kwargs):
        chosen.clear()
        out = gemv3(*args, **kwargs)
        if out is not None:
            launched.append(chosen[-1])
        return out

    monkeypatch.setattr(T, "_gemv3", counted)
    return launched


def _v3_kernel(kernel: str, m: int, dtype: torch.dtype) -> list:
    """What _use_kernel records for one call of M rows under the switch `kernel` (v2: nothing)."""
    if kernel == "v2" or m > T.GEMV3_MAX_M:
        return []
    return ["v3dot" if kernel == "v3dot" and m > T.SUM_MAX_M and dtype != torch.float32 else "v3"]


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


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (M, GEMV kernel, dtype): M <= 16 runs the switch's GEMV kernel (v3 at M = 5, 8, 16: its M > 4 launch
# configs; v3dot: _gemv3dot_kernel there, v3 for fp32), M = 17 dequantizes, then F.linear (v2 is just the
# switch's value there); fp16 on the v3 GEMV and once on v2 (the interpreter is slow)
BIT_EXACT = [(1, "v2", F32), (1, "v2", BF16), (1, "v2", F16), (3, "v2", F32), (3, "v2", BF16), (17, "v2", F32),
             (17, "v2", BF16), (1, "v3", F32), (1, "v3", BF16), (1, "v3", F16), (3, "v3", F32), (3, "v3", BF16),
             (3, "v3", F16), (5, "v3", BF16), (8, "v3", F32), (8, "v3", BF16), (8, "v3", F16), (16, "v3", BF16),
             (5, "v3dot", BF16), (8, "v3dot", F16), (16, "v3dot", BF16)]
# x's leading shape (M = its product): v2 runs the M <= 4 tl.sum GEMV at (2, 2), the tl.dot GEMV at (2, 3) and
# the dequant path at (2, 17); v3 runs M = 2, 4 and its M > 4 configs at M = 5, 8, 16; v3dot its tl.dot kernel
# at M = 5, 8, 16 and v3 for fp32
FLOAT64 = [((2, 2), "v2", BF16), ((2, 3), "v2", F32), ((2, 3), "v2", BF16), ((2, 17), "v2", F32),
           ((2, 17), "v2", BF16), ((2, 1), "v3", F32), ((2, 2), "v3", BF16), ((2, 1), "v3", F16),
           ((1, 5), "v3", BF16), ((2, 4), "v3", F32), ((2, 4), "v3", BF16), ((2, 8), "v3", BF16),
           ((1, 5), "v3dot", F16), ((2, 4), "v3dot", BF16), ((2, 8), "v3dot", BF16), ((2, 4), "v3dot", F32)]


@interpret
@pytest.mark.parametrize("fmt,block,k", CASES)
@pytest.mark.parametrize("m,kernel,dtype", BIT_EXACT)
def test_kernel_dequantization_is_bit_exact(fmt: str, block, k: int, dtype: torch.dtype, m: int, kernel: str,
                                            monkeypatch) -> None:
    """One-hot rows of x pick single weight columns: the output is the dequantized weight, exactly."""
    launched = _use_kernel(monkeypatch, kernel)
    w = _weight(N, k, dtype, _dev(), seed=m)
    t = _packed(w, fmt, block)
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(m))[:m].to(w.device)
    x = F.one_hot(cols, k).to(dtype)
    got = _run(x, t)  # M <= 16: the GEMV kernel (split K here); M = 17: dequantize, then F.linear
    assert torch.equal(got, lotion_fx.fake_quantize(w, fmt, block)[:, cols].T)
    assert launched == _v3_kernel(kernel, m, dtype)  # v3 takes every case here


@interpret
@pytest.mark.parametrize("fmt,block,k", CASES)
@pytest.mark.parametrize("lead,kernel,dtype", FLOAT64)
def test_kernel_matches_float64_on_noncontiguous_3d(fmt: str, block, k: int, dtype: torch.dtype, lead: tuple,
                                                    kernel: str, monkeypatch) -> None:
    launched = _use_kernel(monkeypatch, kernel)
    m = lead[0] * lead[1]
    torch.manual_seed(m)
    w = _weight(N, k, dtype, _dev())
    t = _packed(w, fmt, block)
    x = torch.randn(k, *lead, device=w.device).to(dtype).permute(1, 2, 0)  # (*lead, k), not contiguous
    bias = torch.randn(N, device=w.device).to(dtype)
    assert not x.is_contiguous()
    got = _run(x, t, bias)
    want = _f64_linear(x, lotion_fx.fake_quantize(w, fmt, block), bias)
    assert got.shape == (*lead, N) and got.dtype == dtype
    scale = want.abs().amax()
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # output rounding, fp32 sums
    assert (got.double() - want).abs().max() <= tol * scale
    ref = T.linear_reference(x, t.qdata, t.scale, t.tensor_scale, bias, fmt)  # the CPU path, same bound
    assert (ref.double() - want).abs().max() <= tol * scale
    assert launched == _v3_kernel(kernel, m, dtype)


@interpret
@pytest.mark.parametrize("fmt,block,k", [CASES[0], CASES[1], CASES[2], CASES[5], CASES[6]])
@pytest.mark.parametrize("path", ["dot_gemv", "gemm"])
def test_dot_gemv_and_dequant_paths(fmt: str, block, k: int, path: str, monkeypatch) -> None:
    """M = 8 (tl.dot GEMV, split K: v2's, and v3's fallback) and the tiled tl.dot GEMM at M = 18 (by default
    M > 16 dequantizes, then F.linear: the M = 17 cases above), one-hot and float64."""
    launched = _use_kernel(monkeypatch, "v2")
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
    assert not launched


# (BLOCK_N, BLOCK_W, R, num_warps, split_k, ROUND), (M one-hot, M float64), switch: R = 4 (cut to 2 by nvfp4's
# 2-word scale groups) and Veltkamp rounding, several tiles; R = 1 and three K splits with Triton's cast; one tile
# over the row, mixed rounding (under the interpreter ROUND 1 is Triton's cast: ROUND 1 / 3's cvt asm runs in the
# gpu tests). Then M > 4: R = 1 with a partial row block (N = 40) and Veltkamp; R = 2 and three K splits; R = 4,
# one tile over the row, mixed rounding. v3dot (R and ROUND unused): 32 rows (a partial row block), 4-word tiles;
# three K splits; 64 rows (one block, rows past N), one tile over the row.
V3_CONFIGS = [((8, 4, 4, 1, 1, 2), (4, 2), "v3"), ((8, 4, 1, 1, 3, 0), (4, 2), "v3"),
              ((16, 64, 2, 1, 1, 3), (4, 2), "v3"), ((16, 8, 1, 1, 1, 2), (8, 5), "v3"),
              ((8, 8, 2, 1, 3, 0), (16, 8), "v3"), ((8, 64, 4, 1, 1, 3), (5, 16), "v3"),
              ((32, 4, 1, 4, 1, 1), (8, 5), "v3dot"), ((16, 8, 1, 4, 3, 1), (16, 8), "v3dot"),
              ((64, 64, 1, 4, 1, 1), (5, 16), "v3dot")]


@interpret
@pytest.mark.parametrize("fmt,block,k", [CASES[0], CASES[3], CASES[6]])
@pytest.mark.parametrize("cfg,rows,kernel", V3_CONFIGS)
def test_v3_launch_configs(fmt: str, block, k: int, cfg, rows, kernel: str, monkeypatch) -> None:
    """v3 (and v3dot) under other launch configurations than its default: one-hot rows (bf16) and float64 (with
    bias), at M <= 4 and M > 4, full and partial tiles (EVEN or not), split K, every rounding variant."""
    launched = _use_kernel(monkeypatch, kernel)
    monkeypatch.setattr(T, "GEMV3_OVERRIDE", cfg)
    w = _weight(N, k, torch.bfloat16, _dev(), seed=4)
    t = _packed(w, fmt, block)
    wq = lotion_fx.fake_quantize(w, fmt, block)
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(4))[: rows[0]].to(w.device)
    assert torch.equal(_run(F.one_hot(cols, k).to(torch.bfloat16), t), wq[:, cols].T)
    x = torch.randn(rows[1], k, device=w.device).to(torch.bfloat16)
    bias = torch.randn(N, device=w.device).to(torch.bfloat16)
    want = _f64_linear(x, wq, bias)
    assert (_run(x, t, bias).double() - want).abs().max() <= 8e-3 * want.abs().amax()
    assert launched == _v3_kernel(kernel, rows[0], torch.bfloat16) + _v3_kernel(kernel, rows[1], torch.bfloat16)


@interpret
@pytest.mark.parametrize("fmt,block,k", CASES)
@pytest.mark.parametrize("m,dtype", [(1, BF16), (3, F32), (8, BF16), (2, F16)])
def test_v3_factored_scale(fmt: str, block, k: int, m: int, dtype: torch.dtype, monkeypatch) -> None:
    """GEMV3_ROUND = 4 sums codes x x per word and applies the block scale once: one-hot rows still give the
    dequantized weight exactly (one product, rounded once to x's dtype), random rows the float64 product of the
    dequantized weight within the output rounding (its weights are s q exactly, not rounded to x's dtype)."""
    launched = _use_kernel(monkeypatch, "v3")
    monkeypatch.setattr(T, "GEMV3_ROUND", 4)
    w = _weight(N, k, dtype, _dev(), seed=m)
    t = _packed(w, fmt, block)
    wq = lotion_fx.fake_quantize(w, fmt, block)
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(m))[:m].to(w.device)
    assert torch.equal(_run(F.one_hot(cols, k).to(dtype), t), wq[:, cols].T)
    x = torch.randn(k, m, device=w.device).to(dtype).T  # not contiguous
    bias = torch.randn(N, device=w.device).to(dtype)
    want = _f64_linear(x, wq, bias)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert (_run(x, t, bias).double() - want).abs().max() <= tol * want.abs().amax()
    assert launched == ["v3", "v3"]


@interpret
@pytest.mark.parametrize("fmt,block,k", [("int4", "tensor", 36), ("int8", 6, 48)])
@pytest.mark.parametrize("m", [3, 8])
def test_v3_falls_back_to_v2(fmt: str, block, k: int, m: int, monkeypatch) -> None:
    """Rows that are not whole int32 words (int4, K = 36: 18 bytes) and scale groups that split a word (int8,
    6 columns): v3 declines and v2's kernel (M = 3: tl.sum GEMV, M = 8: tl.dot GEMV) computes the result."""
    launched = _use_kernel(monkeypatch, "v3")
    w = _weight(N, k, torch.bfloat16, _dev())
    t = _packed(w, fmt, block)
    x = torch.randn(m, k, device=w.device).to(torch.bfloat16)
    s = t.scale
    stride_sn = s.stride(0) if s.shape[0] == N else 0
    assert T._gemv3(x, t.qdata, s, t.tensor_scale.reshape(1).float(), None, fmt, s.shape[1], stride_sn, "v3") is None
    cols = torch.randperm(k, generator=torch.Generator().manual_seed(0))[:m].to(w.device)
    wq = lotion_fx.fake_quantize(w, fmt, block)
    assert torch.equal(_run(F.one_hot(cols, k).to(torch.bfloat16), t), wq[:, cols].T)
    want = _f64_linear(x, wq)
    assert (_run(x, t).double() - want).abs().max() <= 8e-3 * want.abs().amax()
    assert not launched


@pytest.mark.parametrize("exponent", [1, 127, 237])
def test_veltkamp_split_rounds_like_bf16_cast(exponent: int) -> None:
    """v3's ROUND = 2: g = u * 2^16 + u; g + (u - g) is u rounded to bf16 (nearest, ties to even) for every
    fp32 u of the binade 2^(exponent - 127) (normal binades up to 2^110; 238 overflows 65537 u)."""
    bits = (exponent << 23) | torch.arange(1 << 23, dtype=torch.int32)
    u = bits.view(torch.float32)
    g = u * 65536.0 + u  # two roundings, the first exact: one rounding of 65537 u, like fma.rn
    assert torch.equal(g + (u - g), u.to(torch.bfloat16).float())
    assert torch.equal(-g + (-u + g), (-u).to(torch.bfloat16).float())


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
@pytest.mark.parametrize("m,kernel", [(1, "v2"), (3, "v2"), (8, "v2"), (512, "v2"), (1, "v3"), (3, "v3"),
                                      (8, "v3"), (8, "v3dot")])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1536, 8192)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_realistic_sizes(fmt: str, block, m: int, kernel: str, n: int, k: int, monkeypatch) -> None:
    launched = _use_kernel(monkeypatch, kernel)
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
    assert sorted(set(launched)) == _v3_kernel(kernel, m, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt,block", [("int8", "row"), ("int8", 32), ("int4", 32), ("int4", "tensor"), ("nvfp4", 16)])
@pytest.mark.parametrize("dtype,rnd", [(BF16, 0), (BF16, 1), (BF16, 2), (BF16, 3), (F16, 1), (F32, 1)])
def test_gpu_v3_rounding_variants_and_asm(fmt: str, block, dtype: torch.dtype, rnd: int, monkeypatch) -> None:
    """The compiled v3 (its inline-asm decode and roundings, which the interpreter replaces) is bit-exact:
    one-hot rows over many columns, M = 1 and 4, a partial last tile (K = 2080) and rows past N (N = 999)."""
    launched = _use_kernel(monkeypatch, "v3")
    monkeypatch.setattr(T, "GEMV3_ROUND", rnd)  # only bf16 has variants
    torch.manual_seed(0)
    n, k = 999, 2080
    w = _weight(n, k, dtype, "cuda")
    t = _packed(w, fmt, block)
    wq = lotion_fx.fake_quantize(w, fmt, block)
    for m in (1, 4):
        for cols in torch.randperm(k, device="cuda")[: 16 * m].reshape(-1, m):
            assert torch.equal(_run(F.one_hot(cols, k).to(dtype), t), wq[:, cols].T)
    x = torch.randn(4, k, device="cuda", dtype=dtype)
    want = _f64_linear(x, wq)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert (_run(x, t).double() - want).abs().max() <= tol * want.abs().amax()
    assert launched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt,block", [("int8", "row"), ("int4", 32), ("int4", "tensor"), ("nvfp4", 16)])
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("kernel", ["v3", "v3dot"])
def test_gpu_v3_many_rows(fmt: str, block, dtype: torch.dtype, kernel: str, monkeypatch) -> None:
    """The compiled v3 / v3dot at M = 5, 8, 16 (their M > 4 launch configs, default rounding): one-hot rows
    bit-exact, random rows within the fp32-accumulation bound, a partial last tile (K = 2080) and rows past N
    (N = 999)."""
    launched = _use_kernel(monkeypatch, kernel)
    torch.manual_seed(0)
    n, k = 999, 2080
    w = _weight(n, k, dtype, "cuda")
    t = _packed(w, fmt, block)
    wq = lotion_fx.fake_quantize(w, fmt, block)
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    for m in (5, 8, 16):
        for cols in torch.randperm(k, device="cuda")[: 4 * m].reshape(-1, m):
            assert torch.equal(_run(F.one_hot(cols, k).to(dtype), t), wq[:, cols].T)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        want = _f64_linear(x, wq)
        assert (_run(x, t).double() - want).abs().max() <= tol * want.abs().amax()
    assert launched == sum((5 * _v3_kernel(kernel, m, dtype) for m in (5, 8, 16)), [])


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
@pytest.mark.parametrize("kernel,m,freezing", [("v2", 2, False), ("v2", 2, True), ("v3", 2, False), ("v3", 2, True),
                                              ("v3", 8, False), ("v3dot", 8, False)])
def test_gpu_compile_cuda_graphs_no_graph_break(fmt: str, freezing: bool, kernel: str, m: int, monkeypatch) -> None:
    monkeypatch.setattr(T, "GEMV_KERNEL", kernel)  # M = 2: the M <= 4 GEMV; M = 8: v3's M > 4 path or v3dot
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 512, bias=True).to("cuda", torch.bfloat16)
    wq = lotion_fx.fake_quantize(lin.weight.detach(), fmt)
    lin.weight = torch.nn.Parameter(_packed(lin.weight.detach(), fmt, None), requires_grad=False)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    explain = torch._dynamo.explain(lin)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    step = torch.compile(lin, fullgraph=True, options={"triton.cudagraphs": True, "freezing": freezing})
    with torch.no_grad():
        for _ in range(3):
            got = step(x).clone()
    want = _f64_linear(x, wq, lin.bias)
    assert (got.double() - want).abs().max() <= 8e-3 * want.abs().amax()


@interpret
@pytest.mark.parametrize("fmt,n,m,expect", [("int8", 520, 8, "v3dot"), ("int8", 512, 8, "v3"), ("int4", 4104, 8, None),
                                            ("int4", 40, 8, "v3"), ("nvfp4", 40, 6, "v3"), ("int4", 40, 12, None),
                                            ("int4", 40, 3, "v3")])
def test_auto_picks_the_measured_kernel_per_shape(fmt: str, n: int, m: int, expect, monkeypatch) -> None:
    """The default GEMV_KERNEL "auto": M <= 4 v3; M <= 8 the H100's fastest at M = 8 by format and rows (int8:
    v3dot above 512 rows; int4: v2 above 4096 rows); M > 8 v2 (None: v3 declined). Results stay exact."""
    launched = _use_kernel(monkeypatch, "auto")
    w = _weight(n, 64, torch.bfloat16, _dev())
    t = _packed(w, fmt, None)
    x = torch.randn(m, 64, device=w.device).to(torch.bfloat16)
    wq = lotion_fx.fake_quantize(w, fmt)
    want = _f64_linear(x, wq)
    assert (_run(x, t).double() - want).abs().max() <= 8e-3 * want.abs().amax()
    assert launched == ([expect] if expect else [])
