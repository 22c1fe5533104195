"""Fake quantization (quantize, then dequantize on the block grid) as one Triton kernel: round to nearest (qat's
forward, `rtn_quantize_triton`) or unbiased stochastic rounding (lotion_sampled's, `sr_quantize_triton`).

Inductor lowers `reference.fake_quantize(w, fmt, block, "nearest")` to a persistent reduction with tiny blocks
that reaches only 17-27% of copy bandwidth on bf16 weights (H100). `_rtn_kernel` reads a (BLOCK_R, BLOCK_K)
tile with wide coalesced loads, views it as groups of `block` columns, takes each group's absmax with one
register reduction, then scales, rounds, dequantizes and stores in w's dtype: w is read once and written once.
nvfp4 also needs the tensor's absmax for its fp32 tensor scale: one reduction before the kernel, handed over as
a device pointer (no host sync, CUDA-graph safe). `rtn_quantize_triton` is a `torch.library.triton_op`, so
torch.compile traces it; `supports` says which inputs it takes (the caller falls back to the reference).
H100, under CUDA graphs: int4 / int8 at 93-97% of copy bandwidth for 4096^2 and 8192^2 bf16 / fp32 weights
(fp16 4096^2: 81-84%), nvfp4 53-62% (w is read twice); Inductor's code for the reference: 26-43%.

Stochastic rounding draws reference.uniform_noise's counter-based bits (lowbias32 of the flat index xor a key
hashed from (seed, step), in uint32) and rounds up with probability (m - a) / step, the reference's own test;
its output equals eager `fake_quantize(w, fmt, block, "stochastic", seed=seed, step=step)` bit for bit, under
the interpreter and on the H100 (bf16: 68-84% of copy for int4, 31-51% for nvfp4; Inductor's code 21-36%).

Bit-exactness contract: the output equals eager `reference.fake_quantize(w, fmt, block, rounding="nearest")` on
w's device bit for bit (signs of zeros included) for every finite input `supports` accepts (NaN where it has
NaN otherwise). The kernel computes in fp32 with the reference's own operations: IEEE divisions (`tl.div_rn`)
where it divides by a tensor, `(w / amax) * qmax` for absmax formats, exact powers of two for the E2M1 bins and
the E4M3 quantum, and `rint` (ties to even) in place of the reference's floor-and-compare rounding, which it
equals on these grids (within a bin the grid is uniform, and the reference's subtractions there are exact).
Divisions by a Python number (amax / qmax, amax / 6, tamax / 2688) follow eager torch on w's device: IEEE on
CPU, multiplication by the fp32 reciprocal on CUDA (what torch's CUDA division by a scalar does), so the CPU
and CUDA references themselves may differ in a scale's last bit. Under TRITON_INTERPRET=1 (numpy) libdevice is
missing and bf16 <-> fp32 casts truncate and flush subnormals: the same bits come from the 2^23 trick and
conversions on the bits.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from lotion_fx.backends.triton_util import INTERPRET, round_to
from lotion_fx.formats import get_format

QMAX = {name: get_format(name).qmax for name in ("int4", "int8", "nvfp4")}  # the formats this kernel takes
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NVFP4_BLOCK = 16


# ----------------------------------------------------------------------------- Triton
@triton.jit
def _max_nan(a, b):
    """max that propagates NaN, like torch.amax (the reference's block absmax)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _rint(v):
    """Round to the nearest integer, ties to even, for 0 <= v < 2^23 (and NaN)."""
    if INTERPRET:  # no libdevice in the interpreter: adding 2^23 in fp32 (numpy) rounds to an integer
        return (v + 8388608.0) - 8388608.0
    else:
        return libdevice.rint(v)


@triton.jit
def _to_f32(v, IN: tl.constexpr):
    """IN -> fp32, exactly."""
    if INTERPRET and IN == tl.bfloat16:  # the interpreter's bf16 -> fp32 flushes subnormals: widen the bits
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _div_number(x, C: tl.constexpr, RECIP: tl.constexpr):
    """x / C for a Python number C, as eager torch divides on w's device: IEEE division on CPU; on CUDA torch
    multiplies by the fp32 reciprocal of a scalar divisor (up to one ulp apart)."""
    if RECIP:
        return x * tl.div_rn(tl.full([], 1.0, tl.float32), C)
    else:
        return tl.div_rn(x, C)


@triton.jit
def _nvfp4_block_scale(amax, tamax, RECIP: tl.constexpr):
    """reference._nvfp4_from_block_amax: E4M3(amax / 6 / tensor_scale) * tensor_scale, tensor_scale = tamax / 2688."""
    ts = tl.where(tamax > 0, _div_number(tamax, 2688.0, RECIP), 1.0)
    v = tl.div_rn(_div_number(amax, 6.0, RECIP), ts)
    v = tl.where(v < 0.001953125, 0.001953125, v)  # clamp to [2^-9, 448], NaN kept (torch.clamp)
    v = tl.where(v > 448.0, 448.0, v)
    # round_to_e4m3: quantum 2^(e - 3), e = floor(log2(max(v, 2^-6))) read off the exponent bits
    c = tl.where(v < 0.015625, 0.015625, v)
    e = (c.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent, 121..135
    quantum = ((e - 3) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((257 - e) << 23).to(tl.float32, bitcast=True)  # v * 2^(3 - e) == v / quantum, exactly
    r = _rint(v * inv_quantum) * quantum
    e4m3 = tl.where(r > 448.0, 448.0, r)
    return e4m3 * ts


@triton.jit
def _hash32(x):
    """reference.hash32 (lowbias32) on uint32: the counter-based noise of stochastic rounding."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _rtn_kernel(w_ptr, o_ptr, tamax_ptr, step_ptr, seed, R, K, stride_w,
                QMAX: tl.constexpr, NVFP4: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_K: tl.constexpr, EVEN: tl.constexpr, RECIP: tl.constexpr, STOCHASTIC: tl.constexpr):
    """o = fake_quantize(w) for a (R, K) weight, row stride stride_w (o: contiguous), blocks of BLOCK columns:
    round to nearest, or with STOCHASTIC unbiased randomized rounding with reference.uniform_noise keyed by
    (seed, the int64 at step_ptr) and each element's flat index r * K + c.
    Program (i, j) owns rows i * BLOCK_R + [0, BLOCK_R) and columns j * BLOCK_K + [0, BLOCK_K)."""
    G: tl.constexpr = BLOCK_K // BLOCK
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    r64 = rows.to(tl.int64)[:, None]
    w_ptrs = w_ptr + r64 * stride_w + cols[None, :]
    o_ptrs = o_ptr + r64 * K + cols[None, :]
    if EVEN:
        w = tl.load(w_ptrs)
    else:  # K and BLOCK_K are multiples of BLOCK: masked columns are whole groups, whose results are dropped
        mask = (rows[:, None] < R) & (cols[None, :] < K)
        w = tl.load(w_ptrs, mask=mask, other=0.0)
    wf = tl.reshape(_to_f32(w, w_ptr.dtype.element_ty), (BLOCK_R, G, BLOCK))
    amax = tl.reduce(tl.abs(wf), 2, _max_nan, keep_dims=True)
    pos = amax > 0
    if NVFP4:
        s = tl.where(pos, _nvfp4_block_scale(amax, tl.load(tamax_ptr), RECIP), 1.0)
        x = tl.div_rn(wf, s)
    else:  # (w / amax) * qmax: exactly +-qmax at the block's absmax (reference._scaled)
        s = tl.where(pos, _div_number(amax, QMAX, RECIP), 1.0)
        x = tl.where(pos, tl.div_rn(wf, tl.where(pos, amax, 1.0)) * QMAX, wf)
    ax = tl.abs(x)
    m = tl.where(ax > QMAX, QMAX, ax)  # torch.clamp(|x|, max=qmax), NaN kept
    if NVFP4:  # E2M1 bins [0, 2), [2, 4), [4, 6] have steps 1/2, 1, 2 (powers of two: exact scalings)
        step = tl.where(m >= 4.0, 2.0, tl.where(m >= 2.0, 1.0, 0.5))
        inv_step = tl.where(m >= 4.0, 0.5, tl.where(m >= 2.0, 1.0, 2.0))
    else:
        step = 1.0
        inv_step = 1.0
    if STOCHASTIC:  # reference.round_stochastic_scaled: up to b = a + step with probability (m - a) / step
        # seed: an int argument, which Triton turns into a constexpr when it equals 1; adding an int64 zero
        # makes it a tensor either way before the truncation to uint32
        seed32 = (seed + tl.zeros([], tl.int64)).to(tl.uint32)
        key = _hash32(_hash32(tl.load(step_ptr).to(tl.uint32)) ^ seed32)
        idx = tl.reshape(r64 * K + cols[None, :], (BLOCK_R, G, BLOCK)).to(tl.uint32)
        u = (_hash32(idx ^ key) >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
        a = tl.floor(m * inv_step) * step
        r = tl.where(u < (m - a) * inv_step, a + step, a)
    else:  # round m / step to the nearest integer, ties to even
        r = _rint(m * inv_step) * step
    # torch.sign(x) * r: -0 for negative x rounded to 0, +0 for x = -0 (Triton's unary minus is 0 - r: +0)
    q = tl.where(x < 0, r * -1.0, r)
    out = tl.reshape(round_to(q * s, o_ptr.dtype.element_ty), (BLOCK_R, BLOCK_K))
    if EVEN:
        tl.store(o_ptrs, out)
    else:
        tl.store(o_ptrs, out, mask=mask)


# ----------------------------------------------------------------------------- Python
def supports(w: Tensor, fmt: str, block: int) -> bool:
    """Whether `rtn_quantize_triton` takes (w, fmt, block); anything else goes to reference.fake_quantize."""
    if fmt not in QMAX or isinstance(block, bool) or not isinstance(block, int):
        return False
    if fmt == "nvfp4":
        block_ok = block == NVFP4_BLOCK
    else:
        block_ok = 8 <= block <= 256 and block & (block - 1) == 0
    return (
        block_ok
        and w.dtype in DTYPES
        and w.dim() >= 2
        and w.numel() > 0
        and w.shape[-1] % block == 0
        and w.stride(-1) == 1
        and (w.device.type == "cuda" or (bool(INTERPRET) and w.device.type == "cpu"))
    )


def _config(rows: int, k: int, block: int, nvfp4: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps): 16 elements a thread, the tiles that were fastest on an H100 for bf16 4096^2
    and 8192^2 weights (blocks <= 32: 2 x 2048, 8 warps; larger blocks: 1 x 2048, 4 warps; nvfp4: 2 x 1024,
    4 warps); narrow weights get fewer columns and more rows, small tiles fewer warps. Under the interpreter:
    small tiles, so that the tests' shapes have partial row and column tiles."""
    if INTERPRET:
        return 4, max(2 * block, 64), 1
    br, bk, warps = (2, 1024, 4) if nvfp4 else (2, 2048, 8) if block <= 32 else (1, 2048, 4)
    bk_k = min(bk, max(triton.next_power_of_2(k), block))
    br = max(1, min(br * bk // bk_k, triton.next_power_of_2(rows)))
    return br, bk_k, max(1, min(warps, br * bk_k // 512))


def _check(w: Tensor, fmt: str, block: int) -> None:
    """A clear error for what `supports` refuses."""
    if not supports(w, fmt, block):
        raise ValueError(
            f"rtn_quantize_triton takes int4 / int8 (block a power of two in [8, 256]) or nvfp4 (block 16), "
            f"block dividing the last dim, fp32 / bf16 / fp16 weights of >= 2 dims with a contiguous last dim "
            f"on CUDA; got fmt={fmt!r}, block={block!r}, {w.dtype} {tuple(w.shape)} on {w.device}"
        )


def rtn_quantize(w: Tensor, fmt: str, block: int) -> Tensor:
    """reference.fake_quantize(w, fmt, block, "nearest") in one Triton pass: a new tensor of w's shape and dtype.

    A plain function launching through `wrap_triton`, so a trace sees the kernel itself (the op below traces
    into it, and the kernel lands in Inductor's generated code).
    """
    return _fake_quantize(w, fmt, block)


def sr_quantize(w: Tensor, step: Tensor, fmt: str, block: int, seed: int) -> Tensor:
    """reference.fake_quantize(w, fmt, block, "stochastic", seed=seed, step=step) in one Triton pass (the
    forward of `lotion_sampled`); `step`: a one-element int64 tensor on w's device, read by the kernel."""
    if not (isinstance(step, Tensor) and step.numel() == 1 and step.dtype == torch.int64 and step.device == w.device):
        raise ValueError(f"sr_quantize_triton's step must be a one-element int64 tensor on {w.device}, got "
                         f"{step.dtype if isinstance(step, Tensor) else type(step).__name__}")
    return _fake_quantize(w, fmt, block, step, seed)


def _fake_quantize(w: Tensor, fmt: str, block: int, step: Tensor | None = None, seed: int = 0) -> Tensor:
    _check(w, fmt, block)
    k = w.shape[-1]
    w2 = w.reshape(-1, k)  # a view unless the leading dims do not merge (then a contiguous copy)
    rows = w2.shape[0]
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    nvfp4 = fmt == "nvfp4"
    # nvfp4's tensor absmax (the max of the block absmaxes, exact in fp32); int formats do not read the pointer
    tamax = torch.linalg.vector_norm(w2, float("inf"), dtype=torch.float32) if nvfp4 else w2
    br, bk, warps = _config(rows, k, block, nvfp4)
    even = rows % br == 0 and k % bk == 0
    grid = (triton.cdiv(rows, br), triton.cdiv(k, bk))
    stochastic = step is not None
    # the seed's low 32 bits as a signed int32 (the kernel takes them back as uint32): Inductor (torch 2.11) fails
    # to generate the launch of a user kernel whose int argument is >= 2**31
    seed32 = (seed & 0xFFFFFFFF) - ((seed & 0x80000000) << 1)
    torch.library.wrap_triton(_rtn_kernel)[grid](
        w2, out, tamax, step if stochastic else w2, seed32, rows, k, w2.stride(0), QMAX=QMAX[fmt],
        NVFP4=nvfp4, BLOCK=block, BLOCK_R=br, BLOCK_K=bk, EVEN=even, RECIP=w.device.type == "cuda",
        STOCHASTIC=stochastic, num_warps=warps)
    return out


@torch.library.triton_op("lotion_fx::rtn_quantize_triton", mutates_args=())
def rtn_quantize_triton(w: Tensor, fmt: str, block: int) -> Tensor:
    """`rtn_quantize` as an op: one opaque node in eager code and torch.compile (triton_op traces into it)."""
    return rtn_quantize(w, fmt, block)


@rtn_quantize_triton.register_fake
def _(w: Tensor, fmt: str, block: int) -> Tensor:
    # triton_op's own fake runs the body; under the interpreter wrap_triton returns the bare kernel, which would
    # launch on fake tensors (Dynamo's fake-tensor pass on CPU)
    _check(w, fmt, block)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


@torch.library.triton_op("lotion_fx::sr_quantize_triton", mutates_args=())
def sr_quantize_triton(w: Tensor, step: Tensor, fmt: str, block: int, seed: int) -> Tensor:
    """`sr_quantize` as an op (the kernel-backed twin of lotion_fx::sr_quantize)."""
    return sr_quantize(w, step, fmt, block, seed)


@sr_quantize_triton.register_fake
def _(w: Tensor, step: Tensor, fmt: str, block: int, seed: int) -> Tensor:
    _check(w, fmt, block)
    return torch.empty(w.shape, dtype=w.dtype, device=w.device)


def _register_autograd() -> None:
    # the straight-through gradients of the reference ops: qat's (zero where RTN clamped), lotion_sampled's
    from lotion_fx.ops import _rtn_bwd, _rtn_setup, _sr_bwd, _ste_setup

    rtn_quantize_triton.register_autograd(_rtn_bwd, setup_context=_rtn_setup)
    sr_quantize_triton.register_autograd(_sr_bwd, setup_context=_ste_setup)


_register_autograd()

# Which fake-quantization forward runs on CUDA (benchmarks/bench_smooth_op.py, H100, 4096^2 and 8192^2):
# "auto": this kernel for 16-bit weights, where Inductor's code reaches 21-43% of copy bandwidth: qat's RTN for
# int4 / int8 (93-95% against 33-34%; nvfp4 stays on Inductor's code, as fast at 4096^2: 112 vs 110 us, 92 vs
# 68 in an earlier run), lotion_sampled's stochastic rounding for int4 / int8 / nvfp4 (int4 41 vs 92 us and
# 111 vs 260, nvfp4 89 vs 133 and 183 vs 258). fp32 weights keep Inductor's code, which fuses the cast to the
# matmul dtype (~100% of copy for RTN int4). "triton": this kernel wherever `supports` says so; "reference":
# never. Read when the smoother's forward runs or is traced.
_CHOICE = {"kernel": "auto"}
CHOICES = ("auto", "triton", "reference")


@contextlib.contextmanager
def kernel_choice(which: str) -> Iterator[None]:
    """Context: the fake-quant forwards (qat, lotion_sampled) pick their kernel by `which` (one of CHOICES)
    inside it (benchmarks, tests)."""
    if which not in CHOICES:
        raise ValueError(f"kernel_choice must be one of {CHOICES}, got {which!r}")
    old, _CHOICE["kernel"] = _CHOICE["kernel"], which
    try:
        yield
    finally:
        _CHOICE["kernel"] = old


def use_for(w: Tensor, fmt: str, block: int, stochastic: bool = False) -> bool:
    """Whether the forward of w runs this kernel (CUDA only; see _CHOICE): qat's `rtn_quantize_triton`, or
    with `stochastic` lotion_sampled's `sr_quantize_triton`."""
    which = _CHOICE["kernel"]
    if which == "reference" or w.device.type != "cuda" or not supports(w, fmt, block):
        return False
    if which == "triton":
        return True
    return w.dtype in (torch.bfloat16, torch.float16) and (stochastic or fmt in ("int4", "int8"))
