"""What every Triton kernel of lotion_fx shares: whether it runs under TRITON_INTERPRET=1 (numpy on the CPU,
where CI tests the kernels) and the fp32 -> 16-bit cast that torch's `.to()` does, which the interpreter gets
wrong for bf16 (it truncates and flushes subnormals)."""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def round_to(v, OUT: tl.constexpr):
    """fp32 -> OUT, round to nearest even (what torch's .to() does)."""
    if INTERPRET and OUT == tl.bfloat16:  # round on the bits; quiet NaNs stay NaN, subnormals kept
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(OUT)
