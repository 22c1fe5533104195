"""prepare(): both captures, every Linear form, shared/tied parameters, skips, output structures, modes."""

import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lotion_fx
from lotion_fx.smoother import LotionSmoother

CFG = lotion_fx.LotionConfig(method="lotion", format="int4", block_size=16)
Pair = collections.namedtuple("Pair", ["out", "hidden"])


class Forms(nn.Module):
    """Every Linear form the pass must find, a tied head, and one weight used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 32)
        self.fc = nn.Linear(32, 32)
        self.w_lin = nn.Parameter(torch.randn(32, 32) / 6)
        self.w_mm = nn.Parameter(torch.randn(48, 32) / 6)
        self.w_addmm = nn.Parameter(torch.randn(32, 48) / 7)
        self.b_addmm = nn.Parameter(torch.zeros(32))
        self.head = nn.Linear(32, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.w_in_out = nn.Parameter(torch.randn(32, 32) / 6)  # an (in, out) matrix, as HF's Conv1D

    def forward(self, ids: torch.Tensor) -> Pair:
        h = self.emb(ids)
        h = torch.relu(self.fc(h))
        h = self.fc(h)  # second use of the same weight
        h = F.linear(h, self.w_lin)
        h = torch.matmul(h, self.w_mm.t())
        h = torch.addmm(self.b_addmm, h.reshape(-1, 48), self.w_addmm.t()).reshape(h.shape[:-1] + (32,))
        h = h @ self.w_in_out
        return Pair(self.head(h), h)


def smoother_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LotionSmoother)]


def test_symbolic_trace_rewrites_every_form_once_and_shares_parameters():
    torch.manual_seed(0)
    model = Forms()
    ids = torch.randint(0, 10, (3, 5))
    ref = model(ids)
    prepared = lotion_fx.prepare(model, CFG)
    info = lotion_fx.prepared_info(prepared)
    assert info.capture == "symbolic_trace" and lotion_fx.original(prepared) is model
    names = {"fc.weight", "w_lin", "w_mm", "w_addmm", "w_in_out", "head.weight"}
    assert set(lotion_fx.smoothers(prepared)) == names - {"head.weight"} | {"emb.weight"}
    # one smoothing node per parameter; the tied head weight is emb.weight, smoothed once
    calls = smoother_calls(prepared)
    assert len(calls) == 6 == len({n.target for n in calls})
    tied = next(r for r in info.result.rewritten if r.param_name == "emb.weight")
    assert tied.aliases == ["head.weight"]
    fc = next(r for r in info.result.rewritten if r.param_name == "fc.weight")
    assert len(fc.consumers) == 2
    # the (in, out) weight is smoothed as its transpose: blocks along in_features (dim 0)
    in_out = next(r for r in info.result.rewritten if r.param_name == "w_in_out")
    assert in_out.transposed and lotion_fx.smoothers(prepared)["w_in_out"].block == 16
    assert not any(r.transposed for r in info.result.rewritten if r.param_name != "w_in_out")
    # the Parameter objects are the model's own
    for name, p in model.named_parameters():
        assert prepared.get_parameter(name) is p
    assert prepared.get_parameter("head.weight") is model.emb.weight
    # lotion's forward is the full-precision weight: same output, same structure
    out = prepared(ids)
    assert type(out) is Pair and torch.equal(out.out, ref.out) and torch.equal(out.hidden, ref.hidden)
    # the embedding lookup still reads the raw weight, the tied head the smoothed one
    (emb_use,) = [n for n in prepared.graph.nodes if n.op == "call_module" and n.target == "emb"]
    assert all(a.op != "call_module" for a in emb_use.all_input_nodes)


def test_skip_patterns_and_training_reaches_the_original_module():
    torch.manual_seed(0)
    model = Forms()
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16, skip=("head", "w_*")))
    assert set(lotion_fx.smoothers(prepared)) == {"fc.weight"}  # w_in_out too is skipped by "w_*"
    reasons = {s.param_name: s.reason for s in lotion_fx.prepared_info(prepared).result.skipped}
    assert reasons["w_lin"] == "skipped by pattern 'w_*'" and "'head'" in reasons["emb.weight"]
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    prepared(torch.randint(0, 10, (2, 3))).out.square().mean().backward()
    opt.step()
    assert not torch.equal(model.fc.weight, before)


class Branchy(nn.Module):
    """Python control flow on a shape: symbolic tracing cannot capture it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.fc1(x)
        if x.shape[0] > 1:
            h = torch.relu(h)
        return {"out": self.fc2(self.drop(h)), "hidden": h}


def test_export_capture_when_tracing_fails_keeps_dict_output_and_dropout_mode():
    torch.manual_seed(0)
    model = Branchy()
    with pytest.raises(lotion_fx.passes.CaptureError, match="symbolic_trace failed on Branchy.*example_inputs"):
        lotion_fx.prepare(model, CFG)
    prepared = lotion_fx.prepare(model, CFG, example_inputs=(torch.randn(4, 16),))
    assert lotion_fx.prepared_info(prepared).capture == "export"
    assert set(lotion_fx.smoothers(prepared)) == {"fc1.weight", "fc2.weight"} and len(smoother_calls(prepared)) == 2
    for name, p in model.named_parameters():
        assert prepared.get_parameter(name) is p
    x = torch.randn(6, 16)  # another batch size than the example's
    # train mode: dropout active, same random stream as the eager model
    torch.manual_seed(1)
    a = prepared(x)
    torch.manual_seed(1)
    b = model(x)
    assert set(a) == {"out", "hidden"} and torch.equal(a["out"], b["out"])
    assert not torch.equal(a["out"], prepared(x)["out"])
    prepared.eval()
    model.eval()
    assert not prepared.training and torch.equal(prepared(x)["out"], model(x)["out"])
    assert torch.equal(prepared(x)["out"], prepared(x)["out"])
    prepared.train()
    assert prepared.training


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    aux: torch.Tensor


class DataclassOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> Output:
        y = self.fc(x) * scale
        return Output(y, y.sum())


def test_export_keeps_a_dataclass_output_and_kwargs():
    torch.manual_seed(0)
    if Output not in torch.utils._pytree.SUPPORTED_NODES:  # a test-local type: registering it changes nothing else
        torch.export.register_dataclass(Output)
    model = DataclassOut()
    x = torch.randn(3, 16)
    prepared = lotion_fx.prepare(model, CFG, example_inputs=((x,), {"scale": 2.0}))
    out = prepared(x, scale=2.0)
    assert isinstance(out, Output) and torch.equal(out.logits, model(x, 2.0).logits)


def test_hugging_face_model_output_tied_head_and_skip_lm_head():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
        tie_word_embeddings=True, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16, skip=("lm_head",)), example_inputs=(ids,))
    smoothed = set(lotion_fx.smoothers(prepared))
    assert len(smoothed) == 7 and not any("lm_head" in n or "embed" in n for n in smoothed)
    assert prepared.get_parameter("lm_head.weight") is model.model.embed_tokens.weight
    other = torch.randint(0, 64, (3, 5))
    out = prepared(other)
    assert type(out) is type(model(other)) and torch.equal(out.logits, model(other).logits)
    with lotion_fx.quantized_eval(prepared):
        q = prepared(other).logits
    assert not torch.equal(q, out.logits) and torch.isfinite(q).all()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("method", ["lotion", "qat"])
def test_autocast_cpu_bf16_matches_eager(method):
    torch.manual_seed(0)
    model = MLP()
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(method=method, block_size=16))
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prepared(x)
        if method == "qat":  # the weight is quantized in fp32, then autocast casts it for the matmul
            w1 = lotion_fx.fake_quantize(model.fc1.weight, "int4", 16)
            w2 = lotion_fx.fake_quantize(model.fc2.weight, "int4", 16)
            ref = F.linear(torch.relu(F.linear(x, w1, model.fc1.bias)), w2, model.fc2.bias)
        else:
            ref = model(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    out.float().sum().backward()
    assert model.fc1.weight.grad.dtype == torch.float32 and torch.isfinite(model.fc1.weight.grad).all()


class Planned(Forms):
    """Forms plus two Linear-like ops the plan must leave alone: a 3-D weight and x @ x^T."""

    def __init__(self) -> None:
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(1, 32, 32) / 6)

    def forward(self, ids: torch.Tensor) -> Pair:
        out = super().forward(ids)
        h = out.hidden
        scores = torch.softmax(h @ h.transpose(-1, -2), -1)
        return Pair(out.out, torch.matmul(h * scores.sum(-1, keepdim=True), self.w3))


def test_plan_lists_weights_and_skips_without_editing_and_apply_gives_the_rewrite():
    from lotion_fx import passes

    torch.manual_seed(0)
    model = Planned()
    gm = passes.symbolic_trace(model)
    code = gm.code
    plan = passes.plan_rewrite(gm, skip=("fc",))
    assert gm.code == code and not hasattr(gm, "lotion")  # planning edits nothing
    # in graph order; the tied head is emb.weight (its first name), the Conv1D-style weight transposed
    assert [(w.param_name, w.nodes, w.aliases, w.transposed) for w in plan.weights] == [
        ("w_lin", ["linear"], [], False), ("w_mm", ["matmul"], [], False), ("w_addmm", ["addmm"], [], False),
        ("w_in_out", ["matmul_1"], [], True), ("emb.weight", ["head"], ["head.weight"], False)]
    assert plan.weights[-1].smoother == "lotion.emb_weight" and plan.weights[1].shape == (48, 32)
    assert [(s.node, s.param_name, s.reason, s.warn) for s in plan.skipped] == [
        ("matmul_2", None, "weight operand is not fed by a parameter", False),  # attention scores
        ("fc", "fc.weight", "skipped by pattern 'fc'", False),
        ("fc_1", "fc.weight", "skipped by pattern 'fc'", False),
        ("matmul_3", "w3", "weight has shape (1, 32, 32), not 2-D", True)]

    # apply inserts exactly what the one-call pass does (the graph, the records), shapes (out, in)
    seen: list[tuple[str, tuple[int, ...]]] = []

    def resolve_block(name: str, w: torch.Tensor) -> int:
        seen.append((name, tuple(w.shape)))
        return 16

    def identity(*_: object) -> nn.Module:
        return nn.Identity()

    result = passes.apply_rewrite(gm, plan, resolve_block=resolve_block, make_smoother=identity)
    assert seen == [("", (32, 32)), ("", (48, 32)), ("", (32, 48)), ("", (32, 32)), ("emb", (10, 32))]
    assert [(r.param_name, r.consumers, r.block) for r in result.rewritten] == [
        ("w_lin", ["linear"], 16), ("w_mm", ["matmul"], 16), ("w_addmm", ["addmm"], 16),
        ("w_in_out", ["matmul_1"], 16), ("emb.weight", ["linear_1"], 16)]
    one_call = passes.symbolic_trace(model)
    with pytest.warns(UserWarning, match=r"left 1 Linear-like op\(s\) unquantized: matmul_3 .*w3"):
        expected = passes.insert_smoothing_nodes(one_call, skip=("fc",), resolve_block=lambda n, w: 16,
                                                 make_smoother=identity)
    assert gm.code == one_call.code and result == expected
    ids = torch.randint(0, 10, (3, 5))
    assert torch.equal(gm(ids).hidden, model(ids).hidden)
