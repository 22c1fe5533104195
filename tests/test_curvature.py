"""The curvature estimators against the exact Gauss-Newton diagonal (float64, torch.func), scale included.

The exact diagonal of the user's loss L = mean_n l(f_n(w), y_n) is (1/N) sum_n diag(J_n^T H_n J_n),
with J_n the per-example Jacobian of the model output in the weight (torch.func.jacrev under vmap)
and H_n the Hessian of l in the output. `gn_sampled` must converge to it (unbiased), with the
penalty switched off during its backward and no parameter or .grad touched.
"""

from __future__ import annotations

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
    "loss, shape, lam",
    [("cross_entropy", (48, 16), 1.0), ("cross_entropy", (8, 6, 16), 1.0), ("mse", (48, 16), 1.0),
     ("cross_entropy", (48, 16), 1e6)],  # lam 1e6: a penalty leaking into the estimate would show
    ids=["ce-2d", "ce-3d-tokens", "mse", "ce-penalty-off"],
)
def test_gn_sampled_is_unbiased_for_the_exact_gn_diagonal(loss, shape, lam) -> None:
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(*shape, dtype=torch.float64)
    exact = {n: exact_gn_diag(model, x, n, loss) for n in ("fc1.weight", "fc2.weight")}
    cfg = lotion_fx.LotionConfig(format="int4", block_size=16, lam=lam, curvature_every=1, beta=0.99)
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
