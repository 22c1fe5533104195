"""Low-precision weight formats and their facts: grid, default block, scale rule and storage,
the torchao classes that hold them (DESIGN.md section 1). Callers ask the Format; none branches
on a format's name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# FP8 E4M3 (the NVFP4 block-scale dtype) and FP4 E2M1 constants.
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
E2M1_MAX = 6.0
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127

PER_TENSOR = 0  # resolved block size meaning "one block for the whole tensor"
PACKED = "LotionPackedTensor"  # our torchao subclass (backends/torchao_export.py)


@dataclass(frozen=True)
class Format:
    """A symmetric grid of representable values in scaled units, how its block scale is set and
    stored, and which torchao classes can hold it.

    `magnitudes` are the non-negative grid points; the grid is their mirror image about 0.
    Between grid points the spacing is piecewise constant (`steps` gives the spacing that starts
    at each `step_starts` entry), which is what lets rounding be written with floor() alone.
    """

    name: str
    magnitudes: tuple[float, ...]
    step_starts: tuple[float, ...]
    steps: tuple[float, ...]
    default_block: int | str
    scale_rule: str  # "absmax" | "nvfp4" | "mxfp4" (reference.block_scales)
    bits: int
    scale_bytes: int  # bytes of one stored block scale: fp32 4, E4M3 or E8M0 1
    tensor_scale_bytes: int  # bytes of a per-tensor scale on top of the block scales (nvfp4's fp32)
    torchao_targets: tuple[str, ...]  # classes convert can build for it, its default first

    @property
    def qmax(self) -> float:
        return self.magnitudes[-1]

    @property
    def default_torchao_target(self) -> str:
        """The torchao class `convert` builds unless told otherwise."""
        return self.torchao_targets[0]

    @property
    def codes_per_byte(self) -> int:
        """Codes packed into one byte of storage (two for 4-bit formats)."""
        return 8 // self.bits

    def needs_tensor_absmax(self, block: int) -> bool:
        """Whether a block's scale depends on the absmax of the whole weight (one block per tensor,
        or a per-tensor scale above the block scales): what row shards must all-reduce."""
        return block == PER_TENSOR or self.tensor_scale_bytes > 0

    def export_bytes(self, numel: int, num_blocks: int) -> int:
        """Ideal packed size: ceil(numel * bits / 8) + num_blocks * scale_bytes + tensor_scale_bytes."""
        return math.ceil(numel * self.bits / 8) + num_blocks * self.scale_bytes + self.tensor_scale_bytes


def _int_format(name: str, qmax: int, default_block: int | str, bits: int, targets: tuple[str, ...]) -> Format:
    return Format(
        name=name,
        magnitudes=tuple(float(i) for i in range(qmax + 1)),
        step_starts=(0.0,),
        steps=(1.0,),
        default_block=default_block,
        scale_rule="absmax",
        bits=bits,
        scale_bytes=4,
        tensor_scale_bytes=0,
        torchao_targets=targets,
    )


def _fp4_format(name: str, default_block: int, scale_rule: str, tensor_scale_bytes: int,
                targets: tuple[str, ...]) -> Format:
    return Format(name, (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), (0.0, 2.0, 4.0), (0.5, 1.0, 2.0),
                  default_block, scale_rule, 4, 1, tensor_scale_bytes, targets)


FORMATS: dict[str, Format] = {
    "int8": _int_format("int8", 127, "row", 8, (PACKED, "Int8Tensor", "IntxUnpackedToInt8Tensor")),
    "int4": _int_format("int4", 7, 32, 4, (PACKED, "IntxUnpackedToInt8Tensor")),
    "nvfp4": _fp4_format("nvfp4", 16, "nvfp4", 4, (PACKED, "NVFP4Tensor")),  # E4M3 blocks, fp32 tensor scale
    "mxfp4": _fp4_format("mxfp4", 32, "mxfp4", 0, (PACKED, "MXTensor")),  # E8M0 block scales
}


def get_format(name: str | Format) -> Format:
    """Look a format up by name; the error lists the names that exist."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown format {name!r}: choose one of {sorted(FORMATS)} "
            "(e.g. LotionConfig(format='int4'))"
        ) from None


def as_block_spec(block_size: Any) -> Any:
    """lotion_fx's spelling (k columns, "row", "tensor") of a torchao granularity for an (out, in)
    weight: PerGroup(k) / PerBlock((1, k)) -> k, PerAxis(0) / PerRow() / PerToken() -> "row",
    PerTensor() -> "tensor". Anything else is returned unchanged for the caller to validate."""
    if block_size is None or isinstance(block_size, (int, str)):
        return block_size
    from torchao.quantization import granularity as G

    if not isinstance(block_size, G.Granularity):
        return block_size
    if isinstance(block_size, G.PerGroup):
        return block_size.group_size
    if isinstance(block_size, G.PerBlock) and len(block_size.block_size) == 2 and block_size.block_size[0] == 1:
        return block_size.block_size[1]
    if (isinstance(block_size, G.PerToken) or (isinstance(block_size, G.PerAxis) and block_size.axis in (0, -2))
            or (isinstance(block_size, G.PerRow) and block_size.dim in (1, -1))):
        return "row"
    if isinstance(block_size, G.PerTensor):
        return "tensor"
    raise ValueError(
        f"block_size {block_size!r}: blocks run along in_features of an (out, in) weight, so the torchao "
        "granularities that fit are PerGroup(k), PerBlock((1, k)), PerAxis(0), PerRow(), PerToken() and PerTensor()"
    )
