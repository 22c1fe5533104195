"""Fine-tune a Hugging Face model with transformers.Trainer for INT4 deployment, LOTION vs QAT vs PTQ.

A small random-init Llama (no download) learns byte-level text (the Python stdlib sources, see
examples/data.py). What a practitioner changes in a Trainer script: `lotion_fx.prepare(model, config,
capture="dynamo")` before the Trainer, `lotion_fx.hf_trainer.LotionTrainer` in place of
`transformers.Trainer` (it calls `lotion_fx.curvature_step` once per optimizer step, which the default
curvature needs: with a plain Trainer LOTION gets no curvature and acts as PTQ; for ptq / qat it is a
plain Trainer), and `lotion_fx.quantized_eval` / `lotion_fx.convert` after it. The model stays a
LlamaForCausalLM. Every method runs with the library's defaults (LotionConfig(method=..., format=...)).

    python examples/hf_finetune.py                 # 300 steps per method, a few minutes on CPU
                                                   # (lotion's lam ramps over 500 steps: 0.6 at the end)
    python examples/hf_finetune.py --steps 6       # CI smoke size

Writes to --out, for the method with the best quantized validation loss: `<method>-trained/`
(save_pretrained of the prepared model: weights + smoother state; reload with from_pretrained, prepare,
lotion_fx.load_smoother_state) and `<method>-int4/` (the converted model: config.json + model.pt, a
state_dict of LotionPackedTensor weights; after `import lotion_fx`, reload with
`LlamaForCausalLM(LlamaConfig.from_pretrained(d)).load_state_dict(torch.load(d / "model.pt"), assign=True)`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python examples/hf_finetune.py`

import transformers  # noqa: E402

import lotion_fx  # noqa: E402
from lotion_fx.hf_trainer import LotionTrainer  # noqa: E402
from examples.data import Corpus, val_windows  # noqa: E402

METHODS = ("ptq", "qat", "lotion")


class Windows(torch.utils.data.Dataset):
    """`n` random byte windows of the training text, fixed by `seed`; labels = inputs (the model shifts)."""

    def __init__(self, data: torch.Tensor, seq: int, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(data) - seq, (n,), generator=g)
        self.x = torch.stack([data[s : s + seq] for s in starts.tolist()])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def build_model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    torch.manual_seed(args.seed)  # every method starts from the same weights
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max(args.seq, 64), tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


@torch.no_grad()
def val_loss(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.eval()
    return model(input_ids=x.to(model.device), labels=x.to(model.device)).loss.item()


def finetune(method: str, args: argparse.Namespace, train: Windows, val: torch.Tensor) -> tuple[dict, torch.nn.Module]:
    """Train one method with Trainer; returns its record and the trained (prepared) model."""
    config = lotion_fx.LotionConfig(method=method, format=args.format, block_size=args.block_size)
    model = lotion_fx.prepare(build_model(args), config, capture="dynamo")  # still a LlamaForCausalLM
    cuda = torch.cuda.is_available()
    targs = transformers.TrainingArguments(
        output_dir=str(Path(args.out) / "trainer" / method), max_steps=args.steps,
        per_device_train_batch_size=args.batch, learning_rate=args.lr, warmup_steps=max(args.steps // 20, 1),
        weight_decay=0.1, lr_scheduler_type="cosine", logging_steps=max(args.steps // 10, 1),
        save_strategy="no", report_to=[], seed=args.seed, use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(), torch_compile=args.compile,
    )
    # LotionTrainer: transformers.Trainer + lotion_fx.curvature_step once per optimizer step
    trainer = LotionTrainer(model=model, args=targs, train_dataset=train)
    print(f"--- {method}: {args.steps} steps")
    result = trainer.train()
    fp = val_loss(model, val)
    with lotion_fx.quantized_eval(model) as qm:
        q = val_loss(qm, val)
    smooth = lotion_fx.smoothers(model)
    refreshes = max((int(sm.count) for sm in smooth.values() if hasattr(sm, "count")), default=0)
    rec = dict(method=method, train_loss=result.training_loss, val_fp=fp, val_quant=q, g_refreshes=refreshes)
    return rec, model


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--format", default="int4", choices=sorted(lotion_fx.FORMATS))
    p.add_argument("--block-size", type=int, default=None, help="default: the format's (int4: 32)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="Trainer(torch_compile=True)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="hf_finetune_out")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")

    corpus = Corpus.load(max_bytes=args.max_bytes)
    print(f"corpus: {corpus.source} ({len(corpus.train)} train bytes, sha256 {corpus.digest})")
    train = Windows(corpus.train, args.seq, args.steps * args.batch, args.seed)
    val, _ = val_windows(corpus.val, args.seq, args.eval_windows)

    records, models = [], {}
    for method in methods:
        rec, models[method] = finetune(method, args, train, val)
        records.append(rec)
    rows = [[r["method"], f"{r['train_loss']:.4f}", f"{r['val_fp']:.4f}", f"{r['val_quant']:.4f}",
             f"{r['val_quant'] - r['val_fp']:+.4f}", r["g_refreshes"]] for r in records]
    block = args.block_size or "default"
    print(f"\nvalidation loss (nats/byte), {args.format} block {block}, {args.steps} steps, library defaults:")
    print(tabulate(rows, headers=["method", "train", "full precision", args.format, "quant. gap", "g refreshes"],
                   tablefmt="github"))

    best = min(records, key=lambda r: r["val_quant"])["method"]
    model = models[best]
    out = Path(args.out)
    model.save_pretrained(out / f"{best}-trained")  # weights + smoother state, original keys kept

    deployed = lotion_fx.convert(model).eval()  # packed weights, plain nn.Linear again (convert releases it)
    print(f"\nconverted the {best} model:\n{lotion_fx.conversion_report(deployed)}")
    prompt = torch.tensor([list(b"def ")], device=deployed.device)
    tokens = deployed.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    text = bytes(tokens[0].tolist()).decode("utf-8", errors="replace")
    print(f"greedy sample: {text!r}")
    target = out / f"{best}-{args.format}"
    target.mkdir(parents=True, exist_ok=True)
    deployed.config.save_pretrained(target)
    torch.save(deployed.state_dict(), target / "model.pt")
    print(f"saved {out / (best + '-trained')} and {target}")
    for r in records:
        r.update(best=best, sample=text, saved=str(target))
    return records


if __name__ == "__main__":
    main()
