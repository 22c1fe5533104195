"""GPU: the compiled prepared model equals eager, and Inductor's Triton source holds our fused kernels."""
import copy
import os
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from lotion_fx import reference as R
from lotion_fx.backends import lowering

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_gpu_compiled_equals_eager_triton_fused() -> None:
    from test_lowering import AllMethodsFormats, _train

    eager = AllMethodsFormats().cuda()
    comp = copy.deepcopy(eager)
    torch.manual_seed(1)
    x = torch.randn(16, 64, device="cuda")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(comp, backend=counter)
    ref = _train(eager, eager, x, 3)
    with lowering.exact_division():  # compiled inside: IEEE division, so RTN ties match eager
        (first,), codes = run_and_get_code(lambda: _train(comp, compiled, x, 1))
    got = [first] + _train(comp, compiled, x, 2)
    assert counter.frame_count == 1
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=n)
    for (n, a), (_, b) in zip(eager.named_buffers(), comp.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=n)
    code = "\n".join(codes)
    if os.environ.get("OUT"):  # keep the generated Triton source for README.md
        with open(os.path.join(os.environ["OUT"], "triton_code.py"), "w") as f:
            f.write(code)
    assert "torch.ops.lotion_fx" not in code
    kernels = re.findall(r"^def (triton_\w+)\(", code, flags=re.M)
    smoothing = [k for k in kernels if "amax" in k or "abs" in k]
    assert smoothing and len(smoothing) <= 12 + 3, kernels
    assert "@triton.jit" in code


def test_gpu_sr_same_bits_as_cpu() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    f = torch.compile(lambda w, s: torch.ops.lotion_fx.sr_quantize(w, s, "int4", 32, 11))
    with lowering.exact_division():  # compiled inside: IEEE division, as eager
        cuda = f(w.cuda(), torch.tensor(4, device="cuda")).cpu()
    ref = R.fake_quantize(w, "int4", 32, rounding="stochastic", seed=11, step=4)
    # Same noise bits and the same rounding decisions: any flipped decision moves a value by a
    # whole grid step (>= 1/14 of the block absmax). Inductor may compute amax / 7 as
    # amax * (1 / 7), so the scale itself can differ from eager in its last bit.
    torch.testing.assert_close(cuda, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_gpu_qat_bf16_weights_use_the_triton_fake_quant_kernel(fmt: str) -> None:
    """16-bit weights: qat's forward runs backends/triton_fake_quant.py (traced into the compiled graph; nvfp4
    when asked for), eager and compiled agree, and the straight-through gradient flows; fp32 weights keep
    Inductor's code."""
    import lotion_fx
    from lotion_fx.backends import triton_fake_quant as Q

    def qat_net() -> torch.nn.Module:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
        return lotion_fx.prepare(net, lotion_fx.LotionConfig(method="qat", format=fmt)).cuda()

    eager = qat_net().to(torch.bfloat16)
    comp = copy.deepcopy(eager)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    if fmt == "nvfp4":  # "auto" leaves nvfp4 to Inductor's code; "triton" asks for the kernel
        _, codes = run_and_get_code(torch.compile(copy.deepcopy(eager)), x)
        assert "_rtn_kernel" not in "\n".join(codes)
        torch._dynamo.reset()
    with Q.kernel_choice("triton" if fmt == "nvfp4" else "auto"):
        out, codes = run_and_get_code(torch.compile(comp), x)
        assert "_rtn_kernel" in "\n".join(codes), "the Triton fake-quant kernel was not used"
        ref = eager(x)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)  # bf16 matmuls may fuse the bias differently
    w = eager.get_parameter("0.weight")
    blk = 32 if fmt == "int4" else 16
    with torch.no_grad():  # the weights eager used: the kernel's, equal to the reference bit for bit
        assert torch.equal(torch.ops.lotion_fx.rtn_quantize_triton(w, fmt, blk), R.fake_quantize(w, fmt, blk))
    out.float().square().mean().backward()
    ref.float().square().mean().backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        assert a.grad is not None and a.grad.abs().sum() > 0, n
        torch.testing.assert_close(b.grad, a.grad, rtol=5e-2, atol=1e-3, msg=n)
    _, codes32 = run_and_get_code(torch.compile(qat_net()), x.float())
    assert "_rtn_kernel" not in "\n".join(codes32)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_gpu_lotion_sampled_bf16_weights_take_the_triton_kernel(fmt) -> None:
    """lotion_sampled with bf16 weights (kernel_choice "auto"): the smoother runs sr_quantize_triton (traced into
    the compiled graph) and the step's stochastic rounding is the reference op's, so compiled outputs equal the
    eager reference path's (kernel_choice("reference")) run for run, and the straight-through gradient flows.
    fp32 weights keep Inductor's code."""
    import lotion_fx
    from lotion_fx.backends import triton_fake_quant as Q

    def net(seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
        return lotion_fx.prepare(m, lotion_fx.LotionConfig(method="lotion_sampled", format=fmt, seed=seed)).cuda()

    # a layer whose noise seed is >= 2**31 (such an int argument once broke Inductor's kernel launch, torch 2.11)
    seed = next(s for s in range(64) if any(sm.seed & 0x80000000 for sm in lotion_fx.smoothers(net(s)).values()))
    ref, comp = net(seed).to(torch.bfloat16), net(seed).to(torch.bfloat16)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(comp)
    out, codes = run_and_get_code(fn, x)
    assert "_rtn_kernel" in "\n".join(codes)
    outs = [out] + [fn(x) for _ in range(2)]
    with Q.kernel_choice("reference"):
        want = [ref(x) for _ in range(3)]  # steps 1, 2, 3: the same noise keys
    for got, exp in zip(outs, want):
        torch.testing.assert_close(got, exp, rtol=2e-2, atol=2e-2)
    assert not torch.equal(outs[0], outs[1])  # a new rounding every step
    outs[-1].float().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in comp.parameters())
    _, codes32 = run_and_get_code(torch.compile(net()), x.float())
    assert "_rtn_kernel" not in "\n".join(codes32)


@pytest.mark.parametrize("dynamic", [None, False])
def test_gpu_lotion_trains_the_same_under_cuda_graphs(dynamic) -> None:
    """torch.compile(mode="reduce-overhead") (CUDA graphs, what README's Costs recommends against host overhead):
    LOTION's default loop (refresh every 2nd step on a quarter of the batch, the fold and lam updated outside
    the graphs in place) ends in the same weights and curvature as the eager run, and no graph was kept off
    CUDA graphs."""
    import lotion_fx
    from torch._dynamo.utils import counters

    from examples.gpt import GPT, GPTConfig

    cfg = GPTConfig.preset("tiny")
    idx = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), device="cuda")
    runs = []
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        torch.manual_seed(0)
        prepared = lotion_fx.prepare(GPT(cfg).cuda(), lotion_fx.LotionConfig(curvature_every=2, lam_warmup=2))
        opt = torch.optim.AdamW(prepared.parameters(), lr=1e-3)
        fn = torch.compile(prepared, mode="reduce-overhead", dynamic=dynamic) if compiled else prepared
        for _ in range(6):
            lotion_fx.curvature_step(fn, idx)
            torch.nn.functional.cross_entropy(fn(idx).float().flatten(0, 1), idx.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append(prepared)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    eager, graphed = runs
    assert float(lotion_fx.penalty(graphed)) > 0
    for (n, a), (_, b) in zip(eager.state_dict().items(), graphed.state_dict().items()):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-4, msg=n)
