"""The curvature estimators against the exact Gauss-Newton diagonal (float64, torch.func), scale included.

The exact diagonal of the user's loss L = mean_n l(f_n(w), y_n) is (1/N) sum_n diag(J_n^T H_n J_n),
with J_n the per-example Jacobian of the model output in the weight (torch.func.jacrev under vmap)
and H_n the Hessian of l in the output. `gn_sampled` must converge to it (unbiased), with the
penalty switched off during its backward and no parameter or .grad touched.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import lotion_fx


class MLP(nn.Module):
    def __init__(self, d: int = 16, h: int = 32, out: int = 6) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def exact_gn_diag(model: nn.Module, x: torch.Tensor, name: str, loss: str) -> torch.Tensor:
    """diag of the GN matrix of the mean loss over all positions of x (rows of x.reshape(-1, d))."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    rows = x.reshape(-1, x.shape[-1])

    def out_fn(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, name: w}, (xi[None],))[0]

    jac = vmap(jacrev(out_fn), in_dims=(None, 0))(params[name], rows).flatten(2)  # (N, C, P)
    with torch.no_grad():
        out = model(rows)
    n, c = out.shape
    if loss == "cross_entropy":  # mean over the N positions; H = diag(p) - p p^T
        p = out.softmax(-1)
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("ncp,ncd,ndp->p", jac, hess, jac).reshape(params[name].shape) / n
    # F.mse_loss: mean over all N*C elements, H = 2/(N*C) per element
    return 2.0 * jac.square().sum((0, 1)).reshape(params[name].shape) / (n * c)


@pytest.mark.parametrize(
    "loss, shape, lam, fraction",
    [("cross_entropy", (48, 16), 1.0, 1.0), ("cross_entropy", (8, 6, 16), 1.0, 1.0), ("mse", (48, 16), 1.0, 1.0),
     ("cross_entropy", (48, 16), 1e6, 1.0),  # lam 1e6: a penalty leaking into the estimate would show
     ("cross_entropy", (8, 6, 16), 1.0, 0.3)],  # the pass on the first 3 of 8 sequences: their GN diagonal
    ids=["ce-2d", "ce-3d-tokens", "mse", "ce-penalty-off", "ce-3d-fraction"],
)
def test_gn_sampled_is_unbiased_for_the_exact_gn_diagonal(loss, shape, lam, fraction) -> None:
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(*shape, dtype=torch.float64)
    used = x[: math.ceil(fraction * shape[0])]
    exact = {n: exact_gn_diag(model, used, n, loss) for n in ("fc1.weight", "fc2.weight")}
    cfg = lotion_fx.LotionConfig(format="int4", block_size=16, lam=lam, curvature_every=1, beta=0.99,
                                 curvature_batch_fraction=fraction)
    prepared = lotion_fx.prepare(model, cfg)
    before = {n: p.detach().clone() for n, p in prepared.named_parameters()}
    for _ in range(300):
        lotion_fx.curvature_step(prepared, x, loss=loss)
    for name, sm in lotion_fx.smoothers(prepared).items():
        est = sm.g_hat(prepared.get_parameter(name)).double()
        ex = exact[name]
        # the scale: total curvature within 8% (300 refreshes at beta 0.99: ~200 effective samples)
        assert float(est.sum() / ex.sum()) == pytest.approx(1.0, abs=0.08), name
        # per weight, not just in total: typical relative error at the sampling noise (~0.1)
        rel = (est / ex - 1).abs()
        print(name, float(est.sum() / ex.sum()), float(rel.median()), float(rel.max()))
        assert float(rel.median()) < 0.15, name
    for n, p in prepared.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None, n


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sampled_cross_entropy_is_f_cross_entropy_at_labels_drawn_from_softmax(dtype) -> None:
    """Value and gradient are F.cross_entropy's (summed, / sqrt(N)) at the labels it drew, and the
    labels follow softmax(logits): frequencies over 6000 rows within 4 standard errors."""
    base = torch.tensor([2.0, 0.0, -1.0, 1.0, -3.0], dtype=torch.float64)
    logits = base.repeat(6000, 1).reshape(6, 1000, 5).to(dtype).requires_grad_()
    got = lotion_fx.sampled_target_loss(logits, "cross_entropy", torch.Generator().manual_seed(3))
    (g_got,) = torch.autograd.grad(2.0 * got, logits)
    flat = logits.detach().double().reshape(-1, 5)
    labels = g_got.reshape(-1, 5).argmin(-1)  # the one entry p - 1 < 0
    ref_in = flat.clone().requires_grad_()
    ref = F.cross_entropy(ref_in, labels, reduction="sum") / math.sqrt(6000)
    (g_ref,) = torch.autograd.grad(2.0 * ref, ref_in)
    tol = 1e-6 if dtype == torch.float64 else 1e-2
    assert float(got.detach()) == pytest.approx(float(ref), rel=1e-5)
    assert g_got.dtype == dtype and g_got.shape == logits.shape
    torch.testing.assert_close(g_got.double().reshape(-1, 5), g_ref, rtol=tol, atol=tol * 1e-3)
    p = flat[0].softmax(-1)
    freq = torch.bincount(labels, minlength=5).double() / 6000
    assert bool(((freq - p).abs() <= 4 * (p * (1 - p) / 6000).sqrt() + 1e-9).all()), (freq, p)
    again = lotion_fx.sampled_target_loss(logits, "cross_entropy", torch.Generator().manual_seed(3))
    assert torch.equal(torch.autograd.grad(again, logits)[0], g_got / 2)  # reproducible from the generator


# --------------------------------------------------------------------------- kfac_diag
class Conv1DMLP(nn.Module):
    """A GPT-2 Conv1D-style (in, out) weight used as addmm(bias, x, W), then an nn.Linear."""

    def __init__(self, d: int = 16, h: int = 32, out: int = 6) -> None:
        super().__init__()
        self.c_w = nn.Parameter(torch.randn(d, h) / d**0.5)
        self.c_b = nn.Parameter(torch.randn(h) * 0.1)
        self.fc2 = nn.Linear(h, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hid = torch.addmm(self.c_b, x.reshape(-1, x.shape[-1]), self.c_w).reshape(x.shape[:-1] + (-1,))
        return self.fc2(torch.tanh(hid))


def _kfac(model: nn.Module, x: torch.Tensor, loss: str, capture: str, refreshes: int = 300,
          **cfg: object) -> nn.Module:
    cfg = {"format": "int4", "block_size": 16, "curvature": "kfac_diag", "curvature_every": 1,
           "beta": 0.99, "curvature_batch_fraction": 1.0, **cfg}  # the exact references use every row
    kwargs = {"example_inputs": (x,)} if capture == "export" else {"capture": capture}
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(**cfg), **kwargs)
    for _ in range(refreshes):
        lotion_fx.curvature_step(prepared, x, loss=loss)
    return prepared


def _g_hat(prepared: nn.Module, name: str) -> torch.Tensor:
    return lotion_fx.smoothers(prepared)[name].g_hat(prepared.get_parameter(name)).double()


@pytest.mark.parametrize(
    "model_kind, loss, shape, capture",
    [("mlp", "cross_entropy", (48, 16), "fx"), ("mlp", "cross_entropy", (8, 6, 16), "dynamo"),
     ("mlp", "mse", (48, 16), "dynamo"), ("conv1d", "mse", (8, 6, 16), "export"),
     ("conv1d", "cross_entropy", (48, 16), "fx")],
    ids=["ce-2d-fx", "ce-3d-tokens-dynamo", "mse-dynamo", "conv1d-mse-3d-export", "conv1d-ce-fx"],
)
def test_kfac_diag_has_the_scale_of_the_exact_gn(model_kind, loss, shape, capture) -> None:
    """E[kfac_out_i] = sum_m E[delta_mi^2] is the exact GN diagonal of the Linear's *bias* (its
    gradient is sum_m delta_mi, rows uncorrelated), and kfac_in_j = mean_m x_mj^2 is deterministic:
    so g_ij = GN(bias)_i * mean_m x_mj^2 is an independent float64 reference for the estimator's
    scale, for any model. Against the exact GN of the weight only the factorisation differs."""
    torch.manual_seed(0)
    model = (MLP() if model_kind == "mlp" else Conv1DMLP()).double()
    x = torch.randn(*shape, dtype=torch.float64)
    rows = x.reshape(-1, 16)
    with torch.no_grad():
        if model_kind == "mlp":
            first = ("fc1.weight", "fc1.bias", model.fc1(rows))
        else:
            first = ("c_w", "c_b", torch.addmm(model.c_b, rows, model.c_w))
    inputs = {first[0]: rows, "fc2.weight": torch.tanh(first[2])}
    biases = {first[0]: first[1], "fc2.weight": "fc2.bias"}
    ref = {w: torch.outer(exact_gn_diag(model, x, b, loss), inputs[w].square().mean(0)) for w, b in biases.items()}
    exact = {w: exact_gn_diag(model, x, w, loss) for w in biases}
    prepared = _kfac(model, x, loss, capture)
    for name in biases:
        est = _g_hat(prepared, name)
        ex = exact[name].t() if name == "c_w" else exact[name]  # the smoother's (out, in) view
        assert est.shape == ex.shape == ref[name].shape, name
        rel = (est / ref[name] - 1).abs()
        print(name, "vs factored reference", float(est.sum() / ref[name].sum()), float(rel.median()),
              "| vs exact GN", float(est.sum() / ex.sum()), float((est / ex - 1).abs().median()))
        # only kfac_out is random: sum over N*out squared sampled gradients per refresh, ~200
        # effective refreshes at beta 0.99: the total's noise is ~1% and one row's ~2-4%
        assert float(est.sum() / ref[name].sum()) == pytest.approx(1.0, abs=0.03), name
        assert float(rel.median()) < 0.06, name
        # the factorisation (tanh' couples delta to x in the first layer) moves the total by a few %
        assert float(est.sum() / ex.sum()) == pytest.approx(1.0, abs=0.10), name


def test_kfac_diag_equals_the_exact_gn_diagonal_when_delta_is_independent_of_x() -> None:
    """A deep linear net under MSE: every delta is a fixed linear map of the sampled noise, so the
    factorisation is exact and kfac_diag converges to the exact GN diagonal weight by weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 6)).double()
    x = torch.randn(8, 6, 16, dtype=torch.float64) * torch.linspace(0.2, 2.0, 16, dtype=torch.float64)
    exact = {n: exact_gn_diag(model, x, n, "mse") for n in ("0.weight", "1.weight")}
    prepared = _kfac(model, x, "mse", "fx")
    for name, ex in exact.items():
        est = _g_hat(prepared, name)
        rel = (est / ex - 1).abs()
        print(name, float(est.sum() / ex.sum()), float(rel.median()), float(rel.max()))
        assert float(est.sum() / ex.sum()) == pytest.approx(1.0, abs=0.03), name
        assert float(rel.median()) < 0.06 and float(rel.max()) < 0.2, name


class TwiceUsed(nn.Module):
    """One Linear applied twice (a tied weight with two Linear consumers), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.fc(x)))


def test_kfac_diag_counts_every_use_of_a_tied_weight() -> None:
    """Both uses feed one smoother: kfac_in = mean of x^2 over the rows of both inputs, kfac_out =
    the sum of both uses' E[sum_m delta^2]; for a linear net under MSE (u ~ N(0, 2/(N C))) that is
    (2/C) * (||W_h[:, i]||^2 + ||(W_h W_f)[:, i]||^2), in closed form."""
    torch.manual_seed(0)
    model = TwiceUsed().double()
    x = torch.randn(48, 16, dtype=torch.float64)
    wf, wh = model.fc.weight.detach(), model.head.weight.detach()
    c = wh.shape[0]
    out_ref = 2.0 / c * (wh.square().sum(0) + (wh @ wf).square().sum(0))
    in_ref = torch.cat([x, x @ wf.t()]).square().mean(0)
    prepared = _kfac(model, x, "mse", "fx")
    est = _g_hat(prepared, "fc.weight")
    ref = torch.outer(out_ref, in_ref)
    print(float(est.sum() / ref.sum()), float((est / ref - 1).abs().median()))
    assert float(est.sum() / ref.sum()) == pytest.approx(1.0, abs=0.03)
    assert float((est / ref - 1).abs().median()) < 0.06
    assert len(lotion_fx.prepared_info(prepared).result.rewritten) == 2  # fc once, head once


class ScaledAddmm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(torch.zeros(8), x, self.w.t(), alpha=2.0)


def test_kfac_diag_names_a_layer_whose_input_it_cannot_see() -> None:
    model = ScaledAddmm()
    with pytest.raises(ValueError, match=r"'w'.*needs the Linear's input.*curvature='gn_sampled'"):
        lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16, curvature="kfac_diag"))
    assert not hasattr(model, "lotion")
    lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16))  # gn_sampled needs no input


@pytest.mark.parametrize("capture", ["fx", "dynamo"])
def test_kfac_diag_penalty_state_and_bytes(capture) -> None:
    """The training backward adds (lam/2) d/dw sum g_hat sigma^2 with g_hat = the outer product of
    the bias-corrected factors; outside curvature_step nothing is observed; the saved state is two
    fp32 vectors per layer; it survives a checkpoint round trip and a cast of the model."""
    from lotion_fx import reference as R

    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(32, 16, dtype=torch.float64)
    prepared = _kfac(model, x, "cross_entropy", capture, refreshes=3, lam=2.0, lam_warmup=0, beta=0.9)
    sm = lotion_fx.smoothers(prepared)["fc1.weight"]
    w = prepared.get_parameter("fc1.weight")
    corr = 1 - 0.9**3
    g_hat = torch.outer(sm.kfac_out, sm.kfac_in).double() / corr**2
    torch.testing.assert_close(sm.g_hat(w).double(), g_hat, rtol=1e-6, atol=0)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    (prepared(x) * 0).sum().backward()  # task gradient 0: w.grad is the penalty's alone
    wr = w.detach().clone().requires_grad_()  # float64 autograd of the penalty, through the scale too
    R.penalty_value(wr, g_hat, "int4", 16, 2.0).backward()
    torch.testing.assert_close(w.grad, wr.grad)
    assert float(w.grad.abs().max()) > 0
    for k, v in sm.state_dict().items():  # a training step observes nothing
        assert torch.equal(v, before[k]), k
    keys = {k.rpartition(".")[2] for k in prepared.state_dict() if "lotion" in k and "fc1" in k}
    assert keys == {"config_json", "lam_now", "steps", "kfac_in", "kfac_out", "count"}
    state_bytes = sum(sm.get_buffer(b).numel() * 4 for b in ("kfac_in", "kfac_out"))
    assert state_bytes / w.numel() == pytest.approx(4 * (16 + 32) / (16 * 32))  # 0.375 B/weight here
    fresh = lotion_fx.prepare(MLP().double(), prepared_config(prepared), capture=capture)
    fresh.load_state_dict(prepared.state_dict())
    torch.testing.assert_close(lotion_fx.smoothers(fresh)["fc1.weight"].g_hat(w), sm.g_hat(w))
    prepared.to(torch.bfloat16)
    assert sm.kfac_in.dtype == sm.kfac_out.dtype == sm.kfac_in_acc.dtype == torch.float32


def prepared_config(prepared: nn.Module) -> lotion_fx.LotionConfig:
    return lotion_fx.prepared_info(prepared).config


@pytest.mark.parametrize("curvature", ["gn_sampled", "kfac_diag"])
@pytest.mark.parametrize("capture", ["fx", "dynamo"])
def test_sampled_curvature_compiled_equals_eager(capture, curvature) -> None:
    """torch.compile (Inductor, CPU): our ops lower to generated code (no extern call), no graph
    break (two graphs: training, and the sampled pass, which holds no penalty op: its backward
    must see the task's curvature only), and the state and weights follow the eager run."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    eager = MLP()
    comp = copy.deepcopy(eager)
    x = torch.randn(32, 16)
    y = torch.randn(32, 6)
    cfg = lotion_fx.LotionConfig(block_size=16, curvature=curvature, curvature_every=2, lam_warmup=0)
    penalty_op = "lotion_smooth_factored" if curvature == "kfac_diag" else "lotion_smooth"
    runs, graphs = [], []

    def recording_inductor(gm, example_inputs):
        graphs.append({str(n.target).split("lotion_fx.")[1].split(".")[0]
                       for n in gm.graph.nodes if "lotion_fx." in str(n.target)})
        return compile_fx(gm, example_inputs)

    for model, compile_ in ((eager, False), (comp, True)):
        prepared = lotion_fx.prepare(model, cfg, capture=capture)
        step = torch.compile(prepared, backend=recording_inductor) if compile_ else prepared
        opt = torch.optim.SGD(prepared.parameters(), lr=0.1)

        def train() -> None:
            for _ in range(4):
                lotion_fx.curvature_step(step, x, loss="mse")
                F.mse_loss(step(x), y).backward()
                opt.step()
                opt.zero_grad()

        if compile_:
            _, codes = run_and_get_code(train)
            assert "torch.ops.lotion_fx" not in "\n".join(codes), "an op of ours fell back to an extern call"
            assert len(graphs) == 2, graphs
            assert sum(penalty_op in ops for ops in graphs) == 1, graphs  # the training graph only
        else:
            train()
        runs.append(prepared)
    for (n, a), (_, b) in zip(runs[0].state_dict().items(), runs[1].state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    assert int(lotion_fx.smoothers(runs[1])["fc2.weight"].count) == 2


def test_kfac_diag_on_gpt2_conv1d() -> None:
    """Hugging Face GPT-2 (Conv1D (in, out) weights, tied lm_head): every weight gets factors of its
    (out, in) view, finite and positive, and a training step with the penalty runs."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (2, 12))
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16, curvature="kfac_diag"),
                                 example_inputs=(ids,))
    lotion_fx.curvature_step(prepared, ids, output_fn=lambda out: out.logits)
    smooth = lotion_fx.smoothers(prepared)
    conv = [r for r in lotion_fx.prepared_info(prepared).result.rewritten if r.transposed]
    assert len(conv) == 8
    for rec in lotion_fx.prepared_info(prepared).result.rewritten:
        sm = smooth[rec.param_name]
        n_in, n_out = rec.shape if rec.transposed else rec.shape[::-1]
        assert sm.kfac_in.shape == (n_in,) and sm.kfac_out.shape == (n_out,), rec.param_name
        assert int(sm.count) == 1 and bool((sm.kfac_in > 0).all() and (sm.kfac_out > 0).all()), rec.param_name
    prepared(ids).logits.square().mean().backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None


def test_ema_is_a_batch_size_below_the_gn_diagonal_on_noisy_targets() -> None:
    """The old default's scale problem, pinned: squared batch-mean gradients of noisy labels sit
    about a batch size under the per-example GN diagonal (which gn_sampled gets right)."""
    torch.manual_seed(1)
    model = MLP().double()
    batch = 32
    cfg = lotion_fx.LotionConfig(format="int4", block_size=16, curvature="ema", beta=0.99, lam=0.0)
    prepared = lotion_fx.prepare(model, cfg)
    x_all = torch.randn(64 * batch, 16, dtype=torch.float64)
    with torch.no_grad():
        y_all = torch.multinomial(model(x_all).softmax(-1), 1).squeeze(-1)  # well specified: GN = Fisher
    for i in range(64):
        x, y = x_all[i * batch:(i + 1) * batch], y_all[i * batch:(i + 1) * batch]
        F.cross_entropy(prepared(x), y).backward()
        for p in prepared.parameters():
            p.grad = None
    exact = exact_gn_diag(model, x_all, "fc2.weight", "cross_entropy")
    ema = lotion_fx.smoothers(prepared)["fc2.weight"].g_hat(prepared.get_parameter("fc2.weight")).double()
    ratio = float(exact.sum() / ema.sum())
    assert batch / 3 < ratio < batch * 3


def test_lam_warmup_ramps_linearly_and_penalty_follows() -> None:
    torch.manual_seed(0)
    prepared = lotion_fx.prepare(MLP(), lotion_fx.LotionConfig(block_size=16, lam=2.0, lam_warmup=4, curvature_every=1))
    x = torch.randn(8, 16)
    lams = []
    for _ in range(6):
        lotion_fx.curvature_step(prepared, x)
        lams.append(float(lotion_fx.smoothers(prepared)["fc1.weight"].lam_now))
    assert lams == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    sm = lotion_fx.smoothers(prepared)["fc1.weight"]
    w = prepared.get_parameter("fc1.weight")
    var = lotion_fx.rounding_variance(w.detach(), "int4", 16)
    expected = 0.5 * 2.0 * float((sm.g_hat(w) * var).sum())
    assert float(sm.penalty(w)) == pytest.approx(expected, rel=1e-5)


def test_gn_sampled_needs_inputs_and_a_known_loss() -> None:
    prepared = lotion_fx.prepare(MLP(), lotion_fx.LotionConfig(block_size=16))
    with pytest.raises(ValueError, match="needs the step's inputs"):
        lotion_fx.curvature_step(prepared)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        lotion_fx.curvature_step(prepared, torch.randn(4, 16), loss="hinge")


def test_first_examples_cuts_only_the_batch_dimension() -> None:
    """The refresh's share of the batch: tensors whose leading dim is the batch size (that of the
    first tensor argument) lose their tail; others (a (1, T) position tensor, scalars, non-tensors)
    pass unchanged; at least one example is kept."""
    from lotion_fx.curvature import first_examples

    x, mask, pos = torch.randn(8, 5, 3), torch.ones(8, 5), torch.arange(5)[None]
    args, kw = first_examples((x, 2.0), {"attention_mask": mask, "position_ids": pos, "flag": True,
                                          "scale": torch.tensor(3.0)}, 0.25)
    assert args[0].shape == (2, 5, 3) and torch.equal(args[0], x[:2]) and args[1] == 2.0
    assert kw["attention_mask"].shape == (2, 5) and kw["position_ids"] is pos and kw["flag"] is True
    assert kw["scale"].dim() == 0
    assert first_examples((x[:1],), {}, 0.25)[0][0].shape[0] == 1  # ceil, never empty
    assert first_examples((x,), {}, 1.0)[0][0] is x
    assert first_examples((), {"input_ids": x}, 0.3)[1]["input_ids"].shape[0] == 3  # ceil(2.4)


def test_state_keeps_its_dtype_when_the_model_is_cast() -> None:
    """bf16 casts of the model must not cast the curvature (g * 0.999 == g in bf16)."""
    for curvature, dtype in (("ema", torch.float32), ("gn_sampled", torch.bfloat16)):
        prepared = lotion_fx.prepare(MLP(), lotion_fx.LotionConfig(block_size=16, curvature=curvature))
        prepared.to(torch.bfloat16)
        prepared.half()
        sm = lotion_fx.smoothers(prepared)["fc1.weight"]
        assert prepared.get_parameter("fc1.weight").dtype == torch.float16
        assert sm.g.dtype == dtype and sm.lam_now.dtype == torch.float32
        assert sm.count.dtype == torch.int64


def test_checkpoint_under_another_config_or_with_nan_curvature_is_refused() -> None:
    torch.manual_seed(0)
    a = lotion_fx.prepare(MLP(), lotion_fx.LotionConfig(format="int4", block_size=16, lam=1.0))
    lotion_fx.curvature_step(a, torch.randn(8, 16))
    sd = a.state_dict()
    b = lotion_fx.prepare(MLP(), lotion_fx.LotionConfig(format="int4", block_size=16, lam=0.5))
    with pytest.raises(ValueError, match=r"another config.*'lam': \(1\.0, 0\.5\)"):
        b.load_state_dict(sd)
    c = lotion_fx.prepare(MLP(), lotion_fx.LotionConfig(format="int4", block_size=16, lam=1.0))
    c.load_state_dict(sd)  # same config: fine, state carried
    assert torch.equal(lotion_fx.smoothers(c)["fc1.weight"].g, lotion_fx.smoothers(a)["fc1.weight"].g)
    bad = dict(sd)
    key = next(k for k in bad if k.endswith(".g"))
    bad[key] = bad[key].clone()
    bad[key].view(-1)[0] = math.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        c.load_state_dict(bad)
    # a checkpoint saved before scale_grad existed trained with the scales held constant
    old = dict(sd)
    for k in [k for k in old if k.endswith("config_json")]:
        rec = json.loads(bytes(old[k].tolist()).decode())
        del rec["scale_grad"]
        old[k] = torch.tensor(list(json.dumps(rec, sort_keys=True).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"another config.*'scale_grad': \(False, True\)"):
        c.load_state_dict(old)
    lotion_fx.prepare(MLP(), lotion_fx.LotionConfig(format="int4", block_size=16, scale_grad=False)).load_state_dict(old)


def test_bf16_stochastic_rounding_keeps_a_slow_ema_unbiased() -> None:
    """An EMA with increments far below half a bf16 ulp: round-to-nearest stalls, SR tracks fp64."""
    from lotion_fx import reference as R

    beta, target = 0.999, torch.full((4096,), 3.0, dtype=torch.float64)
    exact = torch.ones(4096, dtype=torch.float64)
    rtn = torch.ones(4096, dtype=torch.bfloat16)
    sr = torch.ones(4096, dtype=torch.bfloat16)
    for step in range(500):
        exact = beta * exact + (1 - beta) * target
        rtn = (beta * rtn.float() + (1 - beta) * target.float()).to(torch.bfloat16)
        sr = R.to_bfloat16_stochastic(beta * sr.float() + (1 - beta) * target.float(), 7, step)
    assert float(rtn.double().mean()) == 1.0  # stalled: every increment rounded away
    assert float(sr.double().mean()) == pytest.approx(float(exact.mean()), rel=2e-3)


def test_compiled_fold_is_the_eager_fold() -> None:
    """fold_sampled_all runs compiled on CUDA (one fused kernel per weight): same g as the eager fold
    (within one bf16 ulp, where a fused multiply-add moves the value before stochastic rounding), and
    every refresh still counted. Checked here through Inductor's CPU backend."""
    from lotion_fx.smoother import fold_sampled_all

    torch.manual_seed(0)
    prepared = lotion_fx.prepare(MLP(), lotion_fx.LotionConfig(format="int4", block_size=16))
    x = torch.randn(32, 16)
    lotion_fx.curvature_step(prepared, x)  # g holds one refresh
    eager, comp = copy.deepcopy(prepared), copy.deepcopy(prepared)
    grads = {n: torch.randn_like(p) for n, p in prepared.named_parameters() if n in lotion_fx.smoothers(prepared)}
    for model, compiled in ((eager, False), (comp, True)):
        sm = lotion_fx.smoothers(model)
        fold_sampled_all([(sm[n], g) for n, g in grads.items()], square=True, compiled=compiled)
    for n in grads:
        a, b = lotion_fx.smoothers(eager)[n], lotion_fx.smoothers(comp)[n]
        assert int(a.count) == int(b.count) == 2
        ulp = a.g.float().abs() * 2.0**-7
        assert bool(((a.g.float() - b.g.float()).abs() <= ulp).all()), n
        assert float((a.g != b.g).float().mean()) < 0.05, n  # the same noise: almost every value identical


def test_compiled_sampled_cross_entropy_is_the_eager_one() -> None:
    """On CUDA the sampled cross-entropy runs compiled (fused passes over the logits), on CPU eager in
    slices of rows: the same labels and, up to float reassociation, the same value and gradient as the
    whole eager computation (the compiled one checked through Inductor's CPU backend)."""
    from lotion_fx.curvature import _sampled_cross_entropy, _sampled_cross_entropy_in_slices

    logits = torch.randn(64, 37) * 2
    key = torch.tensor(12345)
    v0, g0 = _sampled_cross_entropy(logits, key)
    vs, gs = _sampled_cross_entropy_in_slices(logits, key, elements=37 * 5)  # the CPU path: 13 slices
    assert torch.equal(gs, g0)  # the same noise per logit, so the same labels and gradient
    torch.testing.assert_close(vs, v0, rtol=1e-6, atol=1e-6)
    v1, g1 = torch.compile(_sampled_cross_entropy, fullgraph=True)(logits, key)
    assert torch.equal(g0.argmin(-1), g1.argmin(-1))
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
