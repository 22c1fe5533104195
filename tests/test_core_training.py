"""Training semantics of every method, checked against plain-torch float64 recomputations."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lotion_fx
from lotion_fx import reference as R


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


NAMES = ("fc1.weight", "fc2.weight")


def data(seed: int, n: int = 24, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=g, dtype=dtype), torch.randn(n, 16, generator=g, dtype=dtype)


def int4_penalty_grad(w: torch.Tensor, g_hat: torch.Tensor, lam: float, block: int) -> torch.Tensor:
    """d/dw (lam/2) sum g_hat sigma^2(w) for int4, by float64 autograd of int4_variance: the scale
    absmax/7 is differentiated too (LotionConfig.scale_grad, the default)."""
    w = w.detach().clone().requires_grad_()
    (0.5 * lam * (g_hat * int4_variance(w, block)).sum()).backward()
    return w.grad


def int4_variance(w: torch.Tensor, block: int) -> torch.Tensor:
    wb = w.reshape(w.shape[0], -1, block)
    s = wb.abs().amax(-1, keepdim=True) / 7
    m = (wb / s).abs()
    a = torch.floor(m)
    return (s**2 * (m - a) * (a + 1 - m)).clamp(min=0).reshape(w.shape)


def close(actual: torch.Tensor, expect: torch.Tensor) -> None:
    """g is stored in float32, so the penalty part carries float32 rounding: tolerance relative to the tensor."""
    torch.testing.assert_close(actual, expect, rtol=1e-6, atol=1e-6 * expect.abs().max().item())


def test_lotion_gradient_and_ema_match_float64_recomputation():
    torch.manual_seed(0)
    lam, cs, beta = 3.0, 200.0, 0.9
    model = MLP().double()
    plain = copy.deepcopy(model)
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(format="int4", block_size=16, lam=lam, curvature="ema",
                                                               curvature_scale=cs, beta=beta))
    sm = lotion_fx.smoothers(prepared)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    g_ref = {n: torch.zeros_like(model.get_parameter(n)) for n in NAMES}
    for step in range(4):
        x, y = data(step)
        F.mse_loss(prepared(x), y).backward()
        plain.load_state_dict(model.state_dict())
        plain.zero_grad()
        F.mse_loss(plain(x), y).backward()
        penalty_seen = False
        for n in NAMES:
            w, task = model.get_parameter(n).detach(), plain.get_parameter(n).grad
            # the penalty uses g from *before* this step's update, bias-corrected by its count
            g_hat = cs * g_ref[n] / (1 - beta**step) if step else torch.zeros_like(w)
            expect = task + int4_penalty_grad(w, g_hat, lam, 16)
            close(model.get_parameter(n).grad, expect)
            penalty_seen |= bool((expect - task).abs().max() > 1e-3 * task.abs().max())
            g_ref[n] = beta * g_ref[n] + (1 - beta) * task**2
            torch.testing.assert_close(sm[n].g.double(), g_ref[n], rtol=1e-6, atol=1e-12)
            assert sm[n].count.item() == step + 1
        assert penalty_seen == (step > 0)
        # penalty(prepared) is the float64 formula with the updated g
        want = sum((0.5 * lam * (cs * g_ref[n] / (1 - beta ** (step + 1)))
                    * int4_variance(model.get_parameter(n).detach(), 16)).sum() for n in NAMES)
        torch.testing.assert_close(lotion_fx.penalty(prepared).double(), want, rtol=1e-5, atol=0)
        opt.step()
        opt.zero_grad()


def test_grad_accumulation_splits_the_penalty_and_feeds_full_size_gradients_to_g():
    """k micro-batches of loss / k: each adds 1/k of the penalty (so it counts once per optimizer
    step) and folds its gradient, rescaled by k, into the EMA (one EMA update per micro-batch)."""
    torch.manual_seed(1)
    k, beta, lam, cs = 2, 0.5, 1.0, 100.0
    model = MLP().double()
    plain = copy.deepcopy(model)
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16, lam=lam, curvature_scale=cs, curvature="ema",
                                                               beta=beta, grad_accum_steps=k))
    sm = lotion_fx.smoothers(prepared)
    g_ref = {n: torch.zeros_like(model.get_parameter(n)) for n in NAMES}
    count = 0
    for opt_step in range(2):
        expect = {n: torch.zeros_like(g_ref[n]) for n in NAMES}
        for micro in range(k):
            x, y = data(10 * opt_step + micro, n=12)
            (F.mse_loss(prepared(x), y) / k).backward()
            plain.zero_grad()
            (F.mse_loss(plain(x), y) / k).backward()
            for n in NAMES:
                w, task = model.get_parameter(n).detach(), plain.get_parameter(n).grad
                g_hat = cs * g_ref[n] / (1 - beta**count) if count else torch.zeros_like(w)
                expect[n] += task + int4_penalty_grad(w, g_hat, lam, 16) / k
                g_ref[n] = beta * g_ref[n] + (1 - beta) * (k * task) ** 2
            count += 1
        for n in NAMES:
            close(model.get_parameter(n).grad, expect[n])
            torch.testing.assert_close(sm[n].g.double(), g_ref[n], rtol=1e-6, atol=1e-12)
        assert sm[NAMES[0]].count.item() == count
        model.zero_grad()  # no optimizer step: both micro-step sets see the same weights


def test_adam_curvature_reads_exp_avg_sq_after_attach():
    torch.manual_seed(2)
    lam, cs = 1.0, 500.0
    model = MLP().double()
    plain = copy.deepcopy(model)
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16, curvature="adam", lam=lam, curvature_scale=cs))
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2, betas=(0.9, 0.99))
    x, y = data(0)
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        prepared(x)
    lotion_fx.attach_optimizer(prepared, opt)
    assert not any(hasattr(s, "g") for s in lotion_fx.smoothers(prepared).values())  # no extra memory
    for step in range(3):
        x, y = data(step)
        F.mse_loss(prepared(x), y).backward()
        plain.load_state_dict(model.state_dict())
        plain.zero_grad()
        F.mse_loss(plain(x), y).backward()
        for n in NAMES:
            p = model.get_parameter(n)
            task = plain.get_parameter(n).grad
            if step == 0:  # the optimizer has no exp_avg_sq yet: no penalty
                torch.testing.assert_close(p.grad, task, rtol=1e-12, atol=0)
                continue
            st = opt.state[p]
            v_hat = st["exp_avg_sq"] / (1 - 0.99 ** st["step"].item())
            expect = task + int4_penalty_grad(p, cs * v_hat, lam, 16)
            close(p.grad, expect)
        opt.step()
        opt.zero_grad()
    with pytest.raises(TypeError, match="no 'betas'"):
        lotion_fx.attach_optimizer(prepared, torch.optim.SGD(prepared.parameters(), lr=0.1))


def test_qat_uses_rtn_forward_and_zeroes_the_gradient_of_clamped_entries():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    with torch.no_grad():  # mxfp4, one block per row: absmax 7.5 has scale 1, so |w| > 6 clamps
        model[0].weight.copy_(torch.tensor([[7.5, -6.5, 6.0, 3.3, -1.2, 0.26, 0.0, 2.2]] * 4) * torch.tensor([[1.0], [0.5], [2.0], [1.0]]))
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(method="qat", format="mxfp4", block_size=8))
    x = torch.randn(5, 8)
    out = prepared(x)
    w = model[0].weight.detach()
    wq = lotion_fx.fake_quantize(w, "mxfp4", 8).requires_grad_(True)
    ref = x @ wq.t()
    assert torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    clamped = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]] * 4, dtype=torch.bool)
    assert torch.all(model[0].weight.grad[clamped] == 0)
    assert torch.equal(model[0].weight.grad[~clamped], wq.grad[~clamped])


def test_lotion_sampled_is_seeded_and_fresh_each_step():
    torch.manual_seed(4)
    model = MLP()
    cfg = lotion_fx.LotionConfig(method="lotion_sampled", block_size=16, seed=7)
    a = lotion_fx.prepare(model, cfg)
    b = lotion_fx.prepare(copy.deepcopy(model), cfg)
    c = lotion_fx.prepare(copy.deepcopy(model), lotion_fx.LotionConfig(method="lotion_sampled", block_size=16, seed=8))
    x = data(0, dtype=torch.float32)[0]
    outs_a = [a(x) for _ in range(3)]
    outs_b = [b(x) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(outs_a, outs_b))  # same seed, same noise
    assert not torch.equal(outs_a[0], outs_a[1])  # fresh noise each step
    assert not torch.equal(c(x), outs_a[0])
    # the forward is SR(w) with counter-based noise keyed by (layer seed, step)
    sm = lotion_fx.smoothers(a)["fc1.weight"]
    w = model.fc1.weight.detach()
    sr = lotion_fx.fake_quantize(w, "int4", 16, "stochastic", seed=sm.seed, step=sm.step.item() + 1)
    h = F.linear(x, sr, model.fc1.bias)
    sr2 = lotion_fx.fake_quantize(model.fc2.weight.detach(), "int4", 16, "stochastic",
                                  seed=lotion_fx.smoothers(a)["fc2.weight"].seed, step=sm.step.item() + 1)
    assert torch.equal(a(x), F.linear(torch.tanh(h), sr2, model.fc2.bias))
    a(x).sum().backward()  # straight-through: gradient as if the weights were the sampled ones
    assert torch.isfinite(model.fc1.weight.grad).all()


def test_quantized_eval_restores_bit_exact_and_matches_fake_quantize():
    torch.manual_seed(5)
    model = MLP()
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(format="nvfp4"))
    x = data(0, dtype=torch.float32)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with lotion_fx.quantized_eval(prepared) as qm:
        assert qm is prepared and not prepared.training
        for n in NAMES:
            assert torch.equal(model.get_parameter(n), lotion_fx.fake_quantize(before[n], "nvfp4"))
        q_out = prepared(x)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n in NAMES:
            ref.get_parameter(n).copy_(lotion_fx.fake_quantize(before[n], "nvfp4"))
    assert torch.equal(q_out, ref(x))
    assert prepared.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(KeyError):
        with lotion_fx.quantized_eval(prepared):
            raise KeyError("boom")
    assert prepared.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _train(prepared, opt, steps, start):
    for step in range(start, start + steps):
        x, y = data(step, dtype=torch.float32)
        lotion_fx.curvature_step(prepared, x, loss="mse")
        F.mse_loss(prepared(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("curvature", ["gn_sampled", "ema"])
def test_state_dict_save_load_and_resume_is_identical(tmp_path, curvature):
    torch.manual_seed(6)
    cfg = lotion_fx.LotionConfig(block_size=16, curvature=curvature, curvature_every=2, lam_warmup=3)
    model = MLP()
    prepared = lotion_fx.prepare(model, cfg)
    keys = set(prepared.state_dict())
    assert set(model.state_dict()) <= keys
    assert {"lotion.fc1_weight.g", "lotion.fc1_weight.count", "lotion.fc2_weight.g",
            "lotion.fc1_weight.steps", "lotion.fc1_weight.lam_now"} <= keys
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-2)
    _train(prepared, opt, 3, 0)
    torch.save({"model": prepared.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(prepared, opt, 2, 3)  # never stopping

    torch.manual_seed(123)  # a different init, overwritten by the checkpoint
    resumed = lotion_fx.prepare(MLP(), cfg)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, 2, 3)
    assert prepared.state_dict().keys() == resumed.state_dict().keys()
    for k, v in prepared.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed.state_dict()[k]), k
    assert float(lotion_fx.penalty(prepared)) > 0


@pytest.mark.parametrize("curvature", ["ema", "gn_sampled"])
def test_compiled_fullgraph_matches_eager(curvature):
    torch.manual_seed(7)
    cfg = lotion_fx.LotionConfig(block_size=16, curvature=curvature, curvature_every=1,
                                 curvature_scale=100.0 if curvature == "ema" else 1.0)
    model = MLP()
    eager = lotion_fx.prepare(model, cfg)
    twin = copy.deepcopy(model)
    compiled = torch.compile(lotion_fx.prepare(twin, cfg), fullgraph=True)
    for step in range(2):  # ema: step 0 fills g, step 1 applies the penalty; gn_sampled: both apply it
        x, y = data(step, dtype=torch.float32)
        lotion_fx.curvature_step(eager, x, loss="mse")
        lotion_fx.curvature_step(compiled, x, loss="mse")
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        F.mse_loss(out_e, y).backward()
        F.mse_loss(out_c, y).backward()
        for n in NAMES:
            torch.testing.assert_close(twin.get_parameter(n).grad, model.get_parameter(n).grad, rtol=1e-4, atol=1e-6)
    for n in NAMES:
        ge = lotion_fx.smoothers(eager)[n].g
        gc = lotion_fx.smoothers(compiled._orig_mod)[n].g
        torch.testing.assert_close(gc.float(), ge.float(), rtol=1e-2 if curvature == "gn_sampled" else 1e-4, atol=1e-10)
        assert lotion_fx.smoothers(compiled._orig_mod)[n].count.item() == 2


def test_qat_finish_switches_to_rtn_forward_and_stops_the_refresh(tmp_path):
    """qat_from_step=k: k steps of LOTION (identity forward, penalty in the backward, g refreshed), then the
    forward is RTN(w) with a straight-through backward and g is frozen; a checkpoint past k resumes in QAT."""
    torch.manual_seed(9)
    k = 3
    cfg = lotion_fx.LotionConfig(block_size=16, curvature_every=1, lam_warmup=0, qat_from_step=k)
    model = MLP()
    prepared = lotion_fx.prepare(model, cfg)
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    sm = lotion_fx.smoothers(prepared)["fc1.weight"]
    for step in range(k + 2):
        x, y = data(step, dtype=torch.float32)
        refreshed = lotion_fx.curvature_step(prepared, x, loss="mse")
        assert refreshed == (step < k)
        w1, w2 = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
        if step < k:  # LOTION: full-precision forward, the task gradient plus the penalty's
            q1, q2 = w1, w2
        else:  # QAT: RTN forward, the gradient at the rounded weights goes to w unchanged (no clamping in int4)
            q1, q2 = R.fake_quantize(w1, "int4", 16), R.fake_quantize(w2, "int4", 16)
        q1, q2 = q1.clone().requires_grad_(), q2.clone().requires_grad_()
        ref = F.linear(torch.tanh(F.linear(x, q1, model.fc1.bias)), q2, model.fc2.bias)
        out = prepared(x)
        assert torch.equal(out, ref.detach())
        F.mse_loss(out, y).backward()
        F.mse_loss(ref, y).backward()
        expect = q1.grad
        if step < k:
            expect = expect + int4_penalty_grad(w1.double(), sm.g_hat(w1).double(), 1.0, 16).float()
            close(model.fc1.weight.grad, expect)
        else:
            assert torch.equal(model.fc1.weight.grad, expect)
        opt.step()
        opt.zero_grad()
    assert int(sm.count) == k and int(sm.steps) == k + 2
    torch.save(prepared.state_dict(), tmp_path / "ckpt.pt")
    # qat_from_step is the loop's business: a checkpoint resumes under another value, and the phase follows
    # the loaded step count
    for q, phase in ((k, True), (100, False)):
        resumed = lotion_fx.prepare(MLP(), lotion_fx.LotionConfig(block_size=16, curvature_every=1, lam_warmup=0,
                                                                  qat_from_step=q))
        resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
        assert lotion_fx.smoothers(resumed)["fc1.weight"].qat_phase is phase
    with pytest.raises(ValueError, match="qat_from_step switches a method='lotion' run"):
        lotion_fx.LotionConfig(method="qat", qat_from_step=10)
    with pytest.raises(ValueError, match="qat_from_step must be None or an int >= 0"):
        lotion_fx.LotionConfig(qat_from_step=-1)


def test_qat_finish_under_torch_compile_switches_once():
    """The switch is a host bool flipped once: the compiled model recompiles at step k and then rounds."""
    torch.manual_seed(10)
    k = 2
    model = MLP()
    compiled = torch.compile(lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16, qat_from_step=k)),
                             backend="aot_eager", fullgraph=True)
    for step in range(k + 2):
        x, _ = data(step, dtype=torch.float32)
        lotion_fx.curvature_step(compiled, x, loss="mse")
        w1, w2 = model.fc1.weight.detach(), model.fc2.weight.detach()
        if step >= k:
            w1, w2 = R.fake_quantize(w1, "int4", 16), R.fake_quantize(w2, "int4", 16)
        ref = F.linear(torch.tanh(F.linear(x, w1, model.fc1.bias)), w2, model.fc2.bias)
        torch.testing.assert_close(compiled(x), ref, rtol=0, atol=1e-6)
