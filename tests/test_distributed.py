"""Data-parallel equivalence on CPU/gloo: 1 process with the full batch == 2 processes with half each.

One spawn of 2 processes runs every case (DDP and FSDP2; lotion, lotion_sampled, qat; grad
accumulation; torch.compile) and saves the gathered full state dict of each; the tests compare
them with single-process training in this process.
"""
from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lotion_fx
from lotion_fx import distributed as D
from lotion_fx import reference as R

STEPS, BATCH = 3, 8

# name -> (mode, LotionConfig kwargs, torch.compile: None | "before" wrap | "after" wrap)
CASES = {
    "ddp-lotion-int4-compiled": ("ddp", dict(method="lotion", format="int4", block_size=16), "after"),
    "ddp-lotion-accum2": ("ddp", dict(method="lotion", format="int4", block_size=16, grad_accum_steps=2), None),
    "ddp-lotion-accum2-sync-all": ("ddp", dict(method="lotion", format="int4", block_size=16, grad_accum_steps=2), None),
    "fsdp-lotion-accum2": ("fsdp", dict(method="lotion", format="int4", block_size=16, grad_accum_steps=2), None),
    "ddp-lotion_sampled": ("ddp", dict(method="lotion_sampled", format="int4", block_size=16), None),
    "ddp-qat": ("ddp", dict(method="qat", format="int4", block_size=16), None),
    "fsdp-lotion-nvfp4": ("fsdp", dict(method="lotion", format="nvfp4"), None),
    "fsdp-lotion-int8-tensor": ("fsdp", dict(method="lotion", format="int8", block_size="tensor"), None),
    "fsdp-lotion_sampled": ("fsdp", dict(method="lotion_sampled", format="nvfp4"), None),
    "fsdp-qat": ("fsdp", dict(method="qat", format="int4", block_size=16), None),
}


class Net(nn.Module):
    # 5 output rows shard unevenly (3 + 2) under FSDP2.
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _config(kw: dict) -> lotion_fx.LotionConfig:
    # Large enough that the penalty moves weights far beyond the tolerance, small enough that 3
    # steps do not pile weights onto grid points, where the penalty gradient jumps (an ulp of
    # reduction-order difference there would flip it).
    return lotion_fx.LotionConfig(curvature="ema", curvature_scale=100.0, beta=0.9, seed=3, **kw)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 32, generator=g), torch.randn(BATCH, 5, generator=g)


def _fresh(kw: dict) -> nn.Module:
    torch.manual_seed(0)
    return lotion_fx.prepare(Net(), _config(kw))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, accum: int = 1, skip_sync: bool = True) -> None:
    """STEPS SGD steps; with accum > 1 the first micro-batches skip the gradient sync (if skip_sync)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(STEPS):
        for i, (xb, yb) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
            sync = i == accum - 1 or not skip_sync
            ctx = contextlib.nullcontext()
            if hasattr(model, "no_sync") and not sync:  # DDP
                ctx = model.no_sync()
            if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
                model.set_requires_gradient_sync(sync)
            with ctx:
                (nn.functional.mse_loss(model(xb), yb) / accum).backward()
        opt.step()
        opt.zero_grad()


def run_cases(rank: int, device: torch.device) -> dict:
    """Train every case on this rank's half of the batch; rank 0 gets the gathered state dicts."""
    x, y = (t.to(device) for t in _data())
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    results = {}
    for name, (mode, kw, compiled) in CASES.items():
        prepared = _fresh(kw).to(device)
        model = D.wrap(torch.compile(prepared) if compiled == "before" else prepared, mode)
        if mode == "fsdp" and kw["method"] == "lotion":  # g is held as the shard matching the weight's
            for pname, sm in lotion_fx.smoothers(prepared).items():
                assert sm.g.to_local().shape == prepared.get_parameter(pname).to_local().shape
                assert sm.g.to_local().shape[0] == ((3, 2)[rank] if pname == "fc2.weight" else 24)
        train_model = torch.compile(model) if compiled == "after" else model
        _train(train_model, x[half], y[half], kw.get("grad_accum_steps", 1), "sync-all" not in name)
        results[name] = D.full_state_dict(model)
        assert (results[name] == {}) == (rank != 0)
    results.update(_plain_ddp(rank, device, x[half], y[half]))
    results.update(_fsdp_sampled(rank, device, x[half], y[half]))
    return results


GN_CFG = dict(block_size=16, curvature_every=1, lam_warmup=0, seed=3, curvature_batch_fraction=1.0)  # references use every row


def _fsdp_sampled(rank: int, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The sampled-target curvatures under lotion_fx.distributed.wrap(..., "fsdp"): gn_sampled's g after
    the first refresh and after STEPS steps on each rank, the gathered full state of both."""
    out = {}
    for curvature in ("gn_sampled", "kfac_diag"):
        out.update(_fsdp_run(device, curvature, x, y))
    for accum in (1, 2):
        out.update(_fsdp_run(device, "gn_sampled", x, y, wrap=False, accum=accum))
    out.update(_fsdp_run(device, "gn_sampled", x, y, accum=2))
    for wrap in (True, False):  # nvfp4: the penalty needs the whole weight's absmax (all-reduced)
        out.update(_fsdp_run(device, "gn_sampled", x, y, wrap=wrap, fmt="nvfp4"))
    return out


def _fsdp_run(device: torch.device, curvature: str, x: torch.Tensor, y: torch.Tensor, wrap: bool = True,
              accum: int = 1, fmt: str = "int4") -> dict:
    """wrap=False: a user's plain fully_shard(prepare(model)), where g stays whole on every rank.
    accum: micro-batches per step (curvature_step before the first, gradient sync on the last only)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    kw = {**GN_CFG, "block_size": None} if fmt == "nvfp4" else GN_CFG
    cfg = lotion_fx.LotionConfig(curvature=curvature, grad_accum_steps=accum, format=fmt, **kw)
    prepared = lotion_fx.prepare(Net(), cfg).to(device)
    model = D.wrap(prepared, "fsdp") if wrap else fully_shard(prepared)
    if curvature == "gn_sampled":  # wrap holds g as the row shard of its weight (fc2: 5 rows = 3 + 2)
        for pname, sm in lotion_fx.smoothers(prepared).items():
            full_rows = 5 if pname == "fc2.weight" else 48
            shard_rows = (3, 2)[dist.get_rank()] if pname == "fc2.weight" else 24
            assert sm.holds_g_shard() == wrap
            assert sm.g_local()[0].shape[0] == (shard_rows if wrap else full_rows)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    first = None
    for _ in range(STEPS):
        lotion_fx.curvature_step(model, x, loss="mse")
        if first is None:
            first = {n: sm.g_hat(prepared.get_parameter(n)).detach().cpu().clone()
                     for n, sm in lotion_fx.smoothers(prepared).items()}
        for i, (xb, yb) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
            model.set_requires_gradient_sync(i == accum - 1)
            (nn.functional.mse_loss(model(xb), yb) / accum).backward()
        opt.step()
        opt.zero_grad()
        model.set_requires_gradient_sync(True)  # curvature_step's sampled backward needs the reduction
    state = D.full_state_dict(model)
    g_final = {n: sm.g_hat(prepared.get_parameter(n)).detach().cpu().clone()
               for n, sm in lotion_fx.smoothers(prepared).items()}
    g_final["penalty"] = lotion_fx.penalty(prepared)  # collective under FSDP2: weights and g gathered
    firsts, finals = [None, None], [None, None]
    dist.all_gather_object(firsts, first)
    dist.all_gather_object(finals, g_final)
    name = f"fsdp-{curvature}" + ("" if wrap else "-unwrapped") + ("" if accum == 1 else f"-accum{accum}")
    return {name + ("" if fmt == "int4" else f"-{fmt}"): (firsts, finals, state)}


def _plain_ddp(rank: int, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> dict:
    """A user's DistributedDataParallel(prepare(model)) without lotion_fx.distributed.wrap."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for curvature in ("gn_sampled", "kfac_diag"):
        torch.manual_seed(0)
        cfg = lotion_fx.LotionConfig(curvature=curvature, **GN_CFG)
        prepared = lotion_fx.prepare(Net(), cfg).to(device)
        model = DDP(prepared, broadcast_buffers=False)  # (with the default True, rank 0's g would win)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        for _ in range(STEPS):
            lotion_fx.curvature_step(model, x, loss="mse")
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        states = [None, None]
        dist.all_gather_object(states, {k: v.detach().cpu().clone() for k, v in prepared.state_dict().items()})
        out[f"plain-ddp-{curvature}"] = states
    try:  # curvature='ema' under plain DDP would fold each rank's local gradient: refused
        DDP(_fresh(dict(method="lotion", block_size=16)).to(device))(x).sum().backward()
        ema_error = None
    except RuntimeError as e:
        ema_error = str(e)
    return {**out, "plain-ddp-ema-error": ema_error}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    r, world, device = D.init()
    assert (r, world, device.type) == (rank, 2, "cpu")
    results = run_cases(rank, device)
    if rank == 0:
        torch.save(results, out)
    D.cleanup()


def check_case(name: str, got: dict, device: torch.device = torch.device("cpu")) -> None:
    """Compare a gathered 2-process result with 1-process training on the full batch, then convert."""
    mode, kw, _ = CASES[name]
    x, y = (t.to(device) for t in _data())
    single = _fresh({k: v for k, v in kw.items() if k != "grad_accum_steps"}).to(device)
    _train(single, x, y)
    want = {k: v.cpu() for k, v in single.state_dict().items()}
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {k}: {m}")
    if kw["method"] == "lotion":
        assert int(got["lotion.fc1_weight.count"]) == STEPS
        assert got["lotion.fc2_weight.g"].abs().min() > 0  # curvature really came from the gradient
        no_penalty = _fresh({**kw, "lam": 0.0, "grad_accum_steps": 1})
        _train(no_penalty, *_data())
        moved = max((got[k] - no_penalty.state_dict()[k]).abs().max() for k in ("fc1.weight", "fc2.weight"))
        assert moved > 1e-3  # the penalty acted, so matching weights means it acted identically
    # convert on "rank 0": load the gathered state into a fresh prepared model and export it.
    fresh = _fresh(kw)
    fresh.load_state_dict(got)
    x = _data()[0]
    with lotion_fx.quantized_eval(fresh):
        ref = fresh(x)
    converted = lotion_fx.convert(fresh)
    torch.testing.assert_close(converted(x), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path_factory.mktemp("dist") / "results.pt")
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even on a GPU machine
    try:
        mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    finally:
        if hidden is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    return torch.load(out)


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one(distributed_results: dict, name: str) -> None:
    check_case(name, distributed_results[name])


def test_plain_ddp_default_curvature_is_identical_on_every_rank(distributed_results: dict) -> None:
    """gn_sampled under a plain DDP wrapper: each rank samples its own targets on its own half,
    curvature_step averages the squared gradients over ranks, so g (and the penalty, and so the
    weights) stay identical everywhere, as in one process."""
    a, b = distributed_results["plain-ddp-gn_sampled"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(a["lotion.fc1_weight.count"]) == STEPS and float(a["lotion.fc2_weight.g"].float().sum()) > 0


def test_plain_ddp_kfac_diag_is_identical_on_every_rank(distributed_results: dict) -> None:
    """kfac_diag under plain DDP: the factor sums of each rank's half are averaged over ranks."""
    a, b = distributed_results["plain-ddp-kfac_diag"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(a["lotion.fc1_weight.count"]) == STEPS and float(a["lotion.fc2_weight.kfac_out"].sum()) > 0


def test_fsdp_default_curvature_is_the_mean_squared_sampled_gradient(distributed_results: dict) -> None:
    """gn_sampled under FSDP2: the reduce-scattered mean gradient, squared times the world size, is
    folded into a g replicated on every rank. Reference: each rank's sampled-target gradient computed
    here in one process (same targets: seed mixed with step and rank), mean over ranks, squared, x2."""
    firsts, finals, state = distributed_results["fsdp-gn_sampled"]
    for a, b in ((firsts[0], firsts[1]), (finals[0], finals[1])):
        assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    prepared = lotion_fx.prepare(Net(), lotion_fx.LotionConfig(**GN_CFG))
    x, _ = _data()
    names = list(lotion_fx.smoothers(prepared))
    params = [prepared.get_parameter(n) for n in names]
    grads = []
    for rank in range(2):
        pred = prepared(x[rank * BATCH // 2:(rank + 1) * BATCH // 2])
        gen = torch.Generator().manual_seed(R.mix_seed(R.mix_seed(3, 0), rank))
        grads.append(torch.autograd.grad(lotion_fx.sampled_target_loss(pred, "mse", gen), params))
    for n, g0, g1 in zip(names, *grads):  # g_hat after one refresh: the bias-corrected estimate itself
        torch.testing.assert_close(firsts[0][n], 2 * ((g0 + g1) / 2).square(), rtol=1e-2, atol=1e-9)
    assert int(state["lotion.fc1_weight.count"]) == STEPS and all(torch.isfinite(v).all() for v in finals[0].values())


def test_fsdp_default_curvature_sharded_trains_as_replicated(distributed_results: dict) -> None:
    """gn_sampled under wrap(..., "fsdp") holds g as row shards (asserted in the workers) and applies the
    penalty after the reduce-scatter; a plain fully_shard keeps g whole and the penalty in the graph.
    Same targets, same noise for the stochastic rounding of g (keyed by each element's index in the
    whole g): the two runs give the same weights and the same g."""
    for suffix in ("", "-accum2", "-nvfp4"):  # accum2: the sampled pass's forward is not a micro-step
        _, finals, state = distributed_results["fsdp-gn_sampled" + suffix]
        _, finals_whole, state_whole = distributed_results["fsdp-gn_sampled-unwrapped" + suffix]
        assert set(state) == set(state_whole)
        for k in state:
            torch.testing.assert_close(state[k].float(), state_whole[k].float(), rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{suffix} {k}: {m}")
        for n in finals[0]:  # g_hat of every weight, and lotion_fx.penalty(), gathered on every rank
            torch.testing.assert_close(finals[0][n], finals_whole[0][n], rtol=1e-4, atol=1e-9)
        assert float(finals[0]["penalty"]) > 0 and torch.equal(finals[0]["penalty"], finals[1]["penalty"])
        assert float(state["lotion.fc1_weight.g"].float().sum()) > 0


def test_fsdp_kfac_diag_trains_as_under_ddp(distributed_results: dict) -> None:
    """kfac_diag under FSDP2: the observed factor sums are averaged over ranks as under DDP, so the
    run (weights, factors) equals the plain-DDP run of the same halves and seeds."""
    _, finals, state = distributed_results["fsdp-kfac_diag"]
    ddp = distributed_results["plain-ddp-kfac_diag"][0]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert set(state) == set(ddp)
    for k in ddp:
        torch.testing.assert_close(state[k].float(), ddp[k].float(), rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert float(state["lotion.fc2_weight.kfac_out"].sum()) > 0


def test_plain_ddp_with_ema_curvature_is_refused(distributed_results: dict) -> None:
    err = distributed_results["plain-ddp-ema-error"]
    assert err is not None and "lotion_fx.distributed.wrap" in err


@pytest.mark.parametrize("fmt, block", [("nvfp4", 16), ("int4", 16), ("int8", "row"), ("mxfp4", 32), ("int4", "tensor")])
def test_row_shards_keep_whole_tensor_scales(fmt: str, block) -> None:
    """FSDP2 shards rows; each shard's penalty gradient equals the rows of the whole weight's."""
    torch.manual_seed(0)
    w = torch.randn(7, 64) * torch.logspace(-3, 1, 7).unsqueeze(1)  # rows of very different size
    g = torch.rand(7, 64)
    b = R.resolve_block(block, fmt, 64)
    full = R.penalty_grad(w, g, fmt, b, 0.7)
    amax = w.abs().amax()
    for rows in torch.arange(7).chunk(2) + (torch.arange(0),):
        part = D.penalty_grad_rows(w[rows], g[rows], fmt, b, 0.7, tensor_amax=amax)
        assert torch.equal(part, full[rows])
    if not R.get_format(fmt).needs_tensor_absmax(b):  # scale_grad: a block's share stays in its row
        full = R.penalty_grad(w, g, fmt, b, 0.7, scale_grad=True)  # (per-tensor shares: the gloo tests)
        for rows in torch.arange(7).chunk(2):
            assert torch.equal(D.penalty_grad_rows(w[rows], g[rows], fmt, b, 0.7, scale_grad=True), full[rows])
    if fmt == "nvfp4":  # without the whole-tensor absmax the small-row shard would get other scales
        small = torch.arange(3)
        assert not torch.equal(R.penalty_grad(w[small], g[small], fmt, b, 0.7), full[small])


def test_single_process_passthrough_and_errors() -> None:
    """Without torchrun: init gives (0, 1, device), wrap returns the model, gathering is local."""
    assert D.init()[:2] == (0, 1)
    prepared = _fresh(dict(method="lotion", block_size=16))
    assert D.wrap(prepared) is prepared
    assert set(D.full_state_dict(prepared)) == set(prepared.state_dict())
    with pytest.raises(ValueError, match="choose one of"):
        D.wrap(prepared, "zero3")
    with pytest.raises(TypeError, match="not a prepared model"):
        D.wrap(Net())
    torch.manual_seed(0)
    default = lotion_fx.prepare(Net(), lotion_fx.LotionConfig(block_size=16))
    adam = lotion_fx.prepare(Net(), lotion_fx.LotionConfig(block_size=16, curvature="adam"))
    with pytest.raises(NotImplementedError, match="FSDP2 shards"):
        D.wrap(adam, "fsdp")
    assert D.wrap(default, "ddp") is default
    from test_core_prepare import Forms  # holds an (in, out) weight, square: shapes alone would not tell

    with pytest.raises(ValueError, match=r"\['w_in_out'\] are stored \(in, out\)"):
        D.wrap(lotion_fx.prepare(Forms(), lotion_fx.LotionConfig(curvature="ema", block_size=16)), "fsdp")
    forms = lotion_fx.prepare(Forms(), lotion_fx.LotionConfig(block_size=16))
    assert D.wrap(forms, "fsdp") is forms  # gn_sampled: that weight keeps a whole g
