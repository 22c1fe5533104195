"""`lotion-fx audit module:factory`: build a user's model, prepare it, print the audit report."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Callable, Sequence

import torch

from .api import prepare
from .audit import audit
from .config import METHODS, LotionConfig
from .formats import FORMATS
from lotion_fx.passes import CaptureError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


def _load(spec: str, what: str) -> Callable[..., Any]:
    """Resolve 'package.module:function' (the current directory is importable, as in `python -m`)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise SystemExit(f"lotion-fx: {what} must look like 'package.module:function', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise SystemExit(f"lotion-fx: cannot import {mod_name!r} for {what}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"lotion-fx: module {mod_name!r} has no attribute {attr!r} ({what})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SystemExit(f"lotion-fx: {spec!r} is not callable ({what})")
    return obj


def _block_size(v: str) -> int | str | None:
    if v in ("row", "tensor", "default"):
        return None if v == "default" else v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be an int, 'row', 'tensor' or 'default', got {v!r}")


def _shape(v: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in v.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be comma-separated ints such as 2,128, got {v!r}")
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape dims must be >= 1, got {v!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lotion-fx", description="LOTION graph transform tools.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit", help="prepare a model built by module:factory and print the audit report")
    a.add_argument("factory", help="'package.module:function' returning an nn.Module (called with no args)")
    a.add_argument("--format", default="int4", choices=sorted(FORMATS))
    a.add_argument("--block-size", type=_block_size, default=None,
                   help="columns per block, 'row', 'tensor' or 'default' (the format's default)")
    a.add_argument("--method", default="lotion", choices=METHODS)
    a.add_argument("--skip", action="append", default=[], help="fnmatch pattern of module names to leave alone")
    a.add_argument("--example-input-shape", type=_shape, default=None,
                   help="capture with torch.export on one input of this shape (e.g. 2,128); "
                        "default: torch.fx.symbolic_trace")
    a.add_argument("--example-input-dtype", default="float32", choices=sorted(DTYPES),
                   help="dtype of the example input (int64 gives token ids, all zero)")
    a.add_argument("--data", default=None,
                   help="'package.module:function' returning (batches, loss_fn(model, batch)) to measure "
                        "each layer's loss increase")
    a.add_argument("--seed", type=int, default=0, help="torch.manual_seed before calling the factory")
    a.add_argument("--state-dict", default=None, metavar="PATH",
                   help="torch.save'd state dict to load: the model's own (loaded before prepare) or a "
                        "prepared model's (with its lotion.* curvature state, loaded after prepare)")
    out = a.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the JSON report (schema lotion_fx.audit/1)")
    out.add_argument("--markdown", action="store_true", help="print the markdown report")
    a.add_argument("--diff", action="store_true", help="also print the graph diff")
    return p


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"lotion-fx: --state-dict {path!r}: no such file") from None
    except Exception as e:
        raise SystemExit(f"lotion-fx: --state-dict {path!r} is not a torch.save'd state dict: {e}") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise SystemExit(f"lotion-fx: --state-dict {path!r} holds a {type(sd).__name__}, not a state dict")
    return sd


def _load_state(model: torch.nn.Module, sd: dict, path: str) -> None:
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise SystemExit(f"lotion-fx: --state-dict {path!r} does not fit the model: "
                         + " ".join(str(e).split())) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lotion-fx` console script and of `python -m lotion_fx`.

    Errors of the library (bad config, bad model, failed capture) print as one line, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return _audit(args)
    except (ValueError, TypeError, CaptureError, NotImplementedError) as e:
        print(f"lotion-fx: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _audit(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = _load(args.factory, "the model factory")()
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"lotion-fx: {args.factory} returned {type(model).__name__}, not an nn.Module")
    example = None
    if args.example_input_shape is not None:
        dtype = DTYPES[args.example_input_dtype]
        x = torch.zeros if dtype == torch.int64 else torch.randn
        example = (x(args.example_input_shape, dtype=dtype),)
    data = _load(args.data, "--data")() if args.data else None
    config = LotionConfig(method=args.method, format=args.format, block_size=args.block_size, skip=tuple(args.skip))
    target: torch.nn.Module = model
    if args.state_dict is not None:
        sd = _read_state_dict(args.state_dict)
        if any(k.startswith("lotion.") for k in sd):  # a prepared model's checkpoint
            target = prepare(model, config, example)
            _load_state(target, sd, args.state_dict)
        else:
            _load_state(model, sd, args.state_dict)
    report = audit(target, data, config=config, example_inputs=example)
    if args.json:
        print(report.to_json())
    elif args.markdown:
        print(report.to_markdown(), end="")
    else:
        print(report)
        if args.diff and report.diff is not None:
            print()
            print(report.diff)
    return 0 if report.layers else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
