"""Low-precision weight formats: grid, default block and scale rule (DESIGN.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass

# FP8 E4M3 (the NVFP4 block-scale dtype) and FP4 E2M1 constants.
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
E2M1_MAX = 6.0
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127


@dataclass(frozen=True)
class Format:
    """A symmetric grid of representable values in scaled units, and how its block scale is set.

    `magnitudes` are the non-negative grid points; the grid is their mirror image about 0.
    Between grid points the spacing is piecewise constant (`steps` gives the spacing that starts
    at each `step_starts` entry), which is what lets rounding be written with floor() alone.
    """

    name: str
    magnitudes: tuple[float, ...]
    step_starts: tuple[float, ...]
    steps: tuple[float, ...]
    default_block: int | str
    scale_rule: str  # "absmax" | "nvfp4" | "mxfp4"
    bits: int

    @property
    def qmax(self) -> float:
        return self.magnitudes[-1]



def _int_format(name: str, qmax: int, default_block: int | str, bits: int) -> Format:
    return Format(
        name=name,
        magnitudes=tuple(float(i) for i in range(qmax + 1)),
        step_starts=(0.0,),
        steps=(1.0,),
        default_block=default_block,
        scale_rule="absmax",
        bits=bits,
    )


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

FORMATS: dict[str, Format] = {
    "int8": _int_format("int8", 127, "row", 8),
    "int4": _int_format("int4", 7, 32, 4),
    "nvfp4": Format("nvfp4", _E2M1, (0.0, 2.0, 4.0), (0.5, 1.0, 2.0), 16, "nvfp4", 4),
    "mxfp4": Format("mxfp4", _E2M1, (0.0, 2.0, 4.0), (0.5, 1.0, 2.0), 32, "mxfp4", 4),
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
