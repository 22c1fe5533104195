"""GPT-2-small training step (bf16 autocast): plain vs qat vs lotion, compiled (and eager).

Prints the mean step time over windows of 20 steps (so lotion's sampled-target curvature pass,
every `curvature_every` = 10 steps, is counted at its real rate), the spread over windows, peak
memory, curvature-state bytes per smoothed weight and first-step (compile) time. Run on a GPU:
python benchmarks/bench_train_step.py [--batch 8] [--windows 5] [--eager] [--dynamic-batch] [--param-dtype bf16]
`--param-dtype bf16` trains bf16 weights (no fp32 masters), where qat int4/int8 runs the Triton fake-quant kernel.
`--dynamic-batch` adds plain with the batch dimension marked dynamic: what a compiled step costs when
Dynamo has seen two batch sizes (LOTION's refresh on part of the batch makes it recompile that way).
`--static` compiles every case with `torch.compile(model, dynamic=False)`: LOTION's refresh then gets its own
static graph and the training graph stays static. `--mode reduce-overhead`: every case under CUDA graphs.
`--inductor cpp_wrapper=True,combo_kernels=True` sets torch._inductor.config options for every case (the levers
on the host's launch time, which LOTION's compiled step is bound by without CUDA graphs).
"""
from __future__ import annotations

import argparse
import ast
import gc
import os
import sys
import time

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lotion_fx  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

# (method, format, curvature): curvature None = the library default (gn_sampled)
CASES = [("plain", None, None), ("qat", "int4", None), ("lotion", "int4", None), ("lotion", "int4", "ema"),
         ("lotion", "int4", "kfac_diag"),
         ("qat", "nvfp4", None), ("lotion", "nvfp4", None), ("qat", "int8", None), ("lotion", "int8", None),
         ("lotion_sampled", "int4", None), ("lotion_sampled", "nvfp4", None)]
WINDOW = 20
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(method: str, fmt: str | None, curvature: str | None, cfg: GPTConfig,
          param_dtype: torch.dtype = torch.float32, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(cfg).cuda().to(param_dtype)
    if method == "plain":
        return model
    extra = {"curvature": curvature, **extra} if curvature else extra
    return lotion_fx.prepare(model, lotion_fx.LotionConfig(method=method, format=fmt, **extra))


def train_step(fn, opt: torch.optim.Optimizer, idx: torch.Tensor, method: str) -> None:
    """One step of the benchmarked loop: LOTION's curvature_step (a sampled-target refresh every
    curvature_every calls), then forward, next-token-style cross-entropy on idx, backward, AdamW."""
    with torch.autocast(idx.device.type, dtype=torch.bfloat16):
        if method == "lotion":
            lotion_fx.curvature_step(fn, idx)
        loss = F.cross_entropy(fn(idx).float().flatten(0, 1), idx.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def state_bytes_per_weight(model: torch.nn.Module) -> float:
    """Curvature state (g) bytes per smoothed weight element (0 for qat/plain)."""
    if not lotion_fx.is_prepared(model):
        return 0.0
    sm = lotion_fx.smoothers(model)
    n = sum(model.get_parameter(k).numel() for k in sm)
    b = sum(s.g.numel() * s.g.element_size() for s in sm.values() if hasattr(s, "g"))
    return b / n


def run(method: str, fmt: str | None, curvature: str | None, compiled: bool, args, cfg: GPTConfig,
        fraction: float | None = None, dynamic_batch: bool = False):
    """(first-step seconds, [mean ms/step per window], peak GiB, state bytes per weight)."""
    extra = {"curvature_batch_fraction": fraction} if fraction is not None else {}
    model = build(method, fmt, curvature, cfg, PARAM_DTYPES[args.param_dtype], **extra)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    opts = {"mode": args.mode, **({"dynamic": False} if args.static else {})}
    fn = torch.compile(model, **opts) if compiled else model
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size), device="cuda")
    if dynamic_batch:
        torch._dynamo.mark_dynamic(idx, 0)

    def step() -> None:
        train_step(fn, opt, idx, method)

    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    for _ in range(args.warmup - 1):  # after a long compile the first windows run slow (2026-11-24: 33 vs 28 ms)
        step()
    windows = []
    for _ in range(args.windows):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(WINDOW):
            step()
        e.record()
        torch.cuda.synchronize()
        windows.append(s.elapsed_time(e) / WINDOW)
    peak = torch.cuda.max_memory_allocated() / 2**30
    sb = state_bytes_per_weight(model)
    del model, opt, fn
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return first, windows, peak, sb


def parse_inductor_options(text: str) -> dict[str, object]:
    """'cpp_wrapper=True,combo_kernels=True' -> {'cpp_wrapper': True, 'combo_kernels': True}; an unknown
    torch._inductor.config key is an error naming it."""
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not hasattr(inductor_config, key.strip()):
            raise SystemExit(f"--inductor: {item!r} is not key=value with a torch._inductor.config key")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--windows", type=int, default=5, help=f"timed windows of {WINDOW} steps")
    ap.add_argument("--warmup", type=int, default=3 * WINDOW, help="untimed steps after the first (compiling) one")
    ap.add_argument("--eager", action="store_true", help="also time eager mode")
    ap.add_argument("--cases", default=None, help="comma list of method-format[-curvature], e.g. plain,lotion-int4")
    ap.add_argument("--batch-fractions", default="", help="also run each lotion case with these "
                    "curvature_batch_fraction values, e.g. 0.5,0.25")
    ap.add_argument("--dynamic-batch", action="store_true", help="also run plain with a dynamic batch dimension")
    ap.add_argument("--static", action="store_true", help="compile every case with dynamic=False")
    ap.add_argument("--mode", default=None, help="torch.compile mode for every case, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--param-dtype", choices=sorted(PARAM_DTYPES), default="fp32",
                    help="dtype of the weights (bf16: no fp32 master weights; qat int4/int8 then runs the "
                         "hand-written Triton fake-quant kernel)")
    ap.add_argument("--inductor", default="", help="torch._inductor.config options for every case, comma list of "
                    "key=value (Python literals), e.g. cpp_wrapper=True,combo_kernels=True")
    args = ap.parse_args()
    inductor = parse_inductor_options(args.inductor)
    for key, value in inductor.items():
        setattr(inductor_config, key, value)
    cfg = GPTConfig.preset("gpt2")
    cases = CASES
    if args.cases:
        names = {"-".join(x for x in c if x): c for c in CASES}
        cases = [names[n] for n in args.cases.split(",")]
    fractions = [float(f) for f in args.batch_fractions.split(",") if f]
    cases = [(*c, None) for c in cases] + [(*c, f) for f in fractions for c in cases if c[0] == "lotion"]
    if args.dynamic_batch:
        cases.append(("plain", None, None, "dynamic"))
    res = {}
    for case in cases:
        for compiled in (True, False) if args.eager else (True,):
            dyn = case[3] == "dynamic"
            res[(*case, compiled)] = run(*case[:3], compiled, args, cfg, None if dyn else case[3], dyn)
            print(*case, "compiled" if compiled else "eager", res[(*case, compiled)], flush=True)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    plain_key = ("plain", None, None, None, True)
    plain = med(res[plain_key][1])
    rows, crow = [], []
    for case in cases:
        first, win, peak, sb = res[(*case, True)]
        eager = res.get((*case, False))
        ms = med(win)
        name = case[0] + (f" ({case[2]})" if case[2] else (" (gn_sampled)" if case[0] == "lotion" else ""))
        if case[3] == "dynamic":
            name += ", batch dim dynamic"
        elif case[3] is not None:
            name += f", refresh on {case[3]:g} of the batch"
        rows.append([name, case[1] or "-", f"{ms:.1f}", f"{min(win) / plain:.3f}-{max(win) / plain:.3f}",
                     f"{ms / plain:.3f}x", f"{peak:.2f}", f"{sb:g}",
                     f"{med(eager[1]):.1f}" if eager else "-"])
        crow.append([name, case[1] or "-", f"{first:.1f}", f"{first / res[plain_key][0]:.2f}x"])
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | GPT-2 small "
          f"({sum(p.numel() for p in GPT(cfg).parameters()) / 1e6:.0f}M), batch {args.batch}x{cfg.block_size}, "
          f"{args.param_dtype} weights, bf16 autocast, AdamW, torch.compile mode={args.mode}"
          f"{', dynamic=False' if args.static else ''}"
          f"{', inductor ' + str(inductor) if inductor else ''}; ms/step = median over {args.windows} windows of "
          f"{WINDOW} steps, after {args.warmup} untimed steps")
    print(tabulate(rows, headers=["method", "format", "compiled ms/step", "range vs plain (windows)", "vs plain",
                                  "peak GiB", "state B/weight", "eager ms/step"]))
    print()
    print(tabulate(crow, headers=["method", "format", "first step (compile) s", "vs plain"]))


if __name__ == "__main__":
    main()
