"""audit(): golden graph diffs and report tables, invariants, and the sensitivity estimate vs measurement."""

from __future__ import annotations

import json
import math

import expecttest
import pytest
import torch
from torch import nn

import lotion_fx
from lotion_fx import reference as R
from lotion_fx.audit import export_bytes, spearman
from audit_factories import deep_mlp_data, tied_mlp, tiny_gpt, trained_deep_mlp

CFG = lotion_fx.LotionConfig(format="int4", block_size=16)


class TestGolden(expecttest.TestCase):
    """Any change to what the pass does, or to the report, shows up here in review."""

    def test_tied_mlp(self) -> None:
        report = lotion_fx.audit(lotion_fx.prepare(tied_mlp(), CFG))
        self.assertExpectedInline(str(report.diff), """\
graph diff: 11 nodes inserted, 3 removed, 3 edges redirected
+ %fc1_weight = get_attr fc1.weight
+ %lotion_fc1_weight = call_module lotion.fc1_weight(%fc1_weight)
+ %fc2_weight = get_attr fc2.weight
+ %lotion_fc2_weight = call_module lotion.fc2_weight(%fc2_weight)
+ %emb_weight = get_attr emb.weight
+ %lotion_emb_weight = call_module lotion.emb_weight(%emb_weight)
+ %fc1_bias = get_attr fc1.bias
+ %linear = call_function torch._C._nn.linear(%emb, %lotion_fc1_weight, %fc1_bias)
+ %fc2_bias = get_attr fc2.bias
+ %linear_1 = call_function torch._C._nn.linear(%relu, %lotion_fc2_weight, %fc2_bias)
+ %linear_2 = call_function torch._C._nn.linear(%add, %lotion_emb_weight, None)
- %fc1 = call_module fc1(%emb)
- %fc2 = call_module fc2(%relu)
- %head = call_module head(%add)
~ %relu.args[0]: %fc1 -> %linear
~ %add.args[1]: %fc2 -> %linear_1
~ %output.args[0]: %head -> %linear_2""")
        self.assertExpectedInline(str(report), """\
WARNING: no curvature yet (train a few steps with method='lotion', or pass data=...): no sensitivity estimate
lotion_fx audit of TiedMLP (capture: symbolic_trace; method=lotion, format=int4, block_size=16)
3 weights rewritten, 0 Linear-like ops not rewritten; 20480 bytes -> 3852 bytes after export

Rewrite
weight                      feeds nodes    smoother           format      block  method
--------------------------  -------------  -----------------  --------  -------  --------
fc1.weight                  linear         lotion.fc1_weight  int4           16  lotion
fc2.weight                  linear_1       lotion.fc2_weight  int4           16  lotion
emb.weight (= head.weight)  linear_2       lotion.emb_weight  int4           16  lotion

Quantization
weight      shape    blocks    scale range     mean var    RTN rel err    clamped    bytes fp    bytes export
----------  -------  --------  --------------  ----------  -------------  ---------  ----------  --------------
fc1.weight  64x32    128       0.0176..0.0252  8.77e-05    0.0653         0          8192        1540
fc2.weight  32x64    128       0.0123..0.0179  4.42e-05    0.0651         0          8192        1540
emb.weight  32x32    64        0.172..0.586    0.017       0.0904         0          4096        772""")

    def test_tiny_gpt_export(self) -> None:
        ids = torch.zeros(2, 16, dtype=torch.long)
        report = lotion_fx.audit(lotion_fx.prepare(tiny_gpt(), CFG, example_inputs=(ids,)))
        self.assertExpectedInline(str(report.diff), """\
graph diff: 18 nodes inserted, 8 removed, 9 edges redirected
+ %blocks_0_attn_qkv_weight_1 = get_attr blocks.0.attn.qkv.weight
+ %lotion_blocks_0_attn_qkv_weight = call_module lotion.blocks_0_attn_qkv_weight(%blocks_0_attn_qkv_weight_1)
+ %blocks_0_attn_proj_weight_1 = get_attr blocks.0.attn.proj.weight
+ %lotion_blocks_0_attn_proj_weight = call_module lotion.blocks_0_attn_proj_weight(%blocks_0_attn_proj_weight_1)
+ %blocks_0_mlp_fc_weight_1 = get_attr blocks.0.mlp.fc.weight
+ %lotion_blocks_0_mlp_fc_weight = call_module lotion.blocks_0_mlp_fc_weight(%blocks_0_mlp_fc_weight_1)
+ %blocks_0_mlp_proj_weight_1 = get_attr blocks.0.mlp.proj.weight
+ %lotion_blocks_0_mlp_proj_weight = call_module lotion.blocks_0_mlp_proj_weight(%blocks_0_mlp_proj_weight_1)
+ %blocks_1_attn_qkv_weight_1 = get_attr blocks.1.attn.qkv.weight
+ %lotion_blocks_1_attn_qkv_weight = call_module lotion.blocks_1_attn_qkv_weight(%blocks_1_attn_qkv_weight_1)
+ %blocks_1_attn_proj_weight_1 = get_attr blocks.1.attn.proj.weight
+ %lotion_blocks_1_attn_proj_weight = call_module lotion.blocks_1_attn_proj_weight(%blocks_1_attn_proj_weight_1)
+ %blocks_1_mlp_fc_weight_1 = get_attr blocks.1.mlp.fc.weight
+ %lotion_blocks_1_mlp_fc_weight = call_module lotion.blocks_1_mlp_fc_weight(%blocks_1_mlp_fc_weight_1)
+ %blocks_1_mlp_proj_weight_1 = get_attr blocks.1.mlp.proj.weight
+ %lotion_blocks_1_mlp_proj_weight = call_module lotion.blocks_1_mlp_proj_weight(%blocks_1_mlp_proj_weight_1)
+ %wte_weight_1 = get_attr wte.weight
+ %lotion_wte_weight = call_module lotion.wte_weight(%wte_weight_1)
- %blocks_0_attn_qkv_weight = get_attr blocks.0.attn.qkv.weight
- %blocks_0_attn_proj_weight = get_attr blocks.0.attn.proj.weight
- %blocks_0_mlp_fc_weight = get_attr blocks.0.mlp.fc.weight
- %blocks_0_mlp_proj_weight = get_attr blocks.0.mlp.proj.weight
- %blocks_1_attn_qkv_weight = get_attr blocks.1.attn.qkv.weight
- %blocks_1_attn_proj_weight = get_attr blocks.1.attn.proj.weight
- %blocks_1_mlp_fc_weight = get_attr blocks.1.mlp.fc.weight
- %blocks_1_mlp_proj_weight = get_attr blocks.1.mlp.proj.weight
~ %linear.args[1]: %blocks_0_attn_qkv_weight -> %lotion_blocks_0_attn_qkv_weight
~ %linear_1.args[1]: %blocks_0_attn_proj_weight -> %lotion_blocks_0_attn_proj_weight
~ %linear_2.args[1]: %blocks_0_mlp_fc_weight -> %lotion_blocks_0_mlp_fc_weight
~ %linear_3.args[1]: %blocks_0_mlp_proj_weight -> %lotion_blocks_0_mlp_proj_weight
~ %linear_4.args[1]: %blocks_1_attn_qkv_weight -> %lotion_blocks_1_attn_qkv_weight
~ %linear_5.args[1]: %blocks_1_attn_proj_weight -> %lotion_blocks_1_attn_proj_weight
~ %linear_6.args[1]: %blocks_1_mlp_fc_weight -> %lotion_blocks_1_mlp_fc_weight
~ %linear_7.args[1]: %blocks_1_mlp_proj_weight -> %lotion_blocks_1_mlp_proj_weight
~ %linear_8.args[1]: %lm_head_weight -> %lotion_wte_weight""")
        self.assertExpectedInline(str(report), """\
WARNING: no curvature yet (train a few steps with method='lotion', or pass data=...): no sensitivity estimate
lotion_fx audit of GPT (capture: export; method=lotion, format=int4, block_size=16)
9 weights rewritten, 0 Linear-like ops not rewritten; 409600 bytes -> 76836 bytes after export

Rewrite
weight                         feeds nodes    smoother                          format      block  method
-----------------------------  -------------  --------------------------------  --------  -------  --------
blocks.0.attn.qkv.weight       linear         lotion.blocks_0_attn_qkv_weight   int4           16  lotion
blocks.0.attn.proj.weight      linear_1       lotion.blocks_0_attn_proj_weight  int4           16  lotion
blocks.0.mlp.fc.weight         linear_2       lotion.blocks_0_mlp_fc_weight     int4           16  lotion
blocks.0.mlp.proj.weight       linear_3       lotion.blocks_0_mlp_proj_weight   int4           16  lotion
blocks.1.attn.qkv.weight       linear_4       lotion.blocks_1_attn_qkv_weight   int4           16  lotion
blocks.1.attn.proj.weight      linear_5       lotion.blocks_1_attn_proj_weight  int4           16  lotion
blocks.1.mlp.fc.weight         linear_6       lotion.blocks_1_mlp_fc_weight     int4           16  lotion
blocks.1.mlp.proj.weight       linear_7       lotion.blocks_1_mlp_proj_weight   int4           16  lotion
wte.weight (= lm_head.weight)  linear_8       lotion.wte_weight                 int4           16  lotion

Quantization
weight                     shape    blocks    scale range       mean var    RTN rel err    clamped    bytes fp    bytes export
-------------------------  -------  --------  ----------------  ----------  -------------  ---------  ----------  --------------
blocks.0.attn.qkv.weight   192x64   768       0.00305..0.0112   5.8e-06     0.0846         0          49152       9220
blocks.0.attn.proj.weight  64x64    256       0.00139..0.00535  1.51e-06    0.087          0          16384       3076
blocks.0.mlp.fc.weight     256x64   1024      0.0026..0.0115    5.79e-06    0.0853         0          65536       12292
blocks.0.mlp.proj.weight   64x256   1024      0.00116..0.00575  1.45e-06    0.0852         0          65536       12292
blocks.1.attn.qkv.weight   192x64   768       0.00255..0.0122   5.79e-06    0.0849         0          49152       9220
blocks.1.attn.proj.weight  64x64    256       0.00157..0.0058   1.5e-06     0.0863         0          16384       3076
blocks.1.mlp.fc.weight     256x64   1024      0.00226..0.0133   5.9e-06     0.0859         0          65536       12292
blocks.1.mlp.proj.weight   64x256   1024      0.0014..0.00594   1.45e-06    0.0852         0          65536       12292
wte.weight                 64x64    256       0.00323..0.0099   5.8e-06     0.085          0          16384       3076""")


def test_export_and_trace_agree() -> None:
    """Same layers, tied weight rewritten once, same statistics, whichever capture was used."""
    ids = torch.randint(0, 32, (2, 5))
    traced = lotion_fx.audit(lotion_fx.prepare(tied_mlp(), CFG))
    exported = lotion_fx.audit(tied_mlp(), config=CFG, example_inputs=(ids,))
    assert (traced.capture, exported.capture) == ("symbolic_trace", "export")
    assert [l.param for l in exported.layers] == ["fc1.weight", "fc2.weight", "emb.weight"]
    assert exported.layers[2].aliases == ["head.weight"]
    for a, b in zip(traced.layers, exported.layers):
        assert (a.shape, a.num_blocks, a.rtn_rel_error, a.bytes_export) == (b.shape, b.num_blocks, b.rtn_rel_error, b.bytes_export)


def test_layer_statistics_against_float64() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.logspace(-2, 1, 64)  # wide range: nvfp4's E4M3 scale rounding clamps some
    prepared = lotion_fx.prepare(nn.Sequential(nn.Linear(64, 8)), lotion_fx.LotionConfig(format="nvfp4"))
    with torch.no_grad():
        prepared.get_parameter("0.weight").copy_(w)
    (layer,) = lotion_fx.audit(prepared).layers
    w64 = w.double()
    q = lotion_fx.fake_quantize(w64, "nvfp4", 16)
    assert layer.num_blocks == 8 * 4
    assert math.isclose(layer.rtn_rel_error, float((w64 - q).norm() / w64.norm()), rel_tol=1e-12)
    assert math.isclose(layer.mean_variance, float(lotion_fx.rounding_variance(w64, "nvfp4", 16).mean()), rel_tol=1e-12)
    x = R.to_blocks(w64, 16) / R.block_scales(w64, "nvfp4", 16)  # scaled units; the grid ends at 6
    assert layer.frac_clamped == float((x.abs() > 6).double().mean()) > 0
    # 4-bit codes + one E4M3 byte per block + the fp32 tensor scale
    assert layer.bytes_export == 8 * 64 // 2 + 32 + 4 == export_bytes(512, 32, "nvfp4")
    assert layer.bytes_full == 8 * 64 * 4
    assert export_bytes(512, 16, "int4") == 256 + 16 * 4 and export_bytes(512, 16, "mxfp4") == 256 + 16


def test_sensitivity_estimate_ranks_like_measurement() -> None:
    """EMA-curvature estimate vs measured RTN loss increase per layer, on a trained model (2 seeds).

    Measured for README.md: Spearman 0.7 and 0.6 (seeds 0, 1); only its sign is asserted.
    """
    for seed in (0, 1):
        prepared = trained_deep_mlp(seed)
        before = {k: v.clone() for k, v in prepared.state_dict().items() if isinstance(v, torch.Tensor)}
        prepared.train()
        report = lotion_fx.audit(prepared, deep_mlp_data())
        # the audit leaves weights, curvature buffers, mode and .grad as they were
        after = prepared.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert prepared.training and all(p.grad is None for p in prepared.parameters())
        assert report.curvature_source == "ema"
        assert report.spearman is not None and report.spearman > 0, report.spearman
        assert report.measured_all > 0 and report.estimate_total > 0
        # the same ranking question answered from data alone (no curvature state)
        qat = lotion_fx.prepare(lotion_fx.original(prepared), lotion_fx.LotionConfig(method="qat", block_size=32))
        from_data = lotion_fx.audit(qat, deep_mlp_data())
        assert from_data.curvature_source == "data"
        assert [l.measured_increase for l in from_data.layers] == [l.measured_increase for l in report.layers]
        assert all(l.penalty_estimate > 0 for l in from_data.layers)


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties get average ranks
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


class Hidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


def test_zero_rewritten_layers_is_loud() -> None:
    with pytest.warns(RuntimeWarning, match="NO LINEAR WEIGHT WAS REWRITTEN"):
        report = lotion_fx.audit(Hidden())
    text = str(report)
    assert text.startswith("WARNING: NO LINEAR WEIGHT WAS REWRITTEN in Hidden")
    reasons = {s["param"]: s["reason"] for s in report.skipped}
    assert "inside leaf module MultiheadAttention" in reasons["attn.out_proj.weight"]
    assert "never called" in reasons["unused.weight"]
    # skipped by pattern: reported with the pattern
    report = lotion_fx.audit(lotion_fx.prepare(tied_mlp(), lotion_fx.LotionConfig(block_size=16, skip=("fc2",))))
    assert [s["reason"] for s in report.skipped] == ["skipped by pattern 'fc2'"]


def test_json_schema_is_stable() -> None:
    report = lotion_fx.audit(lotion_fx.prepare(tied_mlp(), CFG))
    d = json.loads(report.to_json())
    assert d["schema"] == "lotion_fx.audit/1"
    assert list(d) == ["schema", "model", "capture", "config", "summary", "warnings", "layers", "skipped", "graph_diff"]
    assert list(d["summary"]) == ["rewritten", "skipped", "bytes_full", "bytes_export", "curvature_source",
                                  "estimate_total", "base_loss", "measured_all", "spearman"]
    assert list(d["layers"][0]) == [
        "param", "aliases", "module", "smoother", "consumers", "shape", "dtype", "format", "block", "method",
        "num_blocks", "scale_min", "scale_max", "mean_variance", "rtn_rel_error", "frac_clamped",
        "bytes_full", "bytes_export", "bytes_ideal", "penalty_estimate", "measured_increase"]
    assert list(d["graph_diff"]) == ["inserted", "removed", "redirected"]
    assert d["layers"][2]["aliases"] == ["head.weight"] and d["layers"][0]["consumers"] == ["linear"]
    md = report.to_markdown()
    assert "| fc1.weight" in md and "```diff" in md


def test_bad_data_is_a_clear_error() -> None:
    prepared = lotion_fx.prepare(tied_mlp(), CFG)
    with pytest.raises(TypeError, match="loss_fn"):
        lotion_fx.audit(prepared, data=[1, 2, 3])
    with pytest.raises(ValueError, match="no batches"):
        lotion_fx.audit(prepared, data=([], lambda m, b: 0))


def test_bytes_export_is_what_convert_reports_per_layer() -> None:
    """One rule for how convert hands a weight to its owners (shared, Conv1D -> Linear, dequantized
    copy): the audit's bytes per layer equal convert's report, functional and (in, out) weights included."""
    from test_core_prepare import Forms

    for make in (Forms, tied_mlp):
        torch.manual_seed(0)
        prepared = lotion_fx.prepare(make(), CFG)
        expected = lotion_fx.audit(prepared).layers
        with pytest.warns(UserWarning, match="penalty never acted"):  # untrained: the warning is right
            converted = lotion_fx.conversion_report(lotion_fx.convert(prepared)).layers
        assert len(expected) == len(converted) == (6 if make is Forms else 3)
        for l, r in zip(expected, converted):  # convert names a tied weight by its Linear owner (head.weight)
            assert r.name in (l.param, *l.aliases) and r.bytes_after == l.bytes_export, (l.param, r.name)
