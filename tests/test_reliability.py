"""Issue 12 (first-hour reliability): dropout follows the mode, Conv1D weights, deepcopy/pickle,
meta models, non-finite weights, block_size=0."""

import copy
import io
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` without install

import lotion_fx  # noqa: E402
from lotion_fx import reference as R  # noqa: E402
from lotion_fx.checks import check_finite_weights, non_finite_summary  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

QAT = lotion_fx.LotionConfig(method="qat", format="int4", block_size=16)


def _mode_checks(prepared: nn.Module, call) -> None:
    """eval and quantized_eval are deterministic; train mode still drops."""
    prepared.eval()
    torch.manual_seed(1)
    a = call(prepared)
    torch.manual_seed(2)
    assert torch.equal(a, call(prepared))
    with lotion_fx.quantized_eval(prepared) as q:
        torch.manual_seed(1)
        b = call(q)
        torch.manual_seed(2)
        assert torch.equal(b, call(q))
    prepared.train()
    torch.manual_seed(1)
    c = call(prepared)
    torch.manual_seed(2)
    assert not torch.equal(c, call(prepared))
    assert not torch.equal(c, a)


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_gpt_dropout_follows_train_and_eval(capture):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", dropout=0.1, vocab_size=64, block_size=16))
    ids = torch.randint(0, 64, (2, 16))
    prepared = lotion_fx.prepare(model, QAT, None if capture == "symbolic_trace" else (ids,))
    _mode_checks(prepared, lambda m: m(ids))
    # eval output equals the original model's eval output (dropout off, qat's node off in eval)
    prepared.eval()
    model.eval()
    torch.testing.assert_close(prepared(ids), model(ids), rtol=0, atol=0)


class Dropouts(nn.Module):
    """Functional dropout following the mode, and one that is always on (MC dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.dropout(self.fc(x), 0.5, training=self.training)
        return h, F.dropout(h, 0.5, training=True)


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_functional_dropout_follows_mode_and_always_on_dropout_stays_on(capture):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    model = Dropouts().eval()  # captured from eval mode: train() must still drop
    prepared = lotion_fx.prepare(model, QAT, None if capture == "symbolic_trace" else (x,))
    _mode_checks(prepared, lambda m: m(x)[0])
    prepared.eval()
    h, always = prepared(x)
    assert torch.equal(h, model.fc(x)) and (always == 0).any()  # the literal training=True stays


transformers = pytest.importorskip("transformers")


def _tiny_bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg)


def _tiny_gpt2(dropout: float = 0.1) -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("make,out", [(_tiny_bert, "last_hidden_state"), (_tiny_gpt2, "logits")])
def test_hugging_face_dropout_follows_train_and_eval(make, out):
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    prepared = lotion_fx.prepare(make().train(), QAT, example_inputs=(ids,))
    _mode_checks(prepared, lambda m: getattr(m(ids), out))


def _rtn_in_out(w: torch.Tensor) -> torch.Tensor:
    """Independent reference for an (in, out) weight: RTN blocks of 16 along dim 0, in float64."""
    wt = w.detach().double().t()
    s = wt.reshape(wt.shape[0], -1, 16).abs().amax(-1, keepdim=True) / 7
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(wt.reshape(wt.shape[0], -1, 16) / s), -7, 7) * s
    return q.reshape(wt.shape).t().to(w.dtype)


def test_gpt2_conv1d_weights_are_smoothed_along_their_input_dim():
    torch.manual_seed(0)
    model = _tiny_gpt2(dropout=0.0)
    ids = torch.randint(0, 64, (2, 12))
    ref = copy.deepcopy(model).eval()
    prepared = lotion_fx.prepare(model, QAT, example_inputs=(ids,))
    info = lotion_fx.prepared_info(prepared)
    conv = [r for r in info.result.rewritten if r.transposed]
    assert len(conv) == 8 and all(".c_" in r.param_name for r in conv)  # c_attn, c_proj, c_fc per layer
    sm = lotion_fx.smoothers(prepared)["transformer.h.0.mlp.c_fc.weight"]
    assert tuple(model.transformer.h[0].mlp.c_fc.weight.shape) == (32, 128)
    assert sm.block == 16
    # qat's forward in train mode uses RTN of every weight: equal to the reference model with
    # its weights replaced by their RTN (Conv1D ones blocked along dim 0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            rec = next((r for r in info.result.rewritten if name in (r.param_name, *r.aliases)), None)
            if rec is not None and rec.transposed:
                p.copy_(_rtn_in_out(p))
    # the tied head reads RTN(wte), the embedding lookup the full-precision table
    ref.lm_head.weight = nn.Parameter(R.fake_quantize(ref.transformer.wte.weight.detach(), "int4", 16))
    got = prepared.train()(ids).logits
    torch.testing.assert_close(got, ref(ids).logits, rtol=1e-5, atol=1e-5)
    got.square().mean().backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_gpt2_quantized_eval_quantizes_conv1d_along_the_input_dim():
    torch.manual_seed(0)
    model = _tiny_gpt2()
    ids = torch.randint(0, 64, (2, 12))
    prepared = lotion_fx.prepare(model, QAT, example_inputs=(ids,))
    w = model.transformer.h[0].mlp.c_fc.weight
    ref = _rtn_in_out(w.detach())  # float64 math: equal up to the last fp32 bit
    wrong_dim = lotion_fx.fake_quantize(w.detach(), "int4", 16)  # blocks along the output dim
    with lotion_fx.quantized_eval(prepared):
        torch.testing.assert_close(w.detach(), ref, rtol=3e-7, atol=1e-9)
        assert not torch.allclose(w.detach(), wrong_dim, rtol=1e-3, atol=1e-5)


class HiddenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.fc(x), self.w * 2.0)  # the weight is computed: not rewritable


def test_skipped_linear_ops_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"linear \(call_function linear, weight -\): weight is not fed"):
        lotion_fx.prepare(HiddenLinear(), QAT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skip the user asked for is not warned about
        lotion_fx.prepare(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)),
                          lotion_fx.LotionConfig(block_size=16, skip=("1",)))


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_deepcopy_and_pickle_keep_the_prepared_state(capture):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 16))
    x = torch.randn(3, 32)
    prepared = lotion_fx.prepare(model, QAT, None if capture == "symbolic_trace" else (x,)).eval()
    buf = io.BytesIO()
    torch.save(prepared, buf)
    buf.seek(0)
    for other in (copy.deepcopy(prepared), torch.load(buf, weights_only=False)):
        assert lotion_fx.is_prepared(other)
        orig = lotion_fx.original(other)
        assert orig is not model and other.get_parameter("0.weight") is orig[0].weight  # still shared
        assert other.get_parameter("0.weight") is not model[0].weight
        assert lotion_fx.prepared_info(other).config == QAT
        torch.testing.assert_close(other(x), prepared(x), rtol=0, atol=0)
        other.train()
        assert not torch.equal(other(x), other(x))  # the copy's dropout follows its own mode
        other.eval()
        with pytest.raises(ValueError, match="already prepared"):
            lotion_fx.prepare(other, QAT)
        with lotion_fx.quantized_eval(other) as q:
            expected = q(x)
        deployed = lotion_fx.convert(other).eval()
        assert deployed is orig
        torch.testing.assert_close(deployed(x), expected, rtol=1e-5, atol=1e-5)


def test_meta_device_model_is_a_clear_error_and_left_untouched():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"'0.weight'.*meta device.*to_empty"):
        lotion_fx.prepare(model, QAT)
    assert not hasattr(model, "lotion") and model[0].weight.is_meta


def test_block_size_zero_is_rejected():
    with pytest.raises(ValueError, match=r"positive int.*got 0.*block_size='tensor'"):
        lotion_fx.LotionConfig(block_size=0)
    assert R.resolve_block("tensor", "int4", 32) == R.PER_TENSOR


def test_non_finite_weights_are_named_and_refused():
    w = torch.randn(8, 32)
    assert non_finite_summary(w) is None and non_finite_summary(torch.empty(8, 32, device="meta")) is None
    bad = w.clone()
    bad[0, 3] = float("nan")
    bad[5, 1] = float("inf")
    bad[6, 2] = -float("inf")
    assert non_finite_summary(bad) == "1 NaN and 2 Inf of 256 values"
    check_finite_weights([("fc", w)], "lotion_fx.convert")
    with pytest.raises(ValueError, match=r"(?s)lotion_fx.convert refused.*layer 'head': weight has 1 NaN and 2 Inf"):
        check_finite_weights([("fc", w), ("head", bad)], "lotion_fx.convert")


def test_convert_refuses_nan_weights_and_the_handle_refuses_to_run_after_convert():
    """Item 2: a diverged run must not deploy as finite codes. Item 7: after convert the prepared
    handle shares frozen torchao weights, so running it is an error, not a silent no-op."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    prepared = lotion_fx.prepare(model, QAT)
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    before = model[2].weight.detach().clone()
    with pytest.raises(ValueError, match=r"(?s)lotion_fx.convert refused.*layer '2': weight has 1 NaN"):
        lotion_fx.convert(prepared)
    assert type(model[2].weight) is nn.Parameter and torch.equal(model[2].weight.isnan(), before.isnan())
    with torch.no_grad():
        model[2].weight[1, 3] = 0.0
    x = torch.randn(3, 32)
    deployed = lotion_fx.convert(prepared)
    assert torch.isfinite(deployed(x)).all()
    with pytest.raises(RuntimeError, match="converted by lotion_fx.convert"):
        prepared(x)
