"""KV-cache decode speed of a ~1.1B Llama-shaped model: bf16 vs our packed int8/int4/nvfp4 kernels.

The model (defined here, random init, no download) is Llama-3-shaped: d=2048, 16 layers, 32 heads
with 8 KV heads, SwiGLU 8192, vocab 32000 (`--size 8b`: Llama-3.1-8B's shapes), untied head, RoPE, a
static KV cache (gpt-fast style).
Each Linear weight is replaced by `to_torchao(w, fmt, default block, "LotionPackedTensor")` (the
tensor `lotion_fx.convert` makes: RTN codes, F.linear -> our Triton kernels on CUDA);
`torchao-int8` / `torchao-int4` are torchao's own Int8WeightOnlyConfig / Int4WeightOnlyConfig
(tinygemm, group 128) as anchors. Prefill of `--prefill` tokens, then single-token decode steps
replayed as CUDA graphs, both compiled (`compile_for`). Our variants hold each weight in a
`PackedLinear` (what convert gives: the codes and scales as plain buffers); `<fmt>-param` keeps the
LotionPackedTensor as the Linear's Parameter instead, whose per-call unwrapping by torch.compile
made the step host-bound (profile_decode.py). "% of BW limit" = (weight bytes / measured device-to-device copy bandwidth) /
ms per token. `--layout`: "separate" (wq / wk / wv and w1 / w3 as their own Linears, the old tables) or
"fused" (gpt-fast's: one wqkv Linear, dim -> (heads + 2 kv_heads) * head_dim, split into q / k / v after the
matmul, and one w13 Linear, dim -> 2 ffn, split into gate / up): the same weights (concatenated before
quantization, so every per-row scale is the same), fewer and larger GEMVs; bf16 and every quantized variant
use the layout of the row, and "vs bf16" compares within a layout. `--gemv` sets the GEMV switch of our
kernels (triton_matmul.GEMV_KERNEL: auto, v2, v3 or v3dot, see bench_wo_linear.py). Usage:
    python benchmarks/bench_decode.py [--quick | --size 8b] [--batches 1,8] [--layout separate,fused] [--gemv v3]
        [--variants ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from lotion_fx.backends import torchao_export as X
from lotion_fx.backends import triton_matmul as T
from lotion_fx.backends.packed_linear import PackedLinear, pack_linears
from lotion_fx.reference import resolve_block

OURS = {"int8": "int8", "int4": "int4", "nvfp4": "nvfp4"}


@dataclass
class Cfg:
    dim: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    vocab: int = 32000
    max_len: int = 1024


LAYOUTS = ("separate", "fused")
# --size: the ~1.1B model of the tables so far, and Llama-3.1-8B's shapes (the anchors' model: d 4096, 32 layers,
# GQA 32/8, SwiGLU 14336, vocab 128256), where the work that is not a weight read weighs less per token.
SIZES = {"1b": Cfg(), "8b": Cfg(dim=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256)}


class Attention(nn.Module):
    def __init__(self, c: Cfg, batch: int) -> None:
        super().__init__()
        self.h, self.kvh, self.hd = c.heads, c.kv_heads, c.dim // c.heads
        self.wq = nn.Linear(c.dim, c.dim, bias=False)
        self.wk = nn.Linear(c.dim, self.kvh * self.hd, bias=False)
        self.wv = nn.Linear(c.dim, self.kvh * self.hd, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)
        self.register_buffer("k_cache", torch.zeros(batch, self.kvh, c.max_len, self.hd), persistent=False)
        self.register_buffer("v_cache", torch.zeros(batch, self.kvh, c.max_len, self.hd), persistent=False)

    def fuse(self) -> None:
        """gpt-fast's layout: wq, wk, wv -> one wqkv Linear (rows stacked), split after the matmul."""
        w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
        self.wqkv = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.wqkv.weight = nn.Parameter(w.detach(), requires_grad=self.wq.weight.requires_grad)
        del self.wq, self.wk, self.wv

    def forward(self, x: torch.Tensor, rope: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        if hasattr(self, "wqkv"):
            q, k, v = self.wqkv(x).split([self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = _rope(q.view(b, s, self.h, self.hd), rope).transpose(1, 2)
        k = _rope(k.view(b, s, self.kvh, self.hd), rope).transpose(1, 2)
        v = v.view(b, s, self.kvh, self.hd).transpose(1, 2)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


def _rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    xr = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[..., 0].unsqueeze(-2), rope[..., 1].unsqueeze(-2)
    out = torch.stack([xr[..., 0] * cos - xr[..., 1] * sin, xr[..., 1] * cos + xr[..., 0] * sin], -1)
    return out.flatten(-2).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c: Cfg, batch: int) -> None:
        super().__init__()
        self.attn = Attention(c, batch)
        self.n1, self.n2 = nn.RMSNorm(c.dim), nn.RMSNorm(c.dim)
        self.w1 = nn.Linear(c.dim, c.ffn, bias=False)
        self.w3 = nn.Linear(c.dim, c.ffn, bias=False)
        self.w2 = nn.Linear(c.ffn, c.dim, bias=False)

    def fuse(self) -> None:
        """gpt-fast's layout: w1 (gate), w3 (up) -> one w13 Linear (rows stacked), split after the matmul."""
        self.attn.fuse()
        w = torch.cat([self.w1.weight, self.w3.weight])
        self.w13 = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.w13.weight = nn.Parameter(w.detach(), requires_grad=self.w1.weight.requires_grad)
        del self.w1, self.w3

    def forward(self, x, rope, pos, mask):
        x = x + self.attn(self.n1(x), rope, pos, mask)
        h = self.n2(x)
        if hasattr(self, "w13"):
            gate, up = self.w13(h).chunk(2, dim=-1)
        else:
            gate, up = self.w1(h), self.w3(h)
        return x + self.w2(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, c: Cfg, batch: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(c.vocab, c.dim)
        self.blocks = nn.ModuleList(Block(c, batch) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab, bias=False)
        hd = c.dim // c.heads
        ang = torch.outer(torch.arange(c.max_len).float(), 500000.0 ** (-torch.arange(0, hd, 2).float() / hd))
        self.register_buffer("rope", torch.stack([ang.cos(), ang.sin()], -1), persistent=False)
        self.register_buffer("causal", torch.ones(c.max_len, c.max_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        rope, mask = self.rope[pos], self.causal[pos][None, None]
        for blk in self.blocks:
            x = blk(x, rope, pos, mask)
        return self.head(self.norm(x[:, -1:]))


def build(variant: str, c: Cfg, batch: int, device: str, layout: str = "separate") -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):  # built and initialised on the GPU: seconds instead of a minute per variant
        model = Llama(c, batch)
    for p in model.parameters():
        nn.init.normal_(p, std=0.02) if p.dim() == 2 else None
    model = model.to(device, torch.bfloat16).eval()
    if layout == "fused":  # the same weights, concatenated: before quantization, so the codes and scales match
        for blk in model.blocks:
            blk.fuse()
    if variant == "bf16":
        return model
    if variant.startswith("torchao-"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        cfg = (Int8WeightOnlyConfig() if variant == "torchao-int8"
               else Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        quantize_(model, cfg)
        return model
    fmt = OURS[variant.removesuffix("-param")]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                block = resolve_block(None, fmt, m.in_features)
                m.weight = nn.Parameter(X.to_torchao(m.weight, fmt, block, X.PACKED), requires_grad=False)
    return model if variant.endswith("-param") else pack_linears(model)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights: parameters, and the packed buffers of PackedLinear layers."""
    packed = sum(X.nbytes(m.weight) for m in model.modules() if isinstance(m, PackedLinear))
    return packed + sum(X.nbytes(p) for p in model.parameters())


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    a = torch.empty(2**28, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    _sync(device)
    return 2 * a.numel() * 4 * 20 / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compile_for(model: nn.Module, how: str, cudagraphs: bool) -> nn.Module:
    """`how`: "default" = torch.compile (fullgraph; mode="reduce-overhead" = CUDA graphs when
    `cudagraphs`), "none" = eager. (Inductor freezing was tried: 5x slower decode, bf16 included.)"""
    if how == "none":
        return model
    return torch.compile(model, fullgraph=True, mode="reduce-overhead" if cudagraphs else None)


@torch.no_grad()
def measure(model: nn.Module, c: Cfg, batch: int, prefill: int, steps: int, device: str, how: str):
    """(prefill ms, decode ms/token): compiled prefill (median of 3), then compiled single-token steps
    replayed as CUDA graphs (on CUDA)."""
    ids = torch.randint(0, c.vocab, (batch, prefill), device=device)
    pos = torch.arange(prefill, device=device)
    pre = compile_for(model, how, cudagraphs=False)
    pre(ids, pos)  # compile (and Triton autotuning at M = batch * prefill)
    pre_times = []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        logits = pre(ids, pos)
        _sync(device)
        pre_times.append((time.perf_counter() - t0) * 1e3)
    step = compile_for(model, how, cudagraphs=device == "cuda")
    tok = logits.argmax(-1)
    p = torch.tensor([prefill], device=device)
    for i in range(3):  # compile + CUDA graph capture
        tok = step(tok, p + i).argmax(-1)
    _sync(device)
    times = []
    for r in range(3):
        t0 = time.perf_counter()
        for i in range(steps):
            tok = step(tok, p + 3 + (r * steps + i) % (c.max_len - prefill - 4)).argmax(-1)
        _sync(device)
        times.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(pre_times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="bf16,int4,nvfp4,int8,torchao-int4,torchao-int8")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layout", default="separate",
                    help="projection layout(s), comma list: separate (wq/wk/wv, w1/w3) and/or fused (wqkv, w13)")
    ap.add_argument("--gemv", default=T.GEMV_KERNEL, choices=["auto", "v2", "v3", "v3dot"],
                    help="GEMV kernels of our variants (triton_matmul.GEMV_KERNEL; default: the library's)")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--compile", default="default", choices=["default", "none"],
                    help="how prefill and decode are compiled (see compile_for); decode adds CUDA graphs")
    ap.add_argument("--size", default="1b", choices=sorted(SIZES), help="model shapes (see SIZES)")
    ap.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what would start after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    layouts = args.layout.split(",")
    for lay in layouts:
        if lay not in LAYOUTS:
            ap.error(f"unknown layout {lay!r}: choose from {', '.join(LAYOUTS)} (or a comma list)")
    T.GEMV_KERNEL = args.gemv
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = Cfg(dim=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=1024, max_len=128)
    c = quick if args.quick else SIZES[args.size]
    prefill = min(args.prefill, c.max_len // 2)
    bw = copy_bandwidth(device)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Llama(c, 1).parameters())
    title = (f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} | torch {torch.__version__} | "
             f"Llama-shaped {n_params / 1e9:.2f}B params (d={c.dim}, {c.layers} layers, vocab {c.vocab}), "
             f"bf16 activations, prefill {prefill}, static KV cache, compile={args.compile!r} (+ CUDA graphs for "
             f"decode), layout {'/'.join(layouts)} (fused: wqkv + w13, gpt-fast), GEMV {args.gemv} | "
             f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print(title, flush=True)
    rows, base, start = [], {}, time.time()
    for batch, layout, variant in itertools.product(map(int, args.batches.split(",")), layouts,
                                                    args.variants.split(",")):
        if time.time() - start > args.budget_s:
            rows.append([variant, layout, batch, "-", "-", "-", "-", "-", "-", "skipped (time budget)"])
            continue
        t0 = time.time()
        try:
            model = build(variant, c, batch, device, layout)
            wb = weight_bytes(model)
            pre, ms = measure(model, c, batch, prefill, args.steps, device, args.compile)
        except Exception as e:  # one failing variant must not hide the others
            rows.append([variant, layout, batch, "-", "-", "-", "-", "-", "-",
                         f"{type(e).__name__}: {str(e)[:90]}"])
            print(rows[-1], flush=True)
            continue
        finally:
            torch._dynamo.reset()
        base.setdefault((batch, layout), (ms, pre))  # the first variant (bf16 by default) of this layout
        ref_ms, ref_pre = base[(batch, layout)]
        limit_ms = wb / bw * 1e3
        rows.append([variant, layout, batch, f"{wb / 2**20:.0f}", f"{ms:.3f}", f"{batch * 1e3 / ms:.0f}",
                     f"{ref_ms / ms:.2f}x", f"{100 * limit_ms / ms:.0f}%", f"{pre:.1f}", f"{pre / ref_pre:.2f}x"])
        print(rows[-1], f"({time.time() - t0:.0f}s)", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        write(title, rows, args.out)
    print(write(title, rows, args.out))


def write(title: str, rows: list, out: str | None) -> str:
    head = ["weights", "layout", "batch", "weight MiB", "ms / token", "tokens / s", "speed-up vs bf16", "% of BW limit",
            "prefill ms", "prefill vs bf16"]
    text = title + "\n\n" + tabulate(rows, headers=head, tablefmt="github")
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
