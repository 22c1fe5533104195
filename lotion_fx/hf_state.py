"""Reload the smoothing state of a capture='dynamo' model from a `save_pretrained` directory.

`save_pretrained` (and Trainer's checkpoints) already write the smoothers' buffers beside the
weights, as `<linear>.lotion.<buffer>`. `from_pretrained` builds an unprepared model and drops
those keys; after `prepare` this puts them back:

    model = lotion_fx.prepare(AutoModelForCausalLM.from_pretrained(path), config, capture="dynamo")
    lotion_fx.load_smoother_state(model, path)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .api import smoothers
from .smoother import LotionSmoother


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{directory} holds no model.safetensors (or its index); save with "
        "model.save_pretrained(path) (safetensors is the default) or point at a Trainer checkpoint"
    )


def load_smoother_state(model: nn.Module, directory: str | Path) -> list[str]:
    """Load every smoother buffer of the prepared `model` from the directory; returns the keys loaded.

    Raises (changing nothing) when a buffer is missing or has another shape, e.g. because the
    directory was saved before prepare, or with another config (method, format, curvature).
    """
    from safetensors import safe_open

    smoothers(model)  # a clear error when model is not prepared
    wanted = {f"{name}.{b}": buf for name, sm in model.named_modules() if isinstance(sm, LotionSmoother)
              for b, buf in sm.named_buffers() if b not in sm._non_persistent_buffers_set}
    found: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(Path(directory)):
        with safe_open(str(f), framework="pt") as st:
            for key in wanted.keys() & set(st.keys()):
                found[key] = st.get_tensor(key)
    missing = sorted(wanted.keys() - found.keys())
    if missing:
        raise KeyError(
            f"{directory} lacks {len(missing)} smoother buffers (e.g. {missing[:3]}): it was saved before "
            "lotion_fx.prepare, or prepared with another config (method / curvature); the model was left unchanged"
        )
    for name, sm in model.named_modules():  # load_state_dict's checks, before anything changes
        if isinstance(sm, LotionSmoother):
            sm.check_loadable(found, f"{name}.")
    bad = [f"{k}: saved {tuple(found[k].shape)}, model {tuple(b.shape)}"
           for k, b in wanted.items() if found[k].shape != b.shape]
    if bad:
        raise ValueError("smoother buffers do not fit the model (another model or format?): " + "; ".join(bad[:3]))
    model.load_state_dict(found, strict=False)  # only smoother keys: the weights are untouched
    return sorted(wanted)
