"""The Triton RTN fake-quantization kernel (backends/triton_fake_quant.py) against reference.fake_quantize, bit
for bit (signs of zeros included).

On CPU the kernel runs under TRITON_INTERPRET=1 (CI sets it); without it the CPU kernel tests skip (as in
test_triton_matmul.py: the variable must be set before anything imports triton, which a test module cannot
ensure). With CUDA the same tests run the compiled kernel; the gpu-marked tests add realistic sizes and
torch.compile with Inductor.
"""

from __future__ import annotations

import os

import pytest
import torch

import lotion_fx
from lotion_fx import reference as R
from lotion_fx.backends import triton_fake_quant as Q

interpret = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton kernels on CPU need TRITON_INTERPRET=1",
)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
BLOCKS = [("int4", 16), ("int4", 32), ("int4", 64), ("int4", 128), ("int8", 32), ("int8", 128), ("nvfp4", 16)]
# random exponents: across the whole range for fp32 / bf16 (subnormals included), fp16's is 2^-24 .. 2^15
EXPONENTS = {F32: (-140, 40), BF16: (-140, 40), F16: (-24, 12)}
E2M1_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # midpoints of the E2M1 grid


def _dev() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _assert_bit_exact(w: torch.Tensor, fmt: str, block: int) -> None:
    got = torch.ops.lotion_fx.rtn_quantize_triton(w, fmt, block)
    want = lotion_fx.fake_quantize(w, fmt, block, rounding="nearest")
    assert got.shape == want.shape and got.dtype == want.dtype == w.dtype
    bad = _bits(got) != _bits(want)
    assert not bad.any(), f"{int(bad.sum())} of {w.numel()} differ, e.g. w={w[bad][:4]} got={got[bad][:4]} " \
        f"want={want[bad][:4]}"


def _wide_weight(shape: tuple, block: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """randn * 2^(random exponent) with special blocks planted: all zeros, all -0.0, scattered -0.0, the absmax
    at both signs, and (fp32 / bf16) a block of subnormals."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = EXPONENTS[dtype]
    w = torch.randn(shape, generator=g) * torch.exp2(torch.randint(lo, hi, shape, generator=g).float())
    w2 = w.view(-1, shape[-1])
    b0, b1 = slice(0, block), slice(block, 2 * block)
    w2[1, b0] = 0.0
    w2[1, b1] = -0.0
    w2[2, 0:block:3] = -0.0
    top = 2 * w2[3, b0].abs().max()
    w2[3, 0], w2[3, block - 1] = top, -top
    if dtype != F16:
        w2[0, b1] = torch.randn(block, generator=g) * 2.0**-133  # subnormal in fp32 and bf16
    return w.to(_dev(), dtype)


@interpret
@pytest.mark.parametrize("fmt,block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["5xK", "3x7xK"])
def test_kernel_is_bit_exact_on_wide_range(fmt: str, block: int, dtype: torch.dtype, shape: str) -> None:
    """Odd numbers of rows and of blocks (partial row and column tiles), 2-D and a non-contiguous 3-D view."""
    if shape == "5xK":
        w = _wide_weight((5, 3 * block), block, dtype, seed=block)
    else:  # (3, 7, 5 blocks): the transpose of a contiguous (7, 3, K), so the kernel gets a copy
        w = _wide_weight((7, 3, 5 * block), block, dtype, seed=block + 1).transpose(0, 1)
        assert not w.is_contiguous() and Q.supports(w, fmt, block)
    _assert_bit_exact(w, fmt, block)


def _tie_weight(fmt: str, block: int, dtype: torch.dtype) -> torch.Tensor:
    """(5, 3 blocks) whose scaled values x are all exact grid midpoints but one per block: the absmax.

    int: a block holds +-q 2^j and +-(k + 1/2) 2^j, so x = (w / amax) * q = k + 1/2 exactly. nvfp4: w[0, 0] =
    2688 = 448 * 6 makes the tensor scale 1, a block of absmax 6 e (e an E4M3 value) has the scale e, and
    x = w / e is an E2M1 midpoint.
    """
    rows, k = 5, 3 * block
    w = torch.empty(rows, k // block, block, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0]).repeat(block)[: block - 1]
    if fmt == "nvfp4":
        ties = torch.tensor(E2M1_TIES, dtype=torch.float64)
        scales = [448.0, 1.0, 2.0, 0.5, 2.0**-6, 2.0**-9, 3 * 2.0**-9, 1.25, 13.0, 240.0, 0.75, 96.0, 5.0, 0.125, 3.5]
        amax = 6.0
    else:
        q = int(Q.QMAX[fmt])
        ties = torch.arange(q, dtype=torch.float64) + 0.5
        scales = [2.0**j for j in (0, -3, 5, 1, -7, 2, 9, -1, 3, -12, 4, 0, -2, 6, 1)]
        amax = float(q)
    for i, s in enumerate(scales):
        r, c = divmod(i, k // block)
        vals = ties[(torch.arange(block - 1) + 3 * i) % len(ties)] * signs
        w[r, c] = torch.cat([torch.tensor([amax if i % 2 else -amax]), vals]) * s
    return w.reshape(rows, k).to(_dev(), dtype)


@interpret
@pytest.mark.parametrize("fmt,block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_is_bit_exact_on_exact_ties(fmt: str, block: int, dtype: torch.dtype) -> None:
    """Ties round to the even grid index in the reference; the kernel's rint must agree at every one."""
    w = _tie_weight(fmt, block, dtype)
    x, _ = R._blocked_scaled(w, lotion_fx.formats.get_format(fmt), block)
    step = torch.where(x.abs() >= 4, 2.0, torch.where(x.abs() >= 2, 1.0, 0.5)) if fmt == "nvfp4" else 1.0
    frac = x.abs() / step - torch.floor(x.abs() / step)
    assert int((frac == 0.5).sum()) == 15 * (block - 1)  # every element but the absmax is an exact tie
    _assert_bit_exact(w, fmt, block)


# nvfp4 weights whose code * scale (fp32) lies exactly halfway between two neighbours in the output dtype: the
# tensor absmax, then per block (its absmax, elements); the first block's ties have an even lower neighbour (RNE
# rounds down), the second's an odd one (RNE rounds up), so truncation, half-up and half-down all fail somewhere.
OUTPUT_TIES = [(BF16, 588.0, [(2.125, [0.53125, 1.0625]), (2.46875, [0.6171875, 1.234375])]),
               (F16, 4116.0, [(17.21875, [4.3046875, 8.609375])]), (F16, 3948.0, [(16.53125, [4.1328125, 8.265625])])]


@interpret
@pytest.mark.parametrize("dtype,tamax,blocks", OUTPUT_TIES)
def test_output_cast_rounds_ties_to_even(dtype: torch.dtype, tamax: float, blocks: list) -> None:
    """The final fp32 -> bf16 / fp16 cast at exact ties (the interpreter's bf16 cast is replaced by bit rounding);
    each element's scaled value is the block absmax (code 6) or a grid point below it (codes 1.5, 3)."""
    w = torch.zeros(len(blocks) + 1, 32)
    w[0, 0] = tamax
    for i, (amax, vals) in enumerate(blocks, start=1):
        w[i, 16:21] = torch.tensor([amax, vals[0], -vals[0], vals[1], -vals[1]])
    w = w.to(_dev(), dtype)
    q, s = R.quantize(w, "nvfp4", 16)
    pre = (q * s.repeat_interleave(16, dim=1)).float()[1:, 16:21]  # the reference's values before the cast
    drop = 16 if dtype == BF16 else 13
    assert ((_bits(pre) & ((1 << drop) - 1)) == 1 << (drop - 1)).all()
    _assert_bit_exact(w, "nvfp4", 16)


@interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's inf / inf under the interpreter
@pytest.mark.parametrize("fmt,block", [("int4", 32), ("int8", 128), ("nvfp4", 16)])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("with_inf", [False, True])
def test_non_finite_inputs_follow_the_reference(fmt: str, block: int, dtype: torch.dtype, with_inf: bool) -> None:
    """inf and NaN are outside the contract's bits (NaN payloads may differ) but not its values: NaN exactly where
    the reference has NaN (a NaN block absmax makes the reference use scale 1), the same bits elsewhere."""
    w = _wide_weight((5, 3 * block), block, dtype, seed=7)
    w[2, block + 1] = float("nan")
    if with_inf:
        w[0, 3], w[4, 2 * block] = float("inf"), -float("inf")
    step = torch.tensor(3, device=w.device)
    for got, want in [(torch.ops.lotion_fx.rtn_quantize_triton(w, fmt, block), lotion_fx.fake_quantize(w, fmt, block)),
                      (torch.ops.lotion_fx.sr_quantize_triton(w, step, fmt, block, 9),
                       lotion_fx.fake_quantize(w, fmt, block, rounding="stochastic", seed=9, step=step))]:
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(_bits(got)[~got.isnan()], _bits(want)[~want.isnan()])


# (step, seed): small ones, and a step beyond 32 bits with a seed beyond 31 (both hashed as uint32)
SR_KEYS = [(0, 1), (7, 0xDEADBEEF), (2**33 + 5, 2**31 + 3)]


def _assert_sr_bit_exact(w: torch.Tensor, fmt: str, block: int, step: int, seed: int) -> torch.Tensor:
    st = torch.tensor(step, dtype=torch.int64, device=w.device)
    got = torch.ops.lotion_fx.sr_quantize_triton(w, st, fmt, block, seed)
    want = lotion_fx.fake_quantize(w, fmt, block, rounding="stochastic", seed=seed, step=st)
    assert got.shape == want.shape and got.dtype == want.dtype == w.dtype
    bad = _bits(got) != _bits(want)
    assert not bad.any(), f"step {step}: {int(bad.sum())} of {w.numel()} differ, e.g. got={got[bad][:4]} " \
        f"want={want[bad][:4]}"
    return got


@interpret
@pytest.mark.parametrize("fmt,block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_is_bit_exact(fmt: str, block: int, dtype: torch.dtype) -> None:
    """lotion_sampled's forward (sr_quantize_triton): the reference's counter-based noise and rounding decisions
    bit for bit, on wide-range 2-D weights, a non-contiguous 3-D view and exact grid midpoints."""
    weights = [_wide_weight((5, 3 * block), block, dtype, seed=block),
               _wide_weight((7, 3, 5 * block), block, dtype, seed=block + 1).transpose(0, 1),
               _tie_weight(fmt, block, dtype)]
    for step, seed in SR_KEYS:
        for w in weights:
            _assert_sr_bit_exact(w, fmt, block, step, seed)


@interpret
@pytest.mark.parametrize("fmt,block", [("int4", 32), ("nvfp4", 16)])
def test_stochastic_rounding_is_unbiased_at_midpoints(fmt: str, block: int) -> None:
    """At exact grid midpoints each element rounds up with probability 1/2: over 48 steps the kernel's output
    averages to w (within 5 standard errors of half a grid step, for each of the ~500 elements), unlike RTN,
    and differs between steps."""
    w = _tie_weight(fmt, block, F32)
    outs = torch.stack([torch.ops.lotion_fx.sr_quantize_triton(w, torch.tensor(t, device=w.device), fmt, block, 5)
                        for t in range(48)])
    assert not torch.equal(outs[0], outs[1])
    x, s = R._blocked_scaled(w, lotion_fx.formats.get_format(fmt), block)
    mid = x.abs() < lotion_fx.formats.get_format(fmt).qmax  # all but each block's absmax
    half_step = (outs - w).abs().amax(0).reshape(x.shape)[mid]  # |SR(w) - w| is half a grid step here
    err = (outs.mean(0) - w).abs().reshape(x.shape)[mid]
    assert bool((err <= 5 * half_step / 48**0.5).all())
    assert float((err / half_step).mean()) < 0.25  # RTN's error would be exactly 1 (half a step) everywhere


def test_supports_and_refusals() -> None:
    dev = _dev()
    ok = torch.zeros(4, 64, device=dev, dtype=BF16)
    runs_here = dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    for fmt, block in [("int4", 8), ("int4", 64), ("int8", 32), ("nvfp4", 16)]:
        assert Q.supports(ok, fmt, block) == runs_here
    assert Q.supports(torch.zeros(2, 3, 256, device=dev), "int8", 256) == runs_here
    refused = [
        (ok, "int4", 4), (ok, "int4", 24), (ok, "int4", 512), (ok, "int4", True), (ok, "int4", "row"),
        (ok, "int4", 0), (ok, "nvfp4", 32), (ok, "mxfp4", 32), (ok, "fp8", 32),
        (torch.zeros(4, 48, device=dev), "int4", 32),  # block does not divide K
        (torch.zeros(64, device=dev), "int4", 32),  # 1-D
        (torch.zeros(0, 64, device=dev), "int4", 32),  # empty
        (torch.zeros(4, 64, device=dev, dtype=torch.float64), "int4", 32),
        (torch.zeros(4, 64, device=dev, dtype=torch.int32), "int4", 32),
        (torch.zeros(64, 4, device=dev).T, "int4", 32),  # last dim not contiguous
    ]
    if dev == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        refused.append((ok.cpu(), "int4", 32))
    for w, fmt, block in refused:
        assert not Q.supports(w, fmt, block), (w.shape, w.dtype, fmt, block)
        if type(block) is int:  # the op's schema takes an int block
            with pytest.raises(ValueError, match="rtn_quantize_triton takes"):
                torch.ops.lotion_fx.rtn_quantize_triton(w, fmt, block)


@interpret
def test_traced_without_graph_breaks_on_cpu() -> None:
    """Dynamo (fullgraph, fake tensors) and make_fx see one opaque op; its schema and fake kernel pass opcheck.
    Under the interpreter wrap_triton launches the kernel directly, so the AOT decomposition (aot_eager, Inductor)
    cannot trace into it on CPU: test_gpu_compile_inductor_cuda_graphs covers that on CUDA."""
    from torch.fx.experimental.proxy_tensor import make_fx

    w = _wide_weight((6, 64), 32, BF16, seed=0)
    fn = lambda v: torch.ops.lotion_fx.rtn_quantize_triton(v, "int4", 32)  # noqa: E731
    explain = torch._dynamo.explain(fn)(w)
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    torch._dynamo.reset()
    got = torch.compile(fn, backend="eager", fullgraph=True)(w)
    assert torch.equal(_bits(got), _bits(lotion_fx.fake_quantize(w, "int4", 32)))
    calls = [n.target for n in make_fx(fn)(w).graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.lotion_fx.rtn_quantize_triton.default]
    torch.library.opcheck(torch.ops.lotion_fx.rtn_quantize_triton.default, (w, "nvfp4", 16),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.lotion_fx.sr_quantize_triton.default, (w, torch.tensor(2), "int4", 32, 7),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with pytest.raises(ValueError, match="one-element int64 tensor"):
        torch.ops.lotion_fx.sr_quantize_triton(w, torch.tensor(2.0), "int4", 32, 7)


@interpret
def test_fake_tensor_shape_and_dtype() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(3, 5, 96, dtype=F16, device=_dev())
        out = torch.ops.lotion_fx.rtn_quantize_triton(w, "int4", 32)
    assert out.shape == (3, 5, 96) and out.dtype == F16


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("fmt,block", [("int4", 32), ("int4", 128), ("int8", 32), ("int8", 128), ("nvfp4", 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bit_exact_4096(fmt: str, block: int, dtype: torch.dtype) -> None:
    """The compiled kernel (libdevice rint, div.rn, cvt.rn) at 4096 x 4096 (EVEN tiles) and one odd shape."""
    for shape in [(4096, 4096), (4095, 3 * 1024 + 5 * block)]:
        g = torch.Generator(device="cuda").manual_seed(shape[0])
        lo, hi = EXPONENTS[dtype]
        w = torch.randn(shape, device="cuda", generator=g)
        w = (w * torch.exp2(torch.randint(lo, hi, shape, device="cuda", generator=g).float())).to(dtype)
        w[7, :block] = 0
        w[9, block: 2 * block] = -0.0
        _assert_bit_exact(w, fmt, block)
        _assert_bit_exact(_wide_weight((shape[0] // 64, 3 * block), block, dtype, seed=3), fmt, block)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt,block", [("int4", 32), ("nvfp4", 16)])
def test_gpu_compile_inductor_cuda_graphs(fmt: str, block: int) -> None:
    """Inductor inlines the op's body (nvfp4's tensor absmax becomes an Inductor reduction) and launches our kernel,
    without graph breaks, under CUDA graphs; bits unchanged."""
    from torch._inductor.utils import run_and_get_code

    w = _wide_weight((4096, 1024), block, BF16, seed=1)
    fn = lambda v: torch.ops.lotion_fx.rtn_quantize_triton(v, fmt, block) * 1  # noqa: E731
    torch._dynamo.reset()
    step = torch.compile(fn, fullgraph=True, options={"triton.cudagraphs": True})
    got, (code, *_) = run_and_get_code(step, w)
    assert "_rtn_kernel" in code
    want = lotion_fx.fake_quantize(w, fmt, block)
    for _ in range(3):
        got = step(w).clone()
        assert torch.equal(_bits(got), _bits(want))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt,block", [("int4", 32), ("int8", 128), ("nvfp4", 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_stochastic_bit_exact_and_compiled(fmt: str, block: int, dtype: torch.dtype) -> None:
    """sr_quantize_triton compiled for the GPU (uint32 hashing, floor, div.rn): the reference's bits at 4096^2
    and an odd shape, and the same under torch.compile with CUDA graphs as the step advances."""
    from torch._inductor.utils import run_and_get_code

    for shape in [(4096, 4096), (4095, 3 * 1024 + 5 * block)]:
        w = _wide_weight(shape, block, dtype, seed=shape[0])
        for step, seed in SR_KEYS:
            _assert_sr_bit_exact(w, fmt, block, step, seed)
    w = _wide_weight((4096, 1024), block, dtype, seed=2)
    for seed in (11, 0xDEADBEEF):  # a seed >= 2**31 once broke Inductor's launch code (torch 2.11)
        step = torch.zeros((), dtype=torch.int64, device="cuda")

        def fn(v: torch.Tensor) -> torch.Tensor:
            step.add_(1)
            return torch.ops.lotion_fx.sr_quantize_triton(v, step, fmt, block, seed) * 1

        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, options={"triton.cudagraphs": True})
        _, (code, *_) = run_and_get_code(compiled, w)
        assert "_rtn_kernel" in code
        for t in range(2, 5):
            got = compiled(w).clone()
            want = lotion_fx.fake_quantize(w, fmt, block, rounding="stochastic", seed=seed, step=t)
            assert int(step) == t and torch.equal(_bits(got), _bits(want))


def test_fake_quant_picks_the_kernel_for_16_bit_cuda_weights_only() -> None:
    """use_for: "auto" takes the kernel for bf16/fp16 CUDA weights it supports (qat: int4/int8, not nvfp4;
    lotion_sampled's stochastic rounding: nvfp4 too), never for CPU, fp32 or unsupported blocks; "triton" adds
    fp32 and qat's nvfp4, "reference" turns it off (fake CUDA tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        bf16 = torch.empty(64, 128, dtype=BF16, device="cuda")
        f32 = torch.empty(64, 128, dtype=F32, device="cuda")
        cpu = torch.empty(64, 128, dtype=BF16)
        assert Q.use_for(bf16, "int4", 32) and not Q.use_for(f32, "int4", 32)
        assert not Q.use_for(cpu, "int4", 32) and not Q.use_for(bf16, "int4", 128 + 64)
        assert Q.use_for(bf16, "int8", 128) and not Q.use_for(bf16, "nvfp4", 16)
        assert not Q.use_for(bf16, "mxfp4", 32) and not Q.use_for(bf16, "nvfp4", 32)
        assert Q.use_for(bf16, "int4", 32, stochastic=True) and Q.use_for(bf16, "nvfp4", 16, stochastic=True)
        assert not Q.use_for(f32, "nvfp4", 16, stochastic=True) and not Q.use_for(cpu, "int4", 32, stochastic=True)
        with Q.kernel_choice("triton"):
            assert Q.use_for(f32, "nvfp4", 16) and Q.use_for(bf16, "nvfp4", 16)
            assert Q.use_for(f32, "int4", 32, stochastic=True)
        with Q.kernel_choice("reference"):
            assert not Q.use_for(bf16, "int4", 32)
    with pytest.raises(ValueError, match="kernel_choice must be one of"):
        with Q.kernel_choice("inductor"):
            pass


@interpret
def test_straight_through_gradient_matches_rtn_quantize() -> None:
    """The kernel's op carries qat's straight-through gradient: the upstream gradient where the reference says
    the weight is inside the grid (reference.unclamped_mask), 0 where it was clamped."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 64, generator=g).to(_dev())
    up = torch.randn(8, 64, generator=g).to(_dev())
    for fmt, block in (("nvfp4", 16), ("int4", 32)):
        x = w.clone().requires_grad_(True)
        (torch.ops.lotion_fx.rtn_quantize_triton(x, fmt, block) * up).sum().backward()
        want = up * R.unclamped_mask(w, fmt, block).to(up.dtype)
        assert torch.equal(x.grad, want) and want.abs().sum() > 0
