"""Weight-only matmuls for our packed int8 / int4 / nvfp4 codes: Triton on CUDA, plain torch beside it.

Storage (one layout per format; `pack` builds it from `reference.quantize`'s codes):

| format | qdata                                    | scale                           | tensor_scale |
|--------|------------------------------------------|---------------------------------|--------------|
| int8   | int8 codes, (N, K)                       | fp32, (N or 1, K // group)      | unused (1.0) |
| int4   | uint8, two codes per byte as code + 8,   | fp32, (N or 1, K // group)      | unused (1.0) |
|        | low nibble = even column, (N, K // 2)    |                                 |              |
| nvfp4  | uint8, two E2M1 codes per byte (sign in  | float8_e4m3fn, (N, K // 16)     | fp32 scalar  |
|        | bit 3), low nibble first, (N, K // 2)    |                                 |              |

Dequantization is `(code_f32 * scale_f32).to(dtype)` with nvfp4's scale `e4m3_f32 * tensor_scale`:
the same float operations as `reference.fake_quantize`, so the weight the kernels multiply by is
bit-exact to what `quantized_eval` uses. M <= 16 (`GEMV3_MAX_M`): `_gemv3_kernel` (`GEMV_KERNEL = "v3"`:
int32-word loads, elementwise fp32 accumulation with one accumulator per row of x, so the weight is read
once for all M rows, one reduction per program; M > 4 has its own launch configs, fewer rows and one word
per thread, for registers) or `_gemv3dot_kernel` ("v3dot", 4 < M: v3's decode, then a tensor-core tl.dot
with the <= 16 rows). Where v3's layout preconditions fail (or with "v2"): M <= 4 `_gemv_kernel` (v2: fp32
multiply + tl.sum per tile, even/odd columns decoded separately), 4 < M <= 16 split-K tl.dot. The default,
"auto", runs v3 for M <= 4 and the H100's fastest of v3 / v3dot / v2 per format and shape for M <= 8
(`_auto_wide_kernel`). M > 16: dequantize to x's dtype in one pass, then F.linear (cuBLAS). Measured in
docs/deploy_kernels.md.
`weight_only_linear` is a `torch.library.triton_op`, so torch.compile (and CUDA graphs) trace it
without a graph break; `linear_reference` is the plain-torch path (CPU) and the tests' reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from lotion_fx.backends.triton_util import INTERPRET, round_to
from lotion_fx.formats import FORMATS, PACKED, get_format

# the formats the kernels take; the packed layout also holds mxfp4 (E2M1 nibbles as nvfp4, E8M0 block scales
# stored as their uint8 bits), which has no kernel yet: its linear is dequantize + F.linear on every device
FMT_IDS = {"int8": 0, "int4": 1, "nvfp4": 2}
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# ----------------------------------------------------------------------------- packing (plain torch)
def _pack_nibbles(nib: Tensor) -> Tensor:
    nib = nib.to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def _unpack_nibbles(packed: Tensor) -> Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def pack_codes(codes: Tensor, fmt: str) -> Tensor:
    """Grid values (float, shape (N, K)) -> qdata in the layout above."""
    if fmt == "int8":
        return codes.to(torch.int8)
    if codes.shape[-1] % 2:
        raise ValueError(f"{fmt} packs two codes per byte: in_features {codes.shape[-1]} must be even")
    if fmt == "int4":
        return _pack_nibbles(codes.to(torch.int16) + 8)
    if fmt in ("nvfp4", "mxfp4"):
        mag = torch.bucketize(codes.abs().float(), _E2M1.to(codes.device))
        if not torch.equal(_E2M1.to(codes.device)[mag.clamp(max=7)], codes.abs().float()):
            raise ValueError(f"{fmt} codes must be E2M1 grid values")
        return _pack_nibbles(mag | (torch.signbit(codes).to(torch.int64) << 3))
    raise ValueError(f"no packed layout for format {fmt!r}; choose one of "
                     f"{sorted(n for n, f in FORMATS.items() if PACKED in f.torchao_targets)}")


def unpack_codes(qdata: Tensor, fmt: str) -> Tensor:
    """qdata -> grid values as float32, shape (N, K)."""
    if fmt == "int8":
        return qdata.to(torch.float32)
    nib = _unpack_nibbles(qdata).to(torch.int64)
    if fmt == "int4":
        return (nib - 8).to(torch.float32)
    # E2M1 from its bits (no lookup table: a module-level tensor breaks torch.compile's fake tensors)
    e, m = (nib >> 1) & 3, (nib & 1).to(torch.float32)
    mag = torch.where(e == 0, 0.5 * m, torch.exp2((e - 1).to(torch.float32)) * (1 + 0.5 * m))
    return torch.where(nib >= 8, -mag, mag)


def dequantize_reference(qdata: Tensor, scale: Tensor, tensor_scale: Tensor, fmt: str, dtype: torch.dtype) -> Tensor:
    """Plain-torch dequantization: the weight `fake_quantize` gives, element for element."""
    q = unpack_codes(qdata, fmt)
    if fmt == "mxfp4":  # E8M0 bits e -> 2^(e - 127), built on the fp32 bits (exact; e = 0 is the subnormal 2^-127)
        e = scale.to(torch.int32)
        s = torch.where(e == 0, 2.0**-127, (e << 23).view(torch.float32))
    else:
        s = scale.to(torch.float32)
    if fmt == "nvfp4":
        s = s * tensor_scale.to(torch.float32)
    n, k = q.shape
    group = k // s.shape[-1]
    return (q.reshape(n, -1, group) * s.unsqueeze(-1)).reshape(n, k).to(dtype)


def linear_reference(
    x: Tensor, qdata: Tensor, scale: Tensor, tensor_scale: Tensor, bias: Tensor | None, fmt: str
) -> Tensor:
    """F.linear with the dequantized weight (in x's dtype): the CPU path and the kernels' reference."""
    return F.linear(x, dequantize_reference(qdata, scale, tensor_scale, fmt, x.dtype), bias)


def packed_linear(
    x: Tensor, qdata: Tensor, scale: Tensor, tensor_scale: Tensor, bias: Tensor | None, fmt: str
) -> Tensor:
    """F.linear with a packed weight: the Triton kernels when both are on CUDA (formats in FMT_IDS), else
    linear_reference."""
    if qdata.is_cuda and x.is_cuda and fmt in FMT_IDS:
        return torch.ops.lotion_fx.weight_only_linear(x, qdata, scale, tensor_scale, bias, fmt)
    return linear_reference(x, qdata, scale, tensor_scale, bias, fmt)


# ----------------------------------------------------------------------------- Triton kernels
# Every kernel reads the weight as 2-column words: a byte of two nibbles (int4, nvfp4) or an int16 of
# two int8 codes (int8), and decodes the even columns ("lo") and the odd columns ("hi") as two tiles
# that multiply x's even and odd columns: no nibble interleave. A tile is (BLOCK_N, BLOCK_K // SG, SG // 2)
# words: SG columns share one scale (SG divides the block, or the whole row has one scale), so the
# kernel loads one scale per (row, SG columns) and broadcasts it over the last axis.
@triton.jit
def _e2m1(nib):
    """E2M1 nibble (int32; sign bit 3) -> fp32 on the bits: 0, 0.5, then (1 + m/2) * 2^(e-1)."""
    n3 = nib & 7
    bits = tl.where(n3 >= 2, (n3 << 22) + 0x3F000000, n3 * 0x3F000000) | ((nib & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _int4(nib):
    """Nibble n (int32, code + 8) -> n - 8 as fp32, exactly: 2^23 + n on the bits, minus 2^23 + 8."""
    return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _wtile(q_ptr, s_ptr, ts, offs_n, k0, N, K, stride_qn, stride_sn, group,
           FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SG: tl.constexpr, OUT: tl.constexpr):
    """Dequantized weight at columns k0 + [0, BLOCK_K): (even, odd) columns, each (BLOCK_N, BLOCK_K // SG,
    SG // 2) fp32 holding (code_f32 * scale_f32).to(OUT): the values `dequantize_reference` gives."""
    G: tl.constexpr = BLOCK_K // SG
    C: tl.constexpr = SG // 2
    n3 = offs_n[:, None, None]
    j3 = tl.arange(0, G)[None, :, None]
    w3 = k0 // 2 + j3 * C + tl.arange(0, C)[None, None, :]  # word index
    v = tl.load(q_ptr + n3 * stride_qn + w3, mask=(n3 < N) & (w3 < K // 2), other=0).to(tl.int32)
    if FMT == 0:  # int16 word, little endian: low byte = even column, both signed
        lo = ((v << 24) >> 24).to(tl.float32)
        hi = (v >> 8).to(tl.float32)
    elif FMT == 1:
        lo = _int4(v & 0xF)
        hi = _int4((v >> 4) & 0xF)
    else:
        lo = _e2m1(v & 0xF)
        hi = _e2m1((v >> 4) & 0xF)
    kb = k0 + j3 * SG  # first column of each scale group in the tile: (1, G, 1)
    smask = (n3 < N) & (kb < K)
    s_off = n3 * stride_sn + kb // group
    if FMT == 2:  # E4M3 bits -> fp32, exactly (scales are positive): normal or subnormal
        sb = tl.load(s_ptr + s_off, mask=smask, other=0).to(tl.int32)
        se = (sb >> 3) & 15
        sm = sb & 7
        normal = (((se + 120) << 23) | (sm << 20)).to(tl.float32, bitcast=True)
        s = tl.where(se == 0, sm.to(tl.float32) * 0.001953125, normal) * ts  # 2^-9
    else:
        s = tl.load(s_ptr + s_off, mask=smask, other=0.0)
    lo = round_to(lo * s, OUT).to(tl.float32)
    hi = round_to(hi * s, OUT).to(tl.float32)
    return lo, hi


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, ts_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_qn, stride_sn, group,
                 iters_per, FMT: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BM: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SG: tl.constexpr):
    """M <= BM <= 4 rows, no tl.dot: o[m, n] = sum_k x[m, k] W[n, k] as fp32 multiply + tl.sum. Program
    (pid_n, pid_k) owns BLOCK_N rows and iters_per K tiles; PARTIAL: fp32 partials o[pid_k, m, n]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // SG
    C: tl.constexpr = SG // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = 2 * (tl.arange(0, G)[:, None] * C + tl.arange(0, C)[None, :])  # even columns of a tile: (G, C)
    ts = tl.load(ts_ptr)
    rows = tl.arange(0, BM)
    acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    it0 = pid_k * iters_per
    it1 = tl.minimum(it0 + iters_per, tl.cdiv(K, BLOCK_K))
    for it in range(it0, it1):
        k0 = it * BLOCK_K
        lo, hi = _wtile(q_ptr, s_ptr, ts, offs_n, k0, N, K, stride_qn, stride_sn, group,
                        FMT, BLOCK_N, BLOCK_K, SG, x_ptr.dtype.element_ty)
        for m in tl.static_range(BM):
            xp = x_ptr + m * stride_xm + k0 + kk
            lim = tl.where(m < M, K - k0, 0)  # rows m >= M (BM > M) read nothing
            xe = tl.load(xp, mask=kk < lim, other=0.0).to(tl.float32)
            xo = tl.load(xp + 1, mask=kk + 1 < lim, other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2), axis=1)
            if BM == 1:
                acc += part[None, :]
            else:
                acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = o_ptr + pid_k * M * N + rows[:, None] * N + offs_n[None, :]
    tl.store(out, round_to(acc, o_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (offs_n[None, :] < N))


# ----------------------------------------------------------------------------- GEMV v3 (M <= 16)
# v2 above loads bytes (int16 words for int8) in a 3-D tile, loads x's even / odd columns with stride-2 loads
# (one load per weight and row), rounds with a scalar F2F per weight and reduces across threads per tile.
# v3: each thread owns R consecutive int32 words of a row (one 16-byte load for int4 / int8, R = 4: 32 / 16
# codes) for BLOCK_N rows, and the x columns those words hold (16-byte loads, shared by the BLOCK_N rows);
# code i of a word is column CPW * word + i (CPW = 8 nibbles or 4 int8 codes), so no interleave is needed.
# Per weight: one PRMT (int4 / int8 decode), FADD (magic number), FMUL (scale), one rounding op and one FFMA
# into a per-thread accumulator; one cross-thread reduction per program at the end. No layout conversion
# in the loop: the word index along the thread axis is marked non-contiguous so that Triton gives the
# weight, scale and x loads the same thread mapping (checked on the sm_90 TTGIR / SASS).
# M rows of x (BM <= 16): each decoded weight feeds one FFMA per row, into BM accumulators, so the weight is
# read and decoded once for all rows (4 + BM instructions per weight at best, plus x's bf16 -> fp32
# conversions over BLOCK_N); the M <= 4 code (SASS) is unchanged by the generalisation.
@triton.jit
def _codes3(v, FMT: tl.constexpr):
    """Codes of the int32 words v (code + 8 nibbles, int8 codes or E2M1 nibbles) as exact fp32: a tuple whose
    element i holds column CPW * word + i. int4: byte j of v & 0x0F0F0F0F (v >> 4 & 0x0F0F0F0F) is nibble 2j
    (2j + 1); one PRMT puts it under the exponent of 2^23, then minus 2^23 + 8. int8: v ^ 0x80808080 makes each
    byte code + 128, then the same trick. nvfp4: sign and E2M1 bits moved to fp32 bits 31 and 22..24, times 2^126
    (exact; e = 0 is a subnormal: m / 2)."""
    if FMT == 1:
        if INTERPRET:  # the interpreter has no inline asm: the same bits with shifts
            lo = v & 0x0F0F0F0F
            hi = (v >> 4) & 0x0F0F0F0F
            return (_magic(lo, 0, 8388616.0), _magic(hi, 0, 8388616.0), _magic(lo, 8, 8388616.0),
                    _magic(hi, 8, 8388616.0), _magic(lo, 16, 8388616.0), _magic(hi, 16, 8388616.0),
                    _magic(lo, 24, 8388616.0), _magic(hi, 24, 8388616.0))
        else:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 lo, hi;
                and.b32 lo, $8, 0x0F0F0F0F;
                shr.u32 hi, $8, 4;
                and.b32 hi, hi, 0x0F0F0F0F;
                prmt.b32 $0, lo, 0x4B000000, 0x7650;
                prmt.b32 $1, hi, 0x4B000000, 0x7650;
                prmt.b32 $2, lo, 0x4B000000, 0x7651;
                prmt.b32 $3, hi, 0x4B000000, 0x7651;
                prmt.b32 $4, lo, 0x4B000000, 0x7652;
                prmt.b32 $5, hi, 0x4B000000, 0x7652;
                prmt.b32 $6, lo, 0x4B000000, 0x7653;
                prmt.b32 $7, hi, 0x4B000000, 0x7653;
                sub.f32 $0, $0, 0f4B000008;
                sub.f32 $1, $1, 0f4B000008;
                sub.f32 $2, $2, 0f4B000008;
                sub.f32 $3, $3, 0f4B000008;
                sub.f32 $4, $4, 0f4B000008;
                sub.f32 $5, $5, 0f4B000008;
                sub.f32 $6, $6, 0f4B000008;
                sub.f32 $7, $7, 0f4B000008;
                }""",
                "=r,=r,=r,=r,=r,=r,=r,=r,r", [v], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    elif FMT == 0:
        if INTERPRET:
            u = v ^ -0x7F7F7F80  # 0x80808080
            return (_magic(u, 0, 8388736.0), _magic(u, 8, 8388736.0), _magic(u, 16, 8388736.0),
                    _magic(u, 24, 8388736.0))
        else:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 u;
                xor.b32 u, $4, 0x80808080;
                prmt.b32 $0, u, 0x4B000000, 0x7650;
                prmt.b32 $1, u, 0x4B000000, 0x7651;
                prmt.b32 $2, u, 0x4B000000, 0x7652;
                prmt.b32 $3, u, 0x4B000000, 0x7653;
                sub.f32 $0, $0, 0f4B000080;
                sub.f32 $1, $1, 0f4B000080;
                sub.f32 $2, $2, 0f4B000080;
                sub.f32 $3, $3, 0f4B000080;
                }""",
                "=r,=r,=r,=r,r", [v], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        return (_e2m1_at(v, 0), _e2m1_at(v, 1), _e2m1_at(v, 2), _e2m1_at(v, 3), _e2m1_at(v, 4), _e2m1_at(v, 5),
                _e2m1_at(v, 6), _e2m1_at(v, 7))


@triton.jit
def _magic(w, SH: tl.constexpr, SUB: tl.constexpr):
    """Byte SH / 8 of w (a value 0..255) as exact fp32: under the exponent of 2^23, minus SUB."""
    return (((w >> SH) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - SUB


@triton.jit
def _e2m1_at(v, i: tl.constexpr):
    """E2M1 nibble i of the int32 words v as fp32: sign to bit 31, e and m to bits 22..24, times 2^126."""
    t = v << (28 - 4 * i) if i < 7 else v
    bits = (t >> 6) & -0x7E400000  # 0x81C00000; >> is arithmetic: bits 25..30 copies of the sign, masked off
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37


@triton.jit
def _scale3(sraw, ts, FMT: tl.constexpr):
    """Loaded scales as fp32: nvfp4's E4M3 bits -> fp32 (bits << 20 times 2^120, exact, subnormal too) times
    tensor_scale; int4 / int8 scales are fp32 already."""
    if FMT == 2:
        e4m3 = ((sraw.to(tl.int32) & 0x7F) << 20).to(tl.float32, bitcast=True) * 1.329227995784916e36
        return e4m3 * ts
    else:
        return sraw


@triton.jit
def _round3(u, OUT: tl.constexpr, ROUND: tl.constexpr, I: tl.constexpr):
    """(u rounded to OUT) as fp32, exactly `round_to(u, OUT).to(fp32)`. For bf16, ROUND 0: Triton's cast (a
    scalar F2F, then a shift); 1: `cvt.rn.bf16x2.f32 d, u, 0`, whose result is the fp32 bits of the rounded
    value (one F2FP); 2: Veltkamp's split, three FP32 ops and no conversion unit: g = u * 2^16 + u, then
    g + (u - g): round-to-nearest-even like cvt for |u| in [2^-126, 2^111) (exhaustive on three binades, and
    the ops scale exactly between them), not for subnormal or larger weights; 3: code I of a word by 2 where
    I % 4 == 3, else by 1 (to balance the conversion and FMA pipes). fp16 always uses Triton's cast (already a
    packed F2FP + HADD2.F32)."""
    if OUT == tl.float32:
        return u
    elif (ROUND == 2 or (ROUND == 3 and I % 4 == 3)) and OUT == tl.bfloat16:
        if INTERPRET:
            g = u * 65536.0 + u
            return g + (u - g)
        else:  # .rn: no contraction into FMAs
            return tl.inline_asm_elementwise(
                "{ .reg .f32 g, d; fma.rn.f32 g, $1, 0f47800000, $1; sub.rn.f32 d, $1, g; add.rn.f32 $0, g, d; }",
                "=r,r", [u], dtype=tl.float32, is_pure=True, pack=1)
    elif ROUND % 2 == 1 and OUT == tl.bfloat16 and not INTERPRET:
        return tl.inline_asm_elementwise("{ .reg .f32 z; mov.f32 z, 0f00000000; cvt.rn.bf16x2.f32 $0, $1, z; }",
                                         "=r,r", [u], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return round_to(u, OUT).to(tl.float32)


@triton.jit
def _split_last(t, CH: tl.constexpr):
    """(1, R, G, CH) with the last axis inside one thread -> tuple of CH (1, R, G) fp32: element c is t[..., c]."""
    A: tl.constexpr = t.shape[0]
    B: tl.constexpr = t.shape[1]
    C: tl.constexpr = t.shape[2]
    t = t.to(tl.float32)
    e, o = tl.split(tl.reshape(t, (A, B, C, CH // 2, 2)))  # even / odd c
    if CH == 2:
        return e.reshape(A, B, C), o.reshape(A, B, C)
    elif CH == 4:
        x0, x2 = tl.split(e)
        x1, x3 = tl.split(o)
        return x0, x1, x2, x3
    else:
        e0, e1 = tl.split(tl.reshape(e, (A, B, C, 2, 2)))  # e holds c = 0, 2, 4, 6: e0 = (0, 4), e1 = (2, 6)
        o0, o1 = tl.split(tl.reshape(o, (A, B, C, 2, 2)))
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e1)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o1)
        return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _xrow3(x_ptr, xk, lim, CPW: tl.constexpr, CH: tl.constexpr, MASK: tl.constexpr):
    """One row of x at columns xk + c (xk: (1, R, G, CH), first column of each word, c < CH) in CPW // CH
    16-byte loads: a tuple of CPW (1, R, G) fp32, element i = column CPW * word + i. MASK: columns >= lim read 0.
    evict_last: every program reads x, keep it in L1 (the weights stream past with evict_first)."""
    if MASK:
        a = _split_last(tl.load(x_ptr + xk, mask=xk < lim, other=0.0, eviction_policy="evict_last"), CH)
    else:
        a = _split_last(tl.load(x_ptr + xk, eviction_policy="evict_last"), CH)
    if CPW == CH:
        return a
    else:  # fp32 x and 8 codes per word: two 16-byte loads per word
        xk = xk + CH
        if MASK:
            b = _split_last(tl.load(x_ptr + xk, mask=xk < lim, other=0.0, eviction_policy="evict_last"), CH)
        else:
            b = _split_last(tl.load(x_ptr + xk, eviction_policy="evict_last"), CH)
        return a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]


@triton.jit
def _rowsum(acc):
    """(BLOCK_N, R, G) -> (BLOCK_N,): the in-thread axis R first, then across threads."""
    return tl.sum(tl.sum(acc, axis=1), axis=1)


@triton.jit
def _tile_scales3(sp, wg, KW, ts, FMT: tl.constexpr, EVEN: tl.constexpr):
    """The scales at pointers sp of a tile's words wg (masked past K's KW words unless EVEN), decoded."""
    if EVEN:
        return _scale3(tl.load(sp, eviction_policy="evict_first"), ts, FMT)
    else:
        return _scale3(tl.load(sp, mask=wg < KW, other=0, eviction_policy="evict_first"), ts, FMT)


@triton.jit
def _gemv3_kernel(x_ptr, q_ptr, s_ptr, ts_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_qn, stride_sn, iters_per,
                  FMT: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BM: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, R: tl.constexpr, GW: tl.constexpr,
                  ROUND: tl.constexpr, EVEN: tl.constexpr):
    """M <= BM <= 16 rows, the weight as int32 words (q_ptr, stride_qn in words): o[m, n] = sum_k x[m, k] W[n, k].
    Program (pid_n, pid_k) owns BLOCK_N rows and iters_per tiles of BLOCK_W words; a thread holds R consecutive
    words (sharing one scale: GW = words per scale group, a multiple of R, or 0 for one scale per row) of each
    of its rows, accumulates elementwise in fp32 (one accumulator per row of x: each decoded weight is
    multiplied into all BM rows, so the weight is read once for all of them) and reduces once at the end.
    Registers grow as BM * BLOCK_N * R accumulators (see _gemv3_config). EVEN: BLOCK_W divides K's words (no
    masks; rows past N are clamped and not stored). Rows m >= M (BM > M) read row M - 1 and are not stored.
    PARTIAL: fp32 partials o[pid_k, m, n]."""
    CPW: tl.constexpr = 4 if FMT == 0 else 8
    CH: tl.constexpr = 4 if x_ptr.dtype.element_ty.primitive_bitwidth == 32 else CPW  # x per 16-byte load
    G: tl.constexpr = BLOCK_W // R
    OUT: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    KW = K // CPW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = tl.minimum(offs_n, N - 1)[:, None, None]
    r3 = tl.arange(0, R)[None, :, None]
    # threads along g: without the hint a contiguous axis (R = 1) gets vector loads over g, x's loads do not,
    # and Triton converts layouts through shared memory inside the loop
    g3 = tl.max_contiguous(tl.arange(0, G), 1)[None, None, :]
    c4 = tl.arange(0, CH)[None, None, None, :]
    ts = tl.load(ts_ptr)
    if GW == 0:
        s = _scale3(tl.load(s_ptr + n3 * stride_sn), ts, FMT)
    accs = ()
    for m in tl.static_range(BM):
        accs = accs + (tl.zeros((BLOCK_N, R, G), dtype=tl.float32),)
    it0 = pid_k * iters_per
    it1 = tl.minimum(it0 + iters_per, tl.cdiv(KW, BLOCK_W))
    for it in range(it0, it1):
        w0 = it * BLOCK_W
        wi = w0 + g3 * R + r3  # (1, R, G) word index
        qp = q_ptr + n3 * stride_qn + wi
        if EVEN:  # weights and scales are read once: evict_first
            v = tl.load(qp, eviction_policy="evict_first")
        else:
            v = tl.load(qp, mask=wi < KW, other=0, eviction_policy="evict_first")
        if GW != 0:
            wg = w0 + g3 * R  # first word of each thread's R words, (1, 1, G)
            s = _tile_scales3(s_ptr + n3 * stride_sn + wg // GW, wg, KW, ts, FMT, EVEN)
        cs = _codes3(v, FMT)
        xk = wi[:, :, :, None] * CPW + c4  # (1, R, G, CH)
        xs = ()  # BM rows of x at the tile's columns: tuples of CPW (1, R, G)
        for m in tl.static_range(BM):
            xs = xs + (_xrow3(_xrow_ptr(x_ptr, m, M, stride_xm), xk, K, CPW, CH, not EVEN),)
        if ROUND == 4:  # the scale factored out of the word's sum: codes x x, then one FMA by the scale
            new = ()
            for m in tl.static_range(BM):
                part = cs[0] * xs[m][0]
                for i in tl.static_range(1, CPW):
                    part = part + cs[i] * xs[m][i]
                new = new + (accs[m] + part * s,)
            accs = new
        else:
            for i in tl.static_range(CPW):
                w = _round3(cs[i] * s, OUT, ROUND, i)  # the dequantized weight, bit-exact
                new = ()
                for m in tl.static_range(BM):
                    new = new + (accs[m] + w * xs[m][i],)
                accs = new
    nmask = offs_n < N
    out = o_ptr + pid_k * M * N + offs_n
    OT: tl.constexpr = o_ptr.dtype.element_ty
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m in tl.static_range(BM):
        if m == 0:
            tl.store(out, round_to(_rowsum(accs[0]) + bias, OT), mask=nmask)
        else:
            tl.store(out + m * N, round_to(_rowsum(accs[m]) + bias, OT), mask=offs_n < tl.where(m < M, N, 0))


@triton.jit
def _xrow_ptr(x_ptr, m: tl.constexpr, M, stride_xm):
    """Row m of x, or row M - 1 for m >= M (in bounds, no mask: rows past M are computed and not stored)."""
    if m == 0:
        return x_ptr
    else:
        return x_ptr + tl.minimum(m, M - 1) * stride_xm


@triton.jit
def _dot_acc(acc, x, w, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: no TF32, like torch's default matmul
        return acc + tl.dot(x, tl.trans(w), input_precision="ieee")
    elif INTERPRET:  # the interpreter's 16-bit tl.dot is wrong; products of 16-bit floats are exact in fp32
        return acc + tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        return acc + tl.dot(x, tl.trans(w.to(x.dtype)))


@triton.jit
def _interleave(c, CPW: tl.constexpr):
    """Tuple of CPW (BLOCK_N, BLOCK_W) tensors, element i = code i of each word -> (BLOCK_N, BLOCK_W * CPW) with
    column CPW * word + i (the join axes stay inside a thread: no data movement)."""
    A: tl.constexpr = c[0].shape[0]
    B: tl.constexpr = c[0].shape[1]
    if CPW == 4:
        t = tl.join(tl.join(c[0], c[2]), tl.join(c[1], c[3]))  # t[..., a, b] = c[2a + b]
        return tl.reshape(t, (A, B * 4))
    else:
        t0 = tl.join(tl.join(c[0], c[4]), tl.join(c[2], c[6]))
        t1 = tl.join(tl.join(c[1], c[5]), tl.join(c[3], c[7]))
        return tl.reshape(tl.join(t0, t1), (A, B * 8))  # [..., a, b, c] = c[4a + 2b + c]


@triton.jit
def _gemv3dot_kernel(x_ptr, q_ptr, s_ptr, ts_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_qn, stride_sn, iters_per,
                     FMT: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_W: tl.constexpr, GW: tl.constexpr, EVEN: tl.constexpr):
    """"v3dot", 4 < M <= 16, 16-bit x: v3's int32-word decode (the same bits, rounded to x's dtype with Triton's
    cast), then one tensor-core tl.dot per tile with x's M <= 16 rows (rows >= M masked to 0), fp32 accumulation
    (products of 16-bit floats are exact; the MMA's fp32 sums are not IEEE-ordered, like every tl.dot). The weight
    is read once for all rows and the decode cost per weight does not grow with M (the sm_90 SASS: about 6-9
    instructions per weight for int4 / int8, 9-13 for nvfp4, vs v3's 15-18 at M = 8 and 25-32 at M = 16); the
    decoded tile goes to the MMA operand layout through shared memory. Program (pid_n, pid_k) owns BLOCK_N >= 16
    rows and iters_per tiles of BLOCK_W words; EVEN / PARTIAL as in _gemv3_kernel. M is not a constexpr: one
    compile serves every M."""
    CPW: tl.constexpr = 4 if FMT == 0 else 8
    OUT: tl.constexpr = x_ptr.dtype.element_ty
    BK: tl.constexpr = BLOCK_W * CPW
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    KW = K // CPW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n2 = tl.minimum(offs_n, N - 1)[:, None]
    w2 = tl.arange(0, BLOCK_W)[None, :]
    rows = tl.arange(0, 16)[:, None]
    kk = tl.arange(0, BK)[None, :]
    ts = tl.load(ts_ptr)
    if GW == 0:
        s = _scale3(tl.load(s_ptr + n2 * stride_sn), ts, FMT)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    it0 = pid_k * iters_per
    it1 = tl.minimum(it0 + iters_per, tl.cdiv(KW, BLOCK_W))
    for it in range(it0, it1):
        wi = it * BLOCK_W + w2  # (1, BLOCK_W) word index
        xk = it * BK + kk
        xp = x_ptr + rows * stride_xm + xk
        if EVEN:
            v = tl.load(q_ptr + n2 * stride_qn + wi, eviction_policy="evict_first")
            x = tl.load(xp, mask=rows < M, other=0.0, eviction_policy="evict_last")
        else:
            v = tl.load(q_ptr + n2 * stride_qn + wi, mask=wi < KW, other=0, eviction_policy="evict_first")
            x = tl.load(xp, mask=(rows < M) & (xk < K), other=0.0, eviction_policy="evict_last")
        if GW != 0:
            s = _tile_scales3(s_ptr + n2 * stride_sn + wi // GW, wi, KW, ts, FMT, EVEN)
        cs = _codes3(v, FMT)
        ws = ()
        for i in tl.static_range(CPW):
            ws = ws + (round_to(cs[i] * s, OUT),)  # the dequantized weight, bit-exact, in x's dtype
        acc = _dot_acc(acc, x, _interleave(ws, CPW), False)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + pid_k * M * N + rows * N + offs_n[None, :], round_to(acc, o_ptr.dtype.element_ty),
             mask=(rows < M) & (offs_n[None, :] < N))


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, ts_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_qn, stride_sn, group,
                 iters_per, FMT: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SG: tl.constexpr):
    """o = x @ dequant(W).T (+ bias) with tl.dot: two dots per K tile, x's even columns times the even
    weight columns and odd times odd. Tiles ordered in groups of 8 rows of tiles for L2 reuse; axis 1
    splits K (PARTIAL: fp32 partials o[pid_k, m, n], summed by the caller)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = 8 * num_n
    first_m = (pid // width) * 8
    size_m = tl.minimum(num_m - first_m, 8)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ke = 2 * tl.arange(0, BLOCK_K // 2)
    ts = tl.load(ts_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    it0 = pid_k * iters_per
    it1 = tl.minimum(it0 + iters_per, tl.cdiv(K, BLOCK_K))
    for it in range(it0, it1):
        k0 = it * BLOCK_K
        xp = x_ptr + offs_m[:, None] * stride_xm + k0 + ke[None, :]
        xe = tl.load(xp, mask=(offs_m[:, None] < M) & (k0 + ke[None, :] < K), other=0.0)
        xo = tl.load(xp + 1, mask=(offs_m[:, None] < M) & (k0 + ke[None, :] + 1 < K), other=0.0)
        lo, hi = _wtile(q_ptr, s_ptr, ts, offs_n, k0, N, K, stride_qn, stride_sn, group,
                        FMT, BLOCK_N, BLOCK_K, SG, x_ptr.dtype.element_ty)
        acc = _dot_acc(acc, xe, tl.reshape(lo, (BLOCK_N, BLOCK_K // 2)), IEEE)
        acc = _dot_acc(acc, xo, tl.reshape(hi, (BLOCK_N, BLOCK_K // 2)), IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], round_to(acc, o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, ts_ptr, w_ptr, N, K, stride_qn, stride_sn, group,
                    FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SG: tl.constexpr):
    """w = dequant(W) as a plain (N, K) tensor of w's dtype (prefill: then cuBLAS)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    lo, hi = _wtile(q_ptr, s_ptr, tl.load(ts_ptr), offs_n, k0, N, K, stride_qn, stride_sn, group,
                    FMT, BLOCK_N, BLOCK_K, SG, w_ptr.dtype.element_ty)
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # column k0 + j * SG + 2 * c + (0 | 1)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


# ----------------------------------------------------------------------------- launch heuristics
N_SM = 132  # H100 SXM; the heuristics only need its order of magnitude
GEMV_MAX_M = 16  # M <= this: a GEMV (v3 for M <= GEMV3_MAX_M, else tl.sum for M <= 4, tl.dot above)
SUM_MAX_M = 4  # M <= this: v3's M <= 4 launch configs, and the v2 tl.sum GEMV (v3's fallback)
# M >= this (prefill): dequantize to x's dtype, then cuBLAS: on an H100 at M = 512 that is 1.3-1.7x bf16's
# F.linear while the tiled tl.dot kernel (kept for 4 < M <= 16, and tested) was 10-20x.
DEQUANT_MIN_M = GEMV_MAX_M + 1
# (BLOCK_N, BLOCK_K, num_warps, split_k) for every GEMV launch, for sweeps (benchmarks/bench_wo_linear.py)
GEMV_OVERRIDE: tuple[int, int, int, int] | None = None
# "v3": M <= GEMV3_MAX_M runs _gemv3_kernel (int32 words, one pass over the weight for all M rows); it falls
# back where the layout does not allow it (rows not a multiple of 4 bytes, scale groups that split a word) to
# what "v2" runs: _gemv_kernel (tl.sum) for M <= SUM_MAX_M, the split-K tl.dot GEMV for SUM_MAX_M < M <=
# GEMV_MAX_M. "v3dot": v3, except _gemv3dot_kernel (v3's decode, then tensor-core tl.dot) for 4 < M with
# 16-bit x. "auto" (the default): v3 for M <= SUM_MAX_M; for SUM_MAX_M < M <= AUTO_WIDE_MAX_M the kernel that
# was fastest at M = 8 on the H100 (_auto_wide_kernel); above, v2. H100, M = 1, int4 at the 1.1B decode shapes:
# v3 2.6-34.8 us per call vs v2 3.8-41.4 (bench_wo_linear.py --kernels v2,v3); M = 8 in
# docs/results/bench_wo_linear_m8.md (bench_wo_linear.py --m 8 --kernels v2,v3,v3dot).
GEMV_KERNEL = "auto"
AUTO_WIDE_MAX_M = 8  # M = 16 was not timed: v2 there


def _auto_wide_kernel(m: int, n: int, fmt: str, dtype: torch.dtype) -> str:
    """GEMV_KERNEL "auto" at SUM_MAX_M < M: the H100's fastest at M = 8 (bench_wo_linear --m 8, shapes of the
    1.1B model): int8 with 16-bit x: v3dot (tensor cores; 0.81-2.14x bf16) except 512-row weights (v3);
    nvfp4: v3 at every shape (0.54-1.20x); int4: v3 up to 4096 rows (0.51-1.22x), v2 above (0.61-0.81x)."""
    if m > AUTO_WIDE_MAX_M:
        return "v2"
    if fmt == "int8":
        return "v3dot" if n > 512 and dtype != torch.float32 else "v3"
    return "v3" if fmt == "nvfp4" or n <= 4096 else "v2"


GEMV3_MAX_M = 16  # v3 for M <= this (at most GEMV_MAX_M); 4 < M: _gemv3_config's M > 4 branch
# (BLOCK_N, BLOCK_W, R, num_warps, split_k, ROUND) for every v3 launch (any M; v3dot takes BLOCK_N (>= 16),
# BLOCK_W, num_warps and split_k), for sweeps; GEMV3_ROUND replaces only the bf16 rounding of v3 (0: Triton's
# cast, 1: packed cvt, 2: Veltkamp, 3: one code in 4 Veltkamp, see _round3; 4: no per-weight rounding, the
# block scale factored out of each word's sum: sum_b s_b sum_k q_k x_k, exact s_b q_k instead of x's dtype)
GEMV3_OVERRIDE: tuple[int, int, int, int, int, int] | None = None
GEMV3_ROUND: int | None = None
GEMM_OVERRIDE: tuple[int, int, int, int, int] | None = None  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)


def _scale_group(block_k: int, group: int, nblocks: int) -> int:
    """Columns per scale inside a BLOCK_K tile (0: the packed kernels cannot take this layout)."""
    if nblocks == 1:
        return block_k
    sg = math.gcd(group, block_k)
    return sg if sg >= 2 else 0


def _gemv_config(m: int, n: int, k: int, fmt: str) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, split_k) for M <= SUM_MAX_M. Measured on an H100 (bench_wo_linear.py
    --sweep, 2048 x 2048): few rows and long K tiles (512 bytes of each row per iteration) win, and no
    split K: the partial sum is one more kernel, dearer than the idle SMs it would fill."""
    if GEMV_OVERRIDE is not None:
        return GEMV_OVERRIDE
    if INTERPRET:
        return 8, 32, 4, 2 if k >= 64 else 1
    bk = min(512 if fmt == "int8" else 1024, max(32, triton.next_power_of_2(k)))
    bn = 4 if n <= 1024 else 8
    return bn, bk, 4, 1


def _gemv3_config(m: int, n: int, k: int, fmt: str) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_N, BLOCK_W, R, num_warps, split_k, ROUND) for _gemv3_kernel, ROUND 1 (exact). M <= SUM_MAX_M:
    int8 / nvfp4 rows of >= 256 words: the best of `bench_wo_linear.py --sweep3` on the H100 at the decode
    shapes. Otherwise (int4: confirmed best or within 1% by that sweep) from the sm_90 SASS: a tile is up
    to 512 words of BLOCK_N = 4 rows (2 where N < 8 * N_SM, for >= 256 programs), a thread loads R words
    per row (16 bytes; nvfp4: 8, its 16-column scale groups are 2 words), so a 2048-wide int4 row is one
    tile and 8192 two; no split K.
    SUM_MAX_M < M: a thread holds BM * BLOCK_N * R fp32 accumulators, so R = 1 (4-byte word loads, 128 bytes
    per warp and row: still coalesced) and BLOCK_N = 8 (M <= 8) or 4: from the sm_90 SASS (Triton 3.9, bf16
    x), M = 8: 14.9-15.7 (int4) / 16.3 (int8) / 17.6 (nvfp4) instructions per weight in the loop, 10 of them
    FP32 (decode, scale, 8 FFMA), 128-180 registers, no spills; BLOCK_N = 16 takes 237-255 registers and
    spills (int4 block 32, nvfp4), 4 costs 2-3 more instructions per weight (the bf16 -> fp32 conversion of
    x is shared by BLOCK_N rows). M = 16, BLOCK_N 4: 29-32 per
    weight, 123-151 registers (8: 25-27, 204-244). BLOCK_N halves (to 2) while there are fewer row blocks
    than SMs; 4 warps of one word each per tile (BLOCK_W = 128 words); no split K. Not timed yet."""
    cpw = 4 if fmt == "int8" else 8
    kw = k // cpw
    if GEMV3_OVERRIDE is not None:
        cfg = GEMV3_OVERRIDE
    elif INTERPRET and m > SUM_MAX_M:  # the tests' shapes again, with the R = 1 of the GPU's M > 4 configs
        cfg = 16, 16, 1, 1, 2 if kw > 16 else 1, 1
    elif INTERPRET:  # the tests' shapes (N = 40, K <= 384): a partial row block, partial tiles, split K
        cfg = 16, 32, 2, 1, 2 if kw > 32 else 1, 1
    elif m > SUM_MAX_M:
        bn = 8 if m <= 8 else 4
        while bn > 2 and triton.cdiv(n, bn) < N_SM:
            bn //= 2
        bw = min(128, max(32, triton.next_power_of_2(kw)))
        cfg = bn, bw, 1, max(1, bw // 32), 1, 1
    elif fmt != "int4" and kw >= 256:  # best of --sweep3 on the H100 at the decode shapes (d 2048, 8192)
        r = 2 if fmt == "nvfp4" else 4
        if k >= 8192:
            cfg = 4, 512, r, 4, 1, 1
        elif fmt == "int8" and n >= 8192:
            cfg = 4, 256, r, 1, 1, 1
        else:
            cfg = 2, 256, r, 2, 1, 1
    else:
        r = 2 if fmt == "nvfp4" else 4
        groups = 1 if fmt == "int4" else 2  # R-word groups per row and thread
        bw = min(512, max(r, triton.next_power_of_2(kw)))
        cfg = 4 if n >= 8 * N_SM else 2, bw, r, max(1, min(4, bw // r // (32 * groups))), 1, 1
    return cfg if GEMV3_ROUND is None else (*cfg[:5], GEMV3_ROUND)


def _gemv3dot_config(m: int, n: int, k: int, fmt: str) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_W, num_warps, split_k) for _gemv3dot_kernel ("v3dot", 4 < M <= 16); GEMV3_OVERRIDE's
    (BLOCK_N, BLOCK_W, -, num_warps, split_k, -) where set. From the sm_90 SASS (not timed yet): 32 rows x 32
    words (a 256-column int4 / 128-column int8 tile), 4 warps: 5.9-6.4 instructions per weight for int4 /
    int8, 9.1-9.8 for nvfp4, 92-167 registers, 24-48 KB of shared memory (Triton's 3 cp.async stages); 16 rows
    (7.7-8.8 per weight, nvfp4 12-13) where N has fewer than N_SM blocks of 32; no split K."""
    if GEMV3_OVERRIDE is not None:
        bn, bw, _, warps, split, _ = GEMV3_OVERRIDE
        return max(16, bn), bw, warps, split
    kw = k // (4 if fmt == "int8" else 8)
    if INTERPRET:  # the tests' shapes (N = 40): a partial row block, partial tiles, split K
        return 16, 8, 4, 2 if kw > 8 else 1
    bn = 32 if triton.cdiv(n, 32) >= N_SM else 16
    return bn, min(32, max(4, triton.next_power_of_2(kw))), 4, 1


def _gemv3(x2: Tensor, qdata: Tensor, s: Tensor, ts: Tensor, bias: Tensor | None, fmt: str, nblocks: int,
           stride_sn: int, kernel: str) -> Tensor | None:
    """x2 @ dequant(W).T (+ bias) with _gemv3_kernel (or, GEMV_KERNEL "v3dot", M > SUM_MAX_M and 16-bit x,
    _gemv3dot_kernel), shape (M, N); None where the layout does not allow it. BM: M rounded up to a power of
    two for M <= SUM_MAX_M (the launch configs measured there), else M."""
    m, k = x2.shape
    n = qdata.shape[0]
    cpw = 4 if fmt == "int8" else 8
    if k % cpw or qdata.stride(1) != 1 or qdata.stride(0) % 4 or qdata.storage_offset() % 4:
        return None  # rows are not whole int32 words (qdata is 1-byte: int8 codes or packed nibbles)
    group = k // nblocks
    if nblocks > 1 and group % cpw:
        return None  # a scale group splits a word
    gw = 0 if nblocks == 1 else group // cpw
    dot = kernel == "v3dot" and m > SUM_MAX_M and x2.dtype != torch.float32  # fp32: no fast MMA, v3
    if dot:
        bn, bw, warps, split = _gemv3dot_config(m, n, k, fmt)
    else:
        bn, bw, r, warps, split, rnd = _gemv3_config(m, n, k, fmt)
        if gw:
            r = math.gcd(r, gw)  # a thread's R words share one scale
        # more threads than word groups in a tile make Triton convert layouts through shared memory in the loop
        warps = max(1, min(warps, bw // r // 32))
    q = qdata.view(torch.int32)
    kw = k // cpw
    iters = triton.cdiv(kw, bw)
    per = triton.cdiv(iters, split)
    split = triton.cdiv(iters, per)
    if split == 1:
        out = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    else:
        out = torch.empty((split, m, n), device=x2.device, dtype=torch.float32)
    has_bias = bias is not None and split == 1
    bm = triton.next_power_of_2(m) if m <= SUM_MAX_M else m
    if dot:
        torch.library.wrap_triton(_gemv3dot_kernel)[(triton.cdiv(n, bn), split)](
            x2, q, s, ts, bias if has_bias else ts, out, m, n, k, x2.stride(0), q.stride(0), stride_sn, per,
            FMT=FMT_IDS[fmt], HAS_BIAS=has_bias, PARTIAL=split > 1, BLOCK_N=bn, BLOCK_W=bw, GW=gw,
            EVEN=kw % bw == 0, num_warps=warps)
    else:
        torch.library.wrap_triton(_gemv3_kernel)[(triton.cdiv(n, bn), split)](
            x2, q, s, ts, bias if has_bias else ts, out, m, n, k, x2.stride(0), q.stride(0), stride_sn, per,
            FMT=FMT_IDS[fmt], HAS_BIAS=has_bias, PARTIAL=split > 1, BM=bm, BLOCK_N=bn, BLOCK_W=bw, R=r, GW=gw,
            ROUND=rnd, EVEN=kw % bw == 0, num_warps=warps)
    if split > 1:
        out = out.sum(0)
        if bias is not None:
            out = out + bias.to(torch.float32)
        out = out.to(x2.dtype)
    return out


def _dot_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split_k) for the tl.dot kernel."""
    if INTERPRET:
        return 16, 16, 32, 4, 1, 2 if m <= GEMV_MAX_M and k >= 64 else 1
    if GEMM_OVERRIDE is not None:
        bm, bn, bk, w, s = GEMM_OVERRIDE
    elif m <= GEMV_MAX_M:  # best of a small sweep at M = 8 on an H100
        bm, bn, bk, w, s = 16, 64, 128, 4, 3
    else:
        bm, bn, bk, w, s = (64 if m <= 64 else 128), 128, 64, 8, 3
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = max(1, min(triton.cdiv(2 * N_SM, tiles), triton.cdiv(k, bk), 8)) if m <= GEMV_MAX_M else 1
    return bm, bn, bk, w, s, split


def check_operands(x: Tensor, qdata: Tensor, scale: Tensor, fmt: str) -> None:
    """Clear errors for inputs the kernels cannot take."""
    if fmt not in FMT_IDS:
        raise ValueError(f"unknown packed format {fmt!r}; choose one of {sorted(FMT_IDS)}")
    k = qdata.shape[1] * get_format(fmt).codes_per_byte
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the weight has in_features {k}")
    if k % scale.shape[1]:
        raise ValueError(f"scale has {scale.shape[1]} blocks per row, which does not divide in_features {k}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"weight-only matmul takes float32/bfloat16/float16 inputs, not {x.dtype}")


@torch.library.triton_op("lotion_fx::weight_only_linear", mutates_args=())
def weight_only_linear(
    x: Tensor, qdata: Tensor, scale: Tensor, tensor_scale: Tensor, bias: Tensor | None, fmt: str
) -> Tensor:
    """x @ dequant(W).T + bias with the Triton kernels; W in the packed layout of this module."""
    check_operands(x, qdata, scale, fmt)
    n = qdata.shape[0]
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    nblocks = scale.shape[1]
    group = k // nblocks
    if fmt == "int8":
        if k % 2 or qdata.stride(1) != 1 or qdata.stride(0) % 2 or qdata.storage_offset() % 2:
            return linear_reference(x, qdata, scale, tensor_scale, bias, fmt)  # no int16 word view
        q = qdata.view(torch.int16)  # two int8 codes per word
    else:
        q = qdata
    # scale is (N or 1, nblocks); int8/int4 per-tensor scales broadcast over rows (stride 0).
    stride_sn = scale.stride(0) if scale.shape[0] == n else 0
    s = scale.view(torch.uint8) if scale.dtype == torch.float8_e4m3fn else scale
    ts = tensor_scale.reshape(1).to(torch.float32)
    fid = FMT_IDS[fmt]
    if m >= DEQUANT_MIN_M:  # prefill: one pass to x's dtype, then the dense matmul
        bn, bk = (16, 64) if INTERPRET else (32, 256)
        sg = _scale_group(bk, group, nblocks)
        if not sg:
            return linear_reference(x, qdata, scale, tensor_scale, bias, fmt)
        w = torch.empty((n, k), device=x.device, dtype=x.dtype)
        torch.library.wrap_triton(_dequant_kernel)[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
            q, s, ts, w, n, k, q.stride(0), stride_sn, group, FMT=fid, BLOCK_N=bn, BLOCK_K=bk, SG=sg, num_warps=4)
        return F.linear(x2, w, bias).reshape(*lead, n)
    kernel = GEMV_KERNEL
    if kernel == "auto":
        kernel = "v3" if m <= SUM_MAX_M else _auto_wide_kernel(m, n, fmt, x2.dtype)
    if m <= GEMV3_MAX_M and kernel in ("v3", "v3dot"):  # (m <= GEMV_MAX_M here)
        out = _gemv3(x2, qdata, s, ts, bias, fmt, nblocks, stride_sn, kernel)
        if out is not None:
            return out.reshape(*lead, n)
    if m <= SUM_MAX_M:
        bn, bk, warps, split = _gemv_config(m, n, k, fmt)
        cfg = dict(BM=triton.next_power_of_2(m), BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
        kernel, grid_n = _gemv_kernel, triton.cdiv(n, bn)
    else:
        bm, bn, bk, warps, stages, split = _dot_config(m, n, k)
        cfg = dict(IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                   num_stages=stages)
        grid_n = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        kernel = _gemm_kernel
    sg = _scale_group(bk, group, nblocks)
    if not sg:
        return linear_reference(x, qdata, scale, tensor_scale, bias, fmt)
    iters = triton.cdiv(k, bk)
    per = triton.cdiv(iters, split)
    split = triton.cdiv(iters, per)  # no empty K ranges
    if split == 1:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    torch.library.wrap_triton(kernel)[(grid_n, split)](
        x2, q, s, ts, bias if bias is not None and split == 1 else ts, out, m, n, k, x2.stride(0), q.stride(0),
        stride_sn, group, per, FMT=fid, HAS_BIAS=bias is not None and split == 1, PARTIAL=split > 1, SG=sg, **cfg)
    if split > 1:  # Inductor fuses this sum (and the cast) into the consumer of the output
        out = out.sum(0)
        if bias is not None:
            out = out + bias.to(torch.float32)
        out = out.to(x.dtype)
    return out.reshape(*lead, n)


@weight_only_linear.register_fake
def _(x: Tensor, qdata: Tensor, scale: Tensor, tensor_scale: Tensor, bias: Tensor | None, fmt: str) -> Tensor:
    check_operands(x, qdata, scale, fmt)
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))
