"""`lotion-fx audit module:factory` and `python -m lotion_fx`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lotion_fx
from lotion_fx.cli import main

TESTS = Path(__file__).parent


def test_audit_json_with_export_capture(capsys: pytest.CaptureFixture) -> None:
    code = main(["audit", "audit_factories:tiny_gpt", "--format", "int8", "--block-size", "row",
                 "--example-input-shape", "2,16", "--example-input-dtype", "int64", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (d["capture"], d["config"]["format"], d["config"]["block_size"]) == ("export", "int8", "row")
    assert d["summary"]["rewritten"] == 9
    assert all(l["block"] == l["shape"][1] for l in d["layers"])  # per row
    assert d["layers"][-1]["aliases"] == ["lm_head.weight"]


def test_audit_table_with_data_and_diff(capsys: pytest.CaptureFixture) -> None:
    code = main(["audit", "audit_factories:deep_mlp", "--data", "audit_factories:deep_mlp_data",
                 "--method", "qat", "--skip", "layers.4", "--diff"])
    out = capsys.readouterr().out
    assert code == 0
    assert "method=qat, format=int4, block_size=32 (format default))" in out  # resolved, not None
    assert "g from data" in out and "Spearman(estimate, measured)" in out
    assert "skipped by pattern 'layers.4'" in out and "graph diff: 16 nodes inserted" in out


def test_zero_rewritten_exits_nonzero(capsys: pytest.CaptureFixture) -> None:
    with pytest.warns(RuntimeWarning):
        assert main(["audit", "audit_factories:tied_mlp", "--skip", "*"]) == 1
    assert "NO LINEAR WEIGHT WAS REWRITTEN" in capsys.readouterr().out


def test_bad_factory_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="package.module:function"):
        main(["audit", "audit_factories"])
    with pytest.raises(SystemExit, match="has no attribute 'nope'"):
        main(["audit", "audit_factories:nope"])


def test_python_dash_m(tmp_path: Path) -> None:
    """The installed entry point, in a fresh interpreter, run from the user's directory."""
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lotion_fx", "audit", "my_models:make", "--format", "mxfp4",
                           "--markdown"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| 0.weight" in proc.stdout and "| 2.weight" in proc.stdout and "mxfp4" in proc.stdout


def test_bytes_after_export_equal_what_convert_makes(capsys: pytest.CaptureFixture) -> None:
    """The audit's 'bytes after export' is the size of the tensors convert builds (int4 and int8)."""
    import audit_factories

    for fmt in ("int4", "int8"):
        assert main(["audit", "audit_factories:deep_mlp", "--format", fmt, "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        torch.manual_seed(0)  # the CLI's --seed default: the same weights
        # ptq: untrained, so LOTION's "penalty never acted" warning would only be noise here
        prepared = lotion_fx.prepare(audit_factories.deep_mlp(), lotion_fx.LotionConfig(method="ptq", format=fmt))
        report = lotion_fx.conversion_report(lotion_fx.convert(prepared))
        assert d["summary"]["bytes_export"] == report.bytes_after
        assert [l["bytes_export"] for l in d["layers"]] == [r.bytes_after for r in report.layers]


def test_state_dict_is_loaded_and_library_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import audit_factories

    torch.manual_seed(1)
    model = audit_factories.deep_mlp()
    with torch.no_grad():
        model.layers[0].weight.mul_(100.0)  # visible in the audited scale range
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    assert main(["audit", "audit_factories:deep_mlp", "--state-dict", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    w = model.layers[0].weight.detach()
    assert d["layers"][0]["scale_max"] == pytest.approx(float(w.abs().amax()) / 7, rel=1e-6)

    # a prepared model's checkpoint (with lotion.* state) loads too
    prepared = lotion_fx.prepare(audit_factories.deep_mlp(), lotion_fx.LotionConfig())
    torch.save(prepared.state_dict(), path)
    assert main(["audit", "audit_factories:deep_mlp", "--state-dict", str(path), "--json"]) == 0
    capsys.readouterr()

    torch.save({"nope": torch.zeros(1)}, path)
    with pytest.raises(SystemExit, match="does not fit the model"):
        main(["audit", "audit_factories:deep_mlp", "--state-dict", str(path)])
    # a library error (block size that divides nothing) is one line on stderr, no traceback
    assert main(["audit", "audit_factories:deep_mlp", "--block-size", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lotion-fx: error: ") and "block_size 7" in err
    assert err.count("\n") == 1 and "Traceback" not in err
