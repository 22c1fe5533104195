"""CI smoke test of the LM examples: compare.py at a tiny size runs every method to finite losses."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` without install

from examples import compare
from examples.data import Batches, Corpus, val_windows
from examples.train_lm import RunConfig, train


def test_corpus_is_deterministic_and_split() -> None:
    a, b = Corpus.load(max_bytes=200_000), Corpus.load(max_bytes=200_000)
    assert a.digest == b.digest and torch.equal(a.train, b.train)
    assert len(a.train) + len(a.val) == 200_000 and 0 <= int(a.train.min()) and int(a.train.max()) < 256
    x, y = Batches(a.train, seq=32, batch=4, seed=0, rank=1, world=2).next()
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    vx, vy = val_windows(a.val, 32, 8)
    assert torch.equal(vx[:, 1:], vy[:, :-1])


def test_compare_tiny_every_method_finite(capsys: pytest.CaptureFixture, tmp_path) -> None:
    out = tmp_path / "records.json"
    compare.main(["--seeds", "0", "--size", "tiny", "--steps", "12", "--batch", "4", "--seq", "32",
                  "--max-bytes", "200000", "--eval-windows", "8", "--json", str(out)])
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())
    assert {r["config"]["method"] for r in records} == set(compare.METHODS)
    for r in records:
        assert math.isfinite(r["val_loss_fp"]) and math.isfinite(r["val_loss_quant"])
        # an untrained byte model sits at log(256) = 5.55 nats; 12 steps reach ~3.6: it learned
        assert r["val_loss_quant"] < math.log(256) - 1.0
    for row in ("full precision", "ptq", "qat", "lotion", "lotion_sampled"):
        assert row in printed


def test_train_record_and_seed_reproducible(tmp_path) -> None:
    rc = RunConfig(method="lotion_sampled", size="tiny", steps=5, batch=2, seq=16, max_bytes=100_000,
                   eval_windows=4, quiet=True, out=str(tmp_path / "r.json"))
    a, b = train(rc), train(rc)
    assert a["val_loss_fp"] == b["val_loss_fp"] and a["val_loss_quant"] == b["val_loss_quant"]
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["tokens"] == 5 * 2 * 16 and rec["config"]["method"] == "lotion_sampled"
