"""A Hugging Face transformers model we did not write (small random Llama, no download), prepared
through torch.export and trained: outputs keep their ModelOutput type, loss goes down, and
quantized_eval / the shared Parameters behave as on our own models.

Longer run (documented in README.md): python tests/test_hf.py 300
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` without install

import torch.nn.functional as F  # noqa: E402

import lotion_fx
from examples.data import Batches, Corpus

transformers = pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, use_cache=False,  # the KV cache object is not exportable
    )
    return transformers.LlamaForCausalLM(cfg)


def train_llama(steps: int, method: str = "lotion", seed: int = 0) -> tuple[list[float], float, float]:
    """Train `steps` AdamW steps on stdlib bytes; returns (losses, fp val loss, quantized val loss)."""
    torch.manual_seed(seed)
    model = tiny_llama()
    corpus = Corpus.load(max_bytes=300_000)
    batches = Batches(corpus.train, seq=32, batch=8, seed=seed)
    x0, _ = batches.next()
    prepared = lotion_fx.prepare(
        model, lotion_fx.LotionConfig(method=method, format="int4", block_size=32, lam_warmup=10),
        example_inputs=(x0,),
    )
    assert prepared.get_parameter("model.layers.0.mlp.up_proj.weight") is model.model.layers[0].mlp.up_proj.weight
    opt = torch.optim.AdamW(prepared.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        x, y = batches.next()
        lotion_fx.curvature_step(prepared, x)  # HF ModelOutput: the sampled targets come from .logits
        out = prepared(x)
        assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithPast)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    vx, vy = Batches(corpus.val, seq=32, batch=32, seed=123).next()
    with torch.no_grad():
        fp = F.cross_entropy(prepared(vx).logits.flatten(0, 1), vy.flatten()).item()
        with lotion_fx.quantized_eval(prepared) as qm:
            q = F.cross_entropy(qm(vx).logits.flatten(0, 1), vy.flatten()).item()
    return losses, fp, q


def test_llama_exported_and_trained() -> None:
    losses, fp, q = train_llama(steps=30)
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)  # byte-level text: the loss falls fast from ln 256
    assert math.isfinite(fp) and math.isfinite(q) and q != fp


def test_llama_lotion_curvature_and_penalty_are_live() -> None:
    """The default curvature reaches an exported HF model: g is filled and the penalty is on."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 16))
    prepared = lotion_fx.prepare(tiny_llama(), lotion_fx.LotionConfig(block_size=32, lam_warmup=0),
                                 example_inputs=(x,))
    assert lotion_fx.curvature_step(prepared, x) is True
    assert float(lotion_fx.penalty(prepared)) > 0
    assert all(int(sm.count) == 1 for sm in lotion_fx.smoothers(prepared).values())


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for method in ("ptq", "qat", "lotion"):
        losses, fp, q = train_llama(n, method)
        print(f"{method}: {n} steps, train loss {losses[0]:.3f} -> {losses[-1]:.3f}, val fp {fp:.4f}, val int4 {q:.4f}")
