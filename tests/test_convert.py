"""lotion_fx.convert: torchao tensors built from our codes are bit-exact to quantized_eval, and round-trip."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lotion_fx
from examples.gpt import GPT, GPTConfig
from lotion_fx.backends import torchao_export as X
from lotion_fx.backends.packed_linear import PackedLinear

CFG = GPTConfig.preset("tiny", vocab_size=64, block_size=16)
# (format, block, torchao class) for every format whose weight-only linear torchao runs on CPU.
RUNNABLE = [
    ("int8", None, "Int8Tensor"),
    ("int8", 32, "IntxUnpackedToInt8Tensor"),
    ("int4", None, "IntxUnpackedToInt8Tensor"),
    ("int4", "tensor", "IntxUnpackedToInt8Tensor"),
    ("nvfp4", None, "NVFP4Tensor"),
    ("int8", None, X.PACKED),
    ("int4", None, X.PACKED),
    ("int4", "tensor", X.PACKED),
    ("nvfp4", None, X.PACKED),
    ("mxfp4", None, X.PACKED),
    ("mxfp4", "tensor", X.PACKED),
]


def _model_and_batch(seed: int = 0) -> tuple[GPT, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = GPT(CFG)
    with torch.no_grad():  # spread the weights so that blocks differ in scale, and zero one block
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(torch.exp(torch.randn(p.shape[0], 1)))
        model.blocks[0].mlp.fc.weight[:3, :32] = 0
    ids = torch.randint(0, CFG.vocab_size, (2, CFG.block_size))
    return model, ids[:, :-1], ids[:, 1:]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")


def _prepare(model: GPT, x: torch.Tensor, fmt: str, block, skip=()) -> nn.Module:
    cfg = lotion_fx.LotionConfig(method="qat", format=fmt, block_size=block, skip=skip)
    return lotion_fx.prepare(model, cfg, example_inputs=(x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "fmt,block,target",
    RUNNABLE + [("int8", "tensor", "Int8Tensor"), ("mxfp4", None, "MXTensor")],
)
def test_dequantized_weight_is_fake_quantize(fmt: str, block, target: str, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    w = (torch.randn(48, 128) * torch.exp(torch.randn(48, 1) * 3)).to(dtype)
    w[5, :64] = 0  # all-zero blocks stay exactly zero
    b = lotion_fx.reference.resolve_block(block, fmt, w.shape[-1])
    t = X.to_torchao(w, fmt, b, target)
    assert type(t).__name__ == target and t.shape == w.shape and t.dtype == dtype
    assert torch.equal(t.dequantize(), lotion_fx.fake_quantize(w, fmt, block, rounding="nearest"))
    assert X.nbytes(t) < X.nbytes(w)


@pytest.mark.parametrize("fmt,block,target", RUNNABLE)
def test_convert_matches_quantized_eval(fmt: str, block, target: str) -> None:
    model, x, y = _model_and_batch()
    prepared = _prepare(model, x, fmt, block, skip=("blocks.1.mlp.proj",))
    with lotion_fx.quantized_eval(prepared) as q:
        want = _loss(q, x, y).double()
        want_logits = q(x)
    fp = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    untouched = model.blocks[1].mlp.proj.weight

    deployed = lotion_fx.convert(prepared, formats={fmt: target})
    assert deployed is model and type(deployed) is GPT
    assert deployed.blocks[1].mlp.proj.weight is untouched  # skipped layer stays as it was
    for rec in lotion_fx.prepared_info(prepared).result.rewritten:
        for name in [rec.param_name, *rec.aliases]:
            owner = deployed.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, nn.Linear):
                w = owner.weight  # a PackedLinear holds it as buffers: not a Parameter
                assert type(w.data).__name__ == target, name
                assert torch.equal(w.dequantize(), lotion_fx.fake_quantize(fp[name], fmt, X.block_spec(rec.block))), name
    # Tied weight: lm_head is a Linear; wte (an Embedding) shares it or holds RTN(w) exactly.
    emb = deployed.wte.weight
    emb = emb.dequantize() if type(emb.data).__name__ == target else emb
    assert torch.equal(emb, deployed.lm_head.weight.dequantize())

    deployed.eval()
    with torch.no_grad():
        got = _loss(deployed, x, y).double()
        logits = deployed(x)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)

    report = lotion_fx.conversion_report(deployed)
    assert len(report.layers) == len(lotion_fx.prepared_info(prepared).result.rewritten)
    assert report.bytes_after < report.bytes_before
    assert report.bytes_before == sum(r.bytes_before for r in report.layers)
    assert "total" in str(report) and str(report.bytes_after) in str(report)


@pytest.mark.parametrize("fmt,block,target", [RUNNABLE[i] for i in (0, 2, 4, 6, 8, 9)])
def test_state_dict_round_trip(fmt: str, block, target: str, tmp_path) -> None:
    model, x, _ = _model_and_batch()
    deployed = lotion_fx.convert(_prepare(model, x, fmt, block), formats={fmt: target}).eval()
    with torch.no_grad():
        want = deployed(x)
    torch.save(deployed.state_dict(), tmp_path / "model.pt")

    fresh = GPT(CFG).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"), assign=True)  # weights_only=True default
    assert type(fresh.blocks[0].attn.qkv.weight.data).__name__ == target
    with torch.no_grad():
        assert torch.equal(fresh(x), want)

    # safetensors: our packed tensors as inner tensors + metadata, torchao's through its own flattening.
    pytest.importorskip("safetensors")
    X.save_safetensors(deployed.state_dict(), str(tmp_path / "model.safetensors"))
    restored = X.load_safetensors(str(tmp_path / "model.safetensors"))
    fresh = GPT(CFG).eval()
    fresh.load_state_dict(restored, assign=True)
    assert type(fresh.blocks[0].attn.qkv.weight.data).__name__ == target
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


def test_packed_linear_takes_checkpoints_and_compiles_on_plain_tensors(tmp_path) -> None:
    """convert's Linears keep codes and scales as plain buffers (a compiled forward unwraps no
    subclass), load another converted model's checkpoint, and refuse a float weight clearly."""
    model, x, _ = _model_and_batch(0)
    deployed = lotion_fx.convert(_prepare(model, x, "int4", None)).eval()
    assert isinstance(deployed.blocks[0].attn.qkv, PackedLinear)
    assert not any(isinstance(p, X.LotionPackedTensor) for m in deployed.modules() if isinstance(m, nn.Linear)
                   for p in m.parameters(recurse=False))
    with torch.no_grad():
        want = deployed(x)
        assert torch.equal(torch.compile(deployed, backend="aot_eager", fullgraph=True)(x), want)
    torch.save(deployed.state_dict(), tmp_path / "model.pt")

    other = lotion_fx.convert(_prepare(_model_and_batch(1)[0], x, "int4", None)).eval()
    with torch.no_grad():
        assert not torch.equal(other(x), want)
        other.load_state_dict(torch.load(tmp_path / "model.pt"))
        assert torch.equal(other(x), want)
    # a dtype cast changes the activations' dtype, never the stored scales
    scale = deployed.blocks[0].attn.qkv.scale.clone()
    want16 = deployed.blocks[0].attn.qkv.weight.dequantize().to(torch.bfloat16)
    other.to(torch.bfloat16)
    assert torch.equal(other.blocks[0].attn.qkv.scale, scale) and other.blocks[0].attn.qkv.bias.dtype == torch.bfloat16
    assert torch.equal(other.blocks[0].attn.qkv.weight.dequantize(), want16)
    other.float()
    bad = dict(deployed.state_dict(), **{"blocks.0.attn.qkv.weight": torch.zeros(3 * 64, 64)})
    with pytest.raises(RuntimeError, match="expected a LotionPackedTensor"):
        other.load_state_dict(bad)


def test_mxfp4_deploys_as_packed_e8m0_and_compiles() -> None:
    """mxfp4 (no torchao weight-only linear) deploys as LotionPackedTensor: E2M1 nibbles and one E8M0 byte per
    32 weights, 4.25 bits per weight; the E8M0 bits decode to torchao MXTensor's own scales, and the Inductor-
    compiled model computes what quantized_eval does."""
    model, x, y = _model_and_batch()
    prepared = _prepare(model, x, "mxfp4", None)
    with lotion_fx.quantized_eval(prepared) as q:
        want = q(x)
    deployed = lotion_fx.convert(prepared).eval()
    lin = deployed.blocks[0].mlp.fc
    assert isinstance(lin, PackedLinear) and lin.scale.dtype == torch.uint8
    assert lin.qdata.numel() + lin.scale.numel() == lin.weight.numel() * 17 // 32
    mx = X.to_torchao(lotion_fx.original(prepared).blocks[0].mlp.fc.weight, "mxfp4", 32, "MXTensor")
    assert torch.equal(lin.weight.dequantize(), mx.dequantize())
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(deployed)(x), want, rtol=1e-5, atol=1e-5)


def test_unsupported_layers_raise_before_any_change() -> None:
    model, x, _ = _model_and_batch()
    before = dict(model.named_parameters(remove_duplicate=False))
    prepared = _prepare(model, x, "mxfp4", None)
    with pytest.raises(ValueError, match=r"layer 'blocks.0.attn.qkv' \(format mxfp4, device cpu\).*MXTensor"):
        lotion_fx.convert(prepared, formats={"mxfp4": "MXTensor"})
    with pytest.raises(ValueError, match="unknown format names"):
        lotion_fx.convert(prepared, formats={"fp8": "Int8Tensor"})
    with pytest.raises(ValueError, match="cannot hold format 'mxfp4'"):
        lotion_fx.convert(prepared, formats={"mxfp4": "Int8Tensor"})
    assert all(p is before[n] for n, p in model.named_parameters(remove_duplicate=False))
    assert all(type(p) is nn.Parameter and type(p.data) is torch.Tensor for p in model.parameters())

    model64, x64, _ = _model_and_batch()
    model64.double()
    with pytest.raises(ValueError, match="float32/bfloat16/float16, not torch.float64"):
        lotion_fx.convert(_prepare(model64, x64, "int8", None))
    assert all(type(p.data) is torch.Tensor for p in model64.parameters())
    with pytest.raises(TypeError, match="not a prepared model"):
        lotion_fx.convert(model64)


class _MHAModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.mha = nn.MultiheadAttention(64, 4, batch_first=True)
        self.out = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.mha(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("fmt", ["int8", "int4", "nvfp4"])
def test_multihead_attention_converts_and_matches_quantized_eval(fmt: str) -> None:
    """F.multi_head_attention_forward reads out_proj.weight directly (aten.t): issue 12 item 9."""
    torch.manual_seed(0)
    model = _MHAModel().eval()
    x = torch.randn(2, 5, 32)
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(method="qat", format=fmt), example_inputs=(x,))
    with lotion_fx.quantized_eval(prepared) as q, torch.no_grad():
        want = q(x)
    deployed = lotion_fx.convert(prepared).eval()
    assert type(deployed.mha.out_proj.weight.data).__name__ == X.PACKED
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), want, rtol=1e-5, atol=1e-5)


def test_nvfp4_linear_on_noncontiguous_3d_input() -> None:
    """A converted nvfp4 Linear on an expanded / transposed 3-D input: issue 12 item 10."""
    model, x, _ = _model_and_batch()
    deployed = lotion_fx.convert(_prepare(model, x, "nvfp4", None)).eval()
    lin = deployed.blocks[0].mlp.fc
    wq = lin.weight.dequantize()
    h = torch.randn(1, 5, lin.in_features).expand(3, 5, lin.in_features)  # aten.expand, stride 0
    ht = torch.randn(5, 3, lin.in_features).transpose(0, 1)
    with torch.no_grad():
        for inp in (h, ht):
            want = (inp.double() @ wq.double().T + lin.bias.double())
            torch.testing.assert_close(lin(inp).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt, block, target, extra", [
    ("int8", "row", "Int8Tensor", 0), ("int8", 16, "Int8Tensor", 0), ("nvfp4", 16, "NVFP4Tensor", 0),
    ("nvfp4", 32, X.PACKED, 0), ("mxfp4", 32, "MXTensor", 0), ("mxfp4", 32, X.PACKED, 4),
    ("int4", 32, X.PACKED, 4),  # LotionPackedTensor keeps an fp32 tensor scale (1.0) for every format
])
def test_format_storage_facts_are_what_torchao_tensors_store(fmt, block, target, extra) -> None:
    """Format.bits / scale_bytes / tensor_scale_bytes (the audit's ideal size) against the bytes of
    the tensors torchao's own classes hold for the same weight; the target is one the format lists."""
    from lotion_fx import reference as R

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    f = lotion_fx.get_format(fmt)
    b = R.resolve_block(block, f, 64)
    assert target in f.torchao_targets and f.default_torchao_target == f.torchao_targets[0]
    ideal = f.export_bytes(w.numel(), R.block_scales(w, f, b).numel())
    assert X.nbytes(X.to_torchao(w, fmt, b, target)) == ideal + extra


@pytest.mark.parametrize("fmt", sorted(lotion_fx.FORMATS))
@pytest.mark.parametrize("block", [16, 0])
def test_needs_tensor_absmax_is_whether_other_rows_move_a_rows_scales(fmt, block) -> None:
    """Format.needs_tensor_absmax (what a row-sharded weight must all-reduce), checked by behaviour:
    does scaling up the other rows change row 0's block scales?"""
    from lotion_fx import reference as R

    torch.manual_seed(0)
    w = torch.randn(8, 64, dtype=torch.float64)
    louder = w.clone()
    louder[1:] *= 1000.0
    moved = not torch.equal(R.block_scales(w, fmt, block)[0], R.block_scales(louder, fmt, block)[0])
    assert lotion_fx.get_format(fmt).needs_tensor_absmax(block) == moved


@pytest.mark.parametrize("curvature", ["gn_sampled", "kfac_diag"])
def test_convert_warns_when_lotion_trained_without_its_curvature(curvature: str) -> None:
    """LOTION trained without lotion_fx.curvature_step never measures g: the penalty never acted and the
    export is PTQ's. convert says so, naming the missing call; with the call in the loop it says nothing."""
    def train(with_curvature_step: bool) -> nn.Module:
        model, x, y = _model_and_batch()
        cfg = lotion_fx.LotionConfig(curvature=curvature, format="int4")
        prepared = lotion_fx.prepare(model, cfg, example_inputs=(x,))
        opt = torch.optim.SGD(prepared.parameters(), lr=1e-3)
        for _ in range(2):
            if with_curvature_step:
                lotion_fx.curvature_step(prepared, x)
            _loss(prepared, x, y).backward()
            opt.step()
            opt.zero_grad()
        return prepared

    with pytest.warns(UserWarning, match=r"penalty never acted on \d+ of \d+ weights.*curvature_step"):
        lotion_fx.convert(train(with_curvature_step=False))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lotion_fx.convert(train(with_curvature_step=True))
    assert not [w for w in seen if "never acted" in str(w.message)]
