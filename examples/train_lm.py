"""Train the example GPT on bytes with one method (none/ptq/qat/lotion/lotion_sampled) and report
full-precision and quantized validation loss.

    python examples/train_lm.py --method lotion --format int4 --size tiny --steps 300
    torchrun --nproc-per-node 2 examples/train_lm.py --size 50m --device cuda [--fsdp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python examples/train_lm.py`

import lotion_fx  # noqa: E402
from examples.data import Batches, Corpus, val_windows  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

METHODS = ("none", "ptq", "qat", "lotion", "lotion_sampled")


@dataclass
class RunConfig:
    """One training run. `none` trains in full precision (so does `ptq`, quantized only at eval)."""

    method: str = "lotion"
    format: str = "int4"
    block_size: int | str | None = None
    size: str = "tiny"
    steps: int = 300
    batch: int = 16
    seq: int = 64
    lr: float = 3e-3
    warmup: int = 0  # 0: 5% of steps
    weight_decay: float = 0.1
    lam: float | None = None  # None: LotionConfig's defaults for lam, its warm-up and the curvature
    lam_warmup: int | None = None
    qat_from_step: int | None = None
    curvature: str | None = None
    curvature_scale: float | None = None
    curvature_every: int | None = None
    curvature_batch_fraction: float | None = None
    scale_grad: bool | None = None
    device: str = "cpu"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    fsdp: bool = False
    seed: int = 0
    data: str | None = None
    max_bytes: int = 8_000_000
    eval_windows: int = 64
    log_every: int = 0  # 0: ~20 progress lines
    out: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}: choose one of {list(METHODS)}")
        if self.steps < 1 or self.batch < 1 or self.seq < 2:
            raise ValueError("--steps and --batch must be >= 1 and --seq >= 2")


def lr_at(step: int, rc: RunConfig) -> float:
    """Linear warmup then cosine decay to 10% of --lr."""
    warm = rc.warmup or max(1, rc.steps // 20)
    if step < warm:
        return rc.lr * (step + 1) / warm
    t = (step - warm) / max(1, rc.steps - warm)
    return rc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, dtype: str, batch: int) -> float:
    """Mean next-byte cross-entropy over the fixed validation windows."""
    total = 0.0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        with _autocast(device, dtype):
            logits = model(xb)
        total += F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="sum").item()
    return total / y.numel()


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(rc: RunConfig) -> dict:
    """Run one training job; returns the record (also written to rc.out as JSON)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or rc.fsdp
    if distributed:
        from lotion_fx import distributed as D  # lazy: only torchrun runs need torch.distributed

        rank, world, device = D.init()
    else:
        rank, world, device = 0, 1, torch.device(rc.device)
    main = rank == 0
    say = (lambda *a: print(*a, flush=True)) if (main and not rc.quiet) else (lambda *a: None)

    corpus = Corpus.load(rc.data, rc.max_bytes)
    torch.manual_seed(rc.seed)
    gcfg = GPTConfig.preset(rc.size, block_size=max(rc.seq, GPTConfig.preset(rc.size).block_size))
    model = GPT(gcfg).to(device)
    n_params = model.num_params()
    tokens_per_step = rc.batch * rc.seq * world
    qmethod = "ptq" if rc.method == "none" else rc.method
    overrides = {k: v for k, v in (("lam", rc.lam), ("lam_warmup", rc.lam_warmup),
                                   ("qat_from_step", rc.qat_from_step if qmethod == "lotion" else None),
                                   ("curvature", rc.curvature),
                                   ("curvature_scale", rc.curvature_scale),
                                   ("curvature_every", rc.curvature_every),
                                   ("curvature_batch_fraction", rc.curvature_batch_fraction),
                                   ("scale_grad", rc.scale_grad)) if v is not None}
    lcfg = lotion_fx.LotionConfig(
        method=qmethod, format=rc.format, block_size=rc.block_size, seed=rc.seed, **overrides
    )
    cscale = lcfg.curvature_scale
    prepared = lotion_fx.prepare(model, lcfg)
    say(
        f"model {rc.size}: {n_params / 1e6:.1f}M params | corpus {corpus.source} "
        f"({len(corpus.train) + len(corpus.val):,} bytes, sha256 {corpus.digest}) | {rc.method} {rc.format} "
        f"| {world} x {device}"
    )

    net: nn.Module = D.wrap(prepared, "fsdp" if rc.fsdp else "ddp") if distributed else prepared
    # after wrap: FSDP2 swaps the Parameters for sharded DTensors
    decay = [p for p in prepared.parameters() if p.dim() >= 2]
    no_decay = [p for p in prepared.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": rc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=rc.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    if rc.compile:
        net = torch.compile(net)

    batches = Batches(corpus.train, rc.seq, rc.batch, rc.seed, rank, world)
    log_every = rc.log_every or max(1, rc.steps // 20)
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    t_steady, steady_step = t0, 0
    for step in range(rc.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, rc)
        x, y = batches.next()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, rc.dtype):
            lotion_fx.curvature_step(net, x)  # gn_sampled: sampled-target backward every k steps
            logits = net(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prepared.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1:  # tokens/s excludes the first steps (compilation)
            t_steady, steady_step = time.perf_counter(), 2
        if (step + 1) % log_every == 0 or step + 1 == rc.steps:
            lv = loss.item()
            if not math.isfinite(lv):
                raise FloatingPointError(f"{rc.method}: loss became {lv} at step {step}; lower --lr")
            curve.append((step + 1, lv))
            now = time.perf_counter()
            done = step + 1 - steady_step
            tps = tokens_per_step * done / (now - t_steady) if done > 0 and now > t_steady else float("nan")
            eta = (rc.steps - step - 1) * (now - t_steady) / done if done > 0 else float("nan")
            say(
                f"step {step + 1:>6}/{rc.steps} | loss {lv:.4f} | {tps / 1e3:8.1f}k tok/s | "
                f"elapsed {_fmt_time(now - t0)} | ETA {_fmt_time(eta) if math.isfinite(eta) else '?'}"
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0

    vx, vy = val_windows(corpus.val, rc.seq, rc.eval_windows)
    if rc.fsdp:
        sd = D.full_state_dict(net)
        eval_model = _rebuild(gcfg, lcfg, sd, device) if main else None
    else:
        eval_model = prepared  # DDP: every rank holds the full parameters
    record: dict = {}
    if main:
        val_fp = evaluate(eval_model, vx, vy, device, rc.dtype, rc.batch)
        with lotion_fx.quantized_eval(eval_model) as qm:
            val_q = evaluate(qm, vx, vy, device, rc.dtype, rc.batch)
        pen = float(lotion_fx.penalty(eval_model)) if rc.method == "lotion" else 0.0
        record = {
            "config": asdict(rc), "params": n_params, "world_size": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "corpus": {"source": corpus.source, "sha256": corpus.digest, "bytes": len(corpus.train) + len(corpus.val)},
            "curvature_scale": cscale, "tokens": tokens_per_step * rc.steps, "train_seconds": train_s,
            "val_loss_fp": val_fp, "val_loss_quant": val_q, "penalty": pen, "curve": curve,
        }
        print(
            f"RESULT method={rc.method} format={rc.format} val_loss_fp={val_fp!r} "
            f"val_loss_quant={val_q!r} gap={val_q - val_fp:+.4f} tokens={record['tokens']} time={train_s:.1f}s",
            flush=True,
        )
        if rc.out:
            _write(record, Path(rc.out))
    if distributed:
        D.cleanup()
    return record


def _rebuild(gcfg: GPTConfig, lcfg: lotion_fx.LotionConfig, sd: dict, device: torch.device) -> nn.Module:
    """A fresh prepared model on one device holding the gathered FSDP weights, for evaluation."""
    model = GPT(gcfg)
    prefixes = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
    clean = {}
    for k, v in sd.items():
        while k.startswith(prefixes):
            k = k.split(".", 1)[1]
        clean[k] = v
    prepared = lotion_fx.prepare(model, lcfg)
    missing, _ = prepared.load_state_dict(clean, strict=False)
    lost = [k for k in missing if k in dict(prepared.named_parameters())]
    if lost:
        raise KeyError(f"gathered state dict lacks parameters {lost[:5]}")
    return prepared.to(device)


def _write(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the plot is optional: pip install lotion_fx[plot]
    steps, losses = zip(*record["curve"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses)
    c = record["config"]
    ax.set(xlabel="step", ylabel="train loss", title=f"{c['method']} {c['format']} {c['size']}")
    fig.savefig(out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


def _block(v: str) -> int | str:
    return v if v in ("row", "tensor") else int(v)


def parse_args(argv: list[str] | None = None) -> RunConfig:
    d = RunConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default=d.method, choices=METHODS)
    p.add_argument("--format", default=d.format, choices=sorted(lotion_fx.FORMATS))
    p.add_argument("--block-size", type=_block, default=None, help="int, 'row' or 'tensor' (default: the format's)")
    p.add_argument("--size", default=d.size, help="GPTConfig preset: tiny, small, 50m, 150m, gpt2")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per step per rank")
    p.add_argument("--seq", type=int, default=d.seq, help="tokens (bytes) per sequence")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lam", type=float, default=None, help="default: LotionConfig's")
    p.add_argument("--lam-warmup", type=int, default=None, help="steps of linear lam warm-up (default: LotionConfig's)")
    p.add_argument("--qat-from-step", type=int, default=None,
                   help="lotion: from this step on train with QAT's forward (LotionConfig.qat_from_step)")
    p.add_argument("--curvature", default=None, choices=list(lotion_fx.config.CURVATURES))
    p.add_argument("--curvature-scale", type=float, default=None, help="default: LotionConfig's (1)")
    p.add_argument("--curvature-every", type=int, default=None, help="steps between refreshes (default: LotionConfig's)")
    p.add_argument("--curvature-batch-fraction", type=float, default=None,
                   help="share of the batch the refresh runs on (default: LotionConfig's)")
    p.add_argument("--scale-grad", type=lambda v: {"on": True, "off": False}[v], default=None,
                   metavar="{on,off}", help="penalty gradient through the block scales (default: LotionConfig's)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP under torchrun")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default=None, help="a text file (default: the Python stdlib sources)")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes)
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="validation sequences")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--out", default=None, help="JSON record path (+ .png loss curve with matplotlib)")
    p.add_argument("--quiet", action="store_true", help="only the RESULT line")
    a = p.parse_args(argv)
    return RunConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})


if __name__ == "__main__":
    train(parse_args())
