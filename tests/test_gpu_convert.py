"""lotion_fx.convert on CUDA: bit-exact dequantized weights, quantized_eval loss, torch.compile, round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lotion_fx
from examples.gpt import GPT
from lotion_fx.backends import torchao_export as X
from test_convert import CFG, RUNNABLE, _loss, _model_and_batch, _prepare

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt,block,target", RUNNABLE)
def test_cuda_convert_matches_quantized_eval(fmt: str, block, target: str, dtype: torch.dtype, tmp_path) -> None:
    model, x, y = _model_and_batch()
    model = model.to("cuda", dtype)
    x, y = x.cuda(), y.cuda()
    prepared = _prepare(model, x, fmt, block)
    with lotion_fx.quantized_eval(prepared) as q, torch.no_grad():
        want, want_logits = _loss(q, x, y).double(), q(x)
    fp = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    deployed = lotion_fx.convert(prepared, formats={fmt: target}).eval()
    for rec in lotion_fx.prepared_info(prepared).result.rewritten:
        for name in [rec.param_name, *rec.aliases]:
            owner, _, attr = name.rpartition(".")
            if isinstance(deployed.get_submodule(owner), nn.Linear):
                w = getattr(deployed.get_submodule(owner), attr)  # PackedLinear: a property, not a Parameter
                assert type(w.data).__name__ == target and w.device.type == "cuda"
                assert torch.equal(w.dequantize(), lotion_fx.fake_quantize(fp[name], fmt, X.block_spec(rec.block))), name
    with torch.no_grad():
        got, logits = _loss(deployed, x, y).double(), deployed(x)
        compiled = torch.compile(deployed)(x)
    # fp32: matmul rounding only. bf16: torchao's Int8Tensor applies the scale after the matmul
    # in bf16, one more bf16 rounding than quantized_eval's bf16(q * s) weight.
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(logits, want_logits, **tol)
    torch.testing.assert_close(compiled, logits, **tol)
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * 10)

    torch.save(deployed.state_dict(), tmp_path / "m.pt")
    fresh = GPT(CFG).to("cuda", dtype).eval()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"), assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), logits)
