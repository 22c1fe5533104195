"""Formats and reference math (DESIGN.md section 1), checked in float64 against their definitions."""

import math

import pytest
import torch

import lotion_fx
from lotion_fx import reference as R

FORMATS = ["int8", "int4", "nvfp4", "mxfp4"]
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def grid(fmt: str) -> torch.Tensor:
    mags = E2M1 if fmt in ("nvfp4", "mxfp4") else list(range(128 if fmt == "int8" else 8))
    return torch.tensor(sorted({float(m) for m in mags} | {-float(m) for m in mags}), dtype=torch.float64)


def on_grid(x: torch.Tensor, fmt: str) -> bool:
    return bool(torch.isin(x, grid(fmt)).all())


def weights(seed: int = 0, shape=(8, 64)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed magnitudes so that blocks span several binades (E2M1 bins of every width)
    return torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape, generator=g, dtype=torch.float64).pow(3) * 4


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", [None, "row", "tensor", 16])
def test_rtn_lands_on_grid_and_is_idempotent(fmt, block):
    w = weights()
    codes, s = lotion_fx.quantize(w, fmt, block)
    assert on_grid(codes, fmt)
    blk = R.resolve_block(block, fmt, w.shape[-1])
    q = lotion_fx.fake_quantize(w, fmt, block)
    torch.testing.assert_close(q, (R.to_blocks(codes, blk) * s.unsqueeze(-1)).reshape(w.shape), rtol=0, atol=0)
    # the dequantized value divided by the block scale is a grid value
    y = (R.to_blocks(q, blk) / s.unsqueeze(-1)).reshape(w.shape)
    assert (y.unsqueeze(-1) - grid(fmt)).abs().amin(-1).max() < 1e-12
    assert torch.equal(lotion_fx.fake_quantize(q, fmt, block), q)
    # RTN picks a nearest grid point: no grid value is closer to x = w / s
    x = (R.to_blocks(w, blk) / s.unsqueeze(-1)).reshape(w.shape)
    dist = (x.unsqueeze(-1) - grid(fmt)).abs().amin(-1)
    assert torch.all((x - codes).abs() <= dist + 1e-12)


@pytest.mark.parametrize("fmt", FORMATS)
def test_granularity_and_scale_rules(fmt):
    w = weights(1)
    s_tensor = lotion_fx.quantize(w, fmt, "tensor")[1]
    s_row = lotion_fx.quantize(w, fmt, "row")[1]
    s_blk = lotion_fx.quantize(w, fmt, 16)[1]
    assert s_tensor.shape == (1, 1) and s_row.shape == (8, 1) and s_blk.shape == (8, 4)
    amax = w.reshape(8, 4, 16).abs().amax(-1)
    if fmt in ("int8", "int4"):
        torch.testing.assert_close(s_blk, amax / (127 if fmt == "int8" else 7), rtol=1e-15, atol=0)
        torch.testing.assert_close(s_tensor, w.abs().amax().reshape(1, 1) / (127 if fmt == "int8" else 7))
    elif fmt == "mxfp4":
        torch.testing.assert_close(s_blk, torch.exp2(torch.floor(torch.log2(amax)) - 2), rtol=0, atol=0)
    else:  # nvfp4: E4M3 block scale times the fp32 tensor scale absmax / (448 * 6)
        ts = w.abs().amax() / (448 * 6)
        e4m3 = (amax / 6 / ts).to(torch.float8_e4m3fn).double()
        torch.testing.assert_close(s_blk, e4m3 * ts, rtol=1e-15, atol=0)
    default = {"int8": "row", "int4": 32, "nvfp4": 16, "mxfp4": 32}[fmt]
    assert torch.equal(lotion_fx.quantize(w, fmt)[1], lotion_fx.quantize(w, fmt, default)[1])


def test_e4m3_rounding_matches_torch_float8():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([
        torch.exp2(torch.empty(20000, dtype=torch.float64).uniform_(-9.5, math.log2(448), generator=g)),
        torch.arange(0, 2**-6, 2**-10, dtype=torch.float64),  # subnormals and their midpoints (ties)
        torch.tensor([2**-9, 2**-6, 1.0625, 1.1875, 240.0, 248.0, 432.0, 440.0, 448.0], dtype=torch.float64),
    ])
    expect = v.float().to(torch.float8_e4m3fn).double()
    assert torch.equal(R.round_to_e4m3(v.float()).double(), expect)
    e4m3, _ = R.nvfp4_scales(weights(2), 16)
    assert torch.equal(e4m3, e4m3.float().to(torch.float8_e4m3fn).double())


def test_ties_to_even_and_clamping():
    # int4 and mxfp4 with scale exactly 1 (block absmax 7 / 6), nvfp4 likewise (tensor amax 6).
    ints = torch.tensor([[7.0, 0.5, 1.5, 2.5, -2.5, -3.5, 6.5, 0.49, -0.51, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    assert lotion_fx.quantize(ints, "int4", 16)[1].item() == 1.0
    assert lotion_fx.quantize(ints, "int4", 16)[0].tolist() == [[7, 0, 2, 2, -2, -4, 6, 0, -1, 0, 0, 0, 0, 0, 0, 0]]
    fp = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25, 2.4, 0, 0, 0, 0, 0]], dtype=torch.float64)
    expect = [[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 0.0, 2.0, 0, 0, 0, 0, 0]]
    for fmt in ("mxfp4", "nvfp4"):
        codes, s = lotion_fx.quantize(fp, fmt, 16)
        assert s.item() == 1.0 and codes.tolist() == expect
    # mxfp4: absmax 7.9 has scale 2^(2-2) = 1, so everything past +-6 clamps to +-6
    mx = torch.tensor([[7.9, -7.0, 6.5, -6.01, 5.9, 3.3, 0, 0]], dtype=torch.float64)
    assert lotion_fx.quantize(mx, "mxfp4", 8)[0].tolist() == [[6, -6, 6, -6, 6, 3, 0, 0]]
    assert torch.equal(lotion_fx.rounding_variance(mx, "mxfp4", 8)[0, :4], torch.zeros(4, dtype=torch.float64))
    assert torch.all(R.variance_grad(mx, "mxfp4", 8)[0, :4] == 0)
    assert not R.unclamped_mask(mx, "mxfp4", 8)[0, :4].any() and R.unclamped_mask(mx, "mxfp4", 8)[0, 4:].all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fmt", FORMATS)
def test_grid_points_absmax_and_zero_blocks(fmt, dtype):
    w = weights(3).to(dtype)
    w[0, :16] = 0  # an all-zero block
    w[1, :] = 0  # an all-zero row
    for rounding in ("nearest", "stochastic"):
        q = lotion_fx.fake_quantize(w, fmt, 16, rounding, generator=torch.Generator().manual_seed(0))
        assert torch.equal(q[0, :16], w[0, :16]) and torch.equal(q[1], w[1])
    var = lotion_fx.rounding_variance(w, fmt, 16)
    assert torch.all(var[0, :16] == 0) and torch.all(var[1] == 0) and torch.all(var >= 0)
    # RTN output is a fixed point of RTN (bit-exact) and SR almost surely leaves it on the same codes
    q = lotion_fx.fake_quantize(w, fmt, 16)
    assert torch.equal(lotion_fx.fake_quantize(q, fmt, 16), q)
    # values exactly on grid points (scale 1/8 exactly, every format): unchanged by either rounding,
    # zero variance and zero variance gradient
    g = torch.Generator().manual_seed(1)
    gr = grid(fmt)
    codes = gr[torch.randint(len(gr), (8, 64), generator=g)]
    codes[:, ::16] = gr.max()  # every block holds the top of the grid, so its scale is 2^-3
    on = (codes / 8).to(dtype)
    assert torch.all(R.block_scales(on, fmt, 16) == 0.125)
    sr = lotion_fx.fake_quantize(on, fmt, 16, "stochastic", generator=g)
    assert torch.equal(sr, on) and torch.equal(lotion_fx.fake_quantize(on, fmt, 16), on)
    assert torch.all(lotion_fx.rounding_variance(on, fmt, 16) == 0)
    assert torch.all(R.variance_grad(on, fmt, 16) == 0)
    # the block absmax is a grid point for the absmax formats: exactly zero variance and gradient there
    if fmt in ("int8", "int4"):
        blocks = R.to_blocks(w, 16).abs()
        top = (blocks == blocks.amax(-1, keepdim=True)).reshape(w.shape)
        assert torch.all(var[top] == 0) and torch.all(R.variance_grad(w, fmt, 16)[top] == 0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("noise", ["generator", "seed"])
def test_stochastic_rounding_unbiased_with_matching_variance(fmt, noise):
    w = weights(4, (2, 32))
    n = 4000
    # Repeating the rows keeps every block scale (and the nvfp4 tensor amax) unchanged.
    rep = w.repeat(n, 1)
    if noise == "generator":
        sr = lotion_fx.fake_quantize(rep, fmt, 16, "stochastic", generator=torch.Generator().manual_seed(0))
    else:
        sr = lotion_fx.fake_quantize(rep, fmt, 16, "stochastic", seed=1234, step=7)
    sr = sr.reshape(n, *w.shape)
    var = lotion_fx.rounding_variance(w, fmt, 16)
    assert var.gt(0).float().mean() > 0.9  # the test exercises real rounding
    # Each sample is a two-point variable around the known mean w: se(mean) = sqrt(var / n), and
    # (X - w)^2 has mean var and variance mu4 - var^2 = gap^4 p (1 - p) (1 - 2p)^2.
    blk = R.to_blocks(w, 16)
    x = blk / R.block_scales(w, fmt, 16)
    _, a, b = R.grid_neighbors(x, fmt)
    gap2 = ((b - a) * R.block_scales(w, fmt, 16)).reshape(w.shape) ** 2
    p = var / gap2
    spread = gap2**2 * p * (1 - p) * (1 - 2 * p) ** 2
    err_mean = (sr.mean(0) - w).abs()
    err_var = ((sr - w) ** 2).mean(0) - var
    # 64 elements per check: 5 sigma fails with probability ~4e-5 for a correct implementation
    inside = R.unclamped_mask(w, fmt, 16)  # past the top of the grid (mxfp4) SR clamps: biased by design
    assert inside.float().mean() > 0.9
    z = err_mean / (var / n).sqrt().clamp(min=1e-30)
    assert torch.all(err_mean[inside] <= 5 * (var / n).sqrt()[inside] + 1e-12), z[inside].max()
    tol = 5 * (spread / n).sqrt() + 1e-9 * var + 1e-15
    assert torch.all(err_var.abs()[inside] <= tol[inside]), (err_var.abs() / tol)[inside].max()
    # every sample lies on one of the two grid neighbours
    y = (R.to_blocks(sr[:50].reshape(-1, 32), 16) / R.block_scales(rep[:100], fmt, 16)).reshape(-1)
    assert (y.unsqueeze(-1) - grid(fmt)).abs().amin(-1).max() < 1e-12


def test_seeded_noise_is_reproducible_and_step_dependent():
    w = weights(5)
    a = lotion_fx.fake_quantize(w, "int4", 16, "stochastic", seed=3, step=1)
    assert torch.equal(a, lotion_fx.fake_quantize(w, "int4", 16, "stochastic", seed=3, step=1))
    assert not torch.equal(a, lotion_fx.fake_quantize(w, "int4", 16, "stochastic", seed=3, step=2))
    assert not torch.equal(a, lotion_fx.fake_quantize(w, "int4", 16, "stochastic", seed=4, step=1))
    u = R.uniform_noise(1 << 16, 0, 0, "cpu")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 5 * (1 / 12 / (1 << 16)) ** 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", FORMATS)
def test_low_precision_inputs(fmt, dtype):
    w = weights(6).to(dtype)
    q = lotion_fx.fake_quantize(w, fmt, 16)
    assert q.dtype == dtype and q.shape == w.shape
    # same codes as the float64 computation on the same values; dequantized values within one ulp
    assert torch.equal(lotion_fx.quantize(w, fmt, 16)[0], lotion_fx.quantize(w.double(), fmt, 16)[0])
    ref = lotion_fx.fake_quantize(w.double(), fmt, 16)
    torch.testing.assert_close(q.double(), ref.to(dtype).double(), rtol=torch.finfo(dtype).eps, atol=0)
    var = lotion_fx.rounding_variance(w, fmt, 16)
    torch.testing.assert_close(var.double(), lotion_fx.rounding_variance(w.double(), fmt, 16), rtol=1e-5, atol=1e-6)


def test_block_size_that_does_not_divide_names_the_sizes():
    w = torch.randn(4, 48)
    with pytest.raises(ValueError, match=r"block_size 32 does not divide in_features 48.*16"):
        lotion_fx.fake_quantize(w, "int4", 32)
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        lotion_fx.fake_quantize(w, "int3")
    with pytest.raises(ValueError, match="rounding must be"):
        lotion_fx.fake_quantize(w, "int4", 16, rounding="up")


@pytest.mark.parametrize("fmt", FORMATS)
def test_penalty_gradient_matches_autograd_with_scale_held_constant(fmt):
    w = weights(7)
    g = torch.rand(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    lam = 0.7
    s = R.block_scales(w, fmt, 16).detach()

    def penalty(wv: torch.Tensor) -> torch.Tensor:
        # sigma^2 = s^2 (m - a)(b - m) written out, s constant, a and b piecewise constant in w
        x = (R.to_blocks(wv, 16) / s).reshape(w.shape)
        m = torch.clamp(x.abs(), max=lotion_fx.get_format(fmt).qmax)
        _, a, b = R.grid_neighbors(x.detach(), fmt)
        sb = s.expand(-1, -1, 16).reshape(w.shape)
        return 0.5 * lam * (g * sb**2 * (m - a) * (b - m)).sum()

    wv = w.clone().requires_grad_(True)
    value = penalty(wv)
    torch.testing.assert_close(value, R.penalty_value(w, g, fmt, 16, lam), rtol=1e-12, atol=0)
    (auto,) = torch.autograd.grad(value, wv)
    # sigma^2 has a kink (a minimum, 0) at every grid point: there the reference returns the
    # subgradient 0 (also at the top of the grid), elsewhere the derivative
    kink = lotion_fx.rounding_variance(w, fmt, 16) == 0
    pg = R.penalty_grad(w, g, fmt, 16, lam)
    assert kink.float().mean() < 0.1 and torch.all(pg[kink] == 0)
    torch.testing.assert_close(pg[~kink], auto[~kink], rtol=1e-12, atol=1e-15)
    # and the closed form (lam/2) g s (a + b - 2x) on the signed grid, by finite differences
    h = 1e-7
    fd = (penalty(w + h * torch.eye(1, w.numel(), dtype=w.dtype).reshape(w.shape)) - penalty(w)) / h
    torch.testing.assert_close(fd, R.penalty_grad(w, g, fmt, 16, lam).reshape(-1)[0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("fmt, block", [("int8", 16), ("int4", 16), ("int4", 0), ("nvfp4", 16), ("mxfp4", 16)])
def test_penalty_gradient_through_the_scale_matches_autograd_and_finite_differences(fmt, block):
    """scale_grad=True: the scale is a function of w (int: block absmax / qmax; nvfp4: E4M3 block
    factor, piecewise constant, times the tensor absmax / 2688; mxfp4: a power of two, constant a.e.)."""
    w = weights(9)
    g = torch.rand(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    lam, f = 0.7, lotion_fx.get_format(fmt)
    s_const = R.block_scales(w, fmt, block)

    def penalty(wv: torch.Tensor) -> torch.Tensor:
        wb = R.to_blocks(wv, block)
        if fmt.startswith("int"):
            s = wb.abs().amax(-1, keepdim=True) / f.qmax
        elif fmt == "nvfp4":
            s = s_const / (w.abs().max() / 2688) * (wv.abs().max() / 2688)
        else:
            s = s_const
        m = torch.clamp((wb / s).abs(), max=f.qmax)
        _, a, b = R.grid_neighbors(m.detach(), fmt)
        return 0.5 * lam * (R.to_blocks(g, block) * s**2 * (m - a) * (b - m)).sum()

    wv = w.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(penalty(wv), wv)
    kink = lotion_fx.rounding_variance(w, fmt, block) == 0  # grid points: the subgradient 0, as before
    top = R.to_blocks(w.abs(), block) == R.to_blocks(w.abs(), block).amax(-1, keepdim=True)
    pg = R.penalty_grad(w, g, fmt, block, lam, scale_grad=True)
    ok = ~kink | top.reshape(w.shape)  # a block's top sits on the grid, yet carries the scale's share
    torch.testing.assert_close(pg[ok], auto[ok], rtol=1e-10, atol=1e-14)
    held = R.penalty_grad(w, g, fmt, block, lam)
    i = int(w.abs().argmax())  # the tensor's largest |w| sets a scale in every format
    e = torch.zeros(w.numel(), dtype=w.dtype)
    e[i] = 1e-7
    fd = (penalty(w + e.reshape(w.shape)) - penalty(w - e.reshape(w.shape))) / 2e-7
    torch.testing.assert_close(pg.reshape(-1)[i], fd, rtol=1e-5, atol=1e-12)
    if fmt == "mxfp4":
        assert torch.equal(pg, held)
    else:
        assert abs(float(fd)) > 1e-3 and float(held.reshape(-1)[i]) == 0  # held constant, the top gets nothing


def test_penalty_gradient_through_the_scale_splits_evenly_between_tied_maxima():
    w = weights(11)
    w[2, 3], w[2, 9] = 9.0, -9.0  # a tie for the absmax of row 2's first block of 16
    g = torch.rand(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    pg = R.penalty_grad(w, g, "int4", 16, 1.0, scale_grad=True)
    assert pg[2, 3] == -pg[2, 9] != 0
    e = torch.zeros_like(w)
    e[2, 3], e[2, 9] = 1e-7, -1e-7  # move both magnitudes together: the block's absmax moves by h
    fd = (R.penalty_value(w + e, g, "int4", 16, 1.0) - R.penalty_value(w - e, g, "int4", 16, 1.0)) / 2e-7
    torch.testing.assert_close(pg[2, 3] - pg[2, 9], fd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("fmt, qmax, block", [("int8", 127, "row"), ("int4", 7, 32), ("int4", 7, 128)])
def test_codes_and_scales_equal_torchaos_own_symmetric_quantizer(fmt: str, qmax: int, block) -> None:
    """Where our formats coincide with torchao's symmetric affine quantization (int8 per row, int4
    per group), torchao's choose_qparams/quantize/dequantize give our codes, scales and values."""
    from torchao.quantization.quant_primitives import (
        MappingType, choose_qparams_affine, dequantize_affine, quantize_affine,
    )

    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1)  # rows of different ranges
    w[3, :] = 0.0  # an all-zero row: ours stays exactly zero
    k = w.shape[1] if block == "row" else block
    args = ((1, k), torch.int8)
    kw = dict(quant_min=-qmax, quant_max=qmax)
    s, z = choose_qparams_affine(w, MappingType.SYMMETRIC, *args, eps=torch.finfo(torch.float32).tiny, **kw)
    q = quantize_affine(w, (1, k), s, z, torch.int8, **kw)
    codes, scales = lotion_fx.quantize(w, fmt, block)
    nonzero = w.reshape(48, -1, k).abs().amax(-1) > 0
    assert torch.equal(codes.to(torch.int8), q)
    torch.testing.assert_close(scales[nonzero], s.reshape(scales.shape)[nonzero], rtol=0, atol=0)
    deq = dequantize_affine(q, (1, k), s, z, torch.int8, **kw)
    assert torch.equal(lotion_fx.fake_quantize(w, fmt, block), deq)


def test_torchao_granularities_as_block_size_mean_what_torchao_means() -> None:
    """block_size=PerGroup(k) / PerAxis(0) / PerRow() / PerToken() / PerBlock((1, k)) / PerTensor():
    codes and values equal torchao's symmetric quantizer at the block torchao derives from the same
    granularity (get_block_size), and the config stores the plain spelling."""
    from torchao.quantization.granularity import PerAxis, PerBlock, PerGroup, PerRow, PerTensor, PerToken
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine
    from torchao.quantization.utils import get_block_size

    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1)
    cases = [(PerGroup(32), 32), (PerBlock((1, 16)), 16), (PerAxis(0), "row"), (PerRow(), "row"),
             (PerToken(), "row"), (PerTensor(), "tensor")]
    for gran, plain in cases:
        assert lotion_fx.LotionConfig(block_size=gran).block_size == plain
        for fmt, qmax in (("int8", 127), ("int4", 7)):
            bs = get_block_size(tuple(w.shape), gran)
            kw = dict(quant_min=-qmax, quant_max=qmax)
            s, z = choose_qparams_affine(w, MappingType.SYMMETRIC, bs, torch.int8,
                                         eps=torch.finfo(torch.float32).tiny, **kw)
            codes, _ = lotion_fx.quantize(w, fmt, gran)
            assert torch.equal(codes.to(torch.int8), quantize_affine(w, bs, s, z, torch.int8, **kw)), (gran, fmt)
            assert torch.equal(lotion_fx.fake_quantize(w, fmt, gran), lotion_fx.fake_quantize(w, fmt, plain))
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=PerGroup(16)))
    assert lotion_fx.smoothers(prepared)["0.weight"].block == 16
    # torchao's column granularities scale along out_features; ours run along in_features
    for gran in (PerAxis(1), PerRow(0)):
        with pytest.raises(ValueError, match=r"PerGroup\(k\), PerBlock\(\(1, k\)\), PerAxis\(0\)"):
            lotion_fx.LotionConfig(block_size=gran)
