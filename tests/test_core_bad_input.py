"""Bad input: each case raises a clear error naming the problem and the fix, and leaves the model as it was."""

import copy

import pytest
import torch
from torch import nn

import lotion_fx


class MLP(nn.Module):
    def __init__(self, d_in: int = 48) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "params": dict(model.named_parameters()), "modules": [n for n, _ in model.named_modules()]}


def assert_untouched(model: nn.Module, snap: dict) -> None:
    assert [n for n, _ in model.named_modules()] == snap["modules"]
    assert all(p is snap["params"][n] for n, p in model.named_parameters())
    assert all(torch.equal(v, snap["state"][k]) for k, v in model.state_dict().items())
    assert not lotion_fx.is_prepared(model)


@pytest.mark.parametrize("kwargs, match", [
    (dict(format="int3"), r"unknown format 'int3'.*\['int4', 'int8', 'mxfp4', 'nvfp4'\]"),
    (dict(method="lotus"), r"unknown method 'lotus'.*'lotion_sampled'"),
    (dict(curvature="hessian"), r"unknown curvature 'hessian'"),
    (dict(grad_accum_steps=0), r"grad_accum_steps must be an int >= 1"),
    (dict(lam=float("nan")), r"lam must be a finite number"),
    (dict(curvature_batch_fraction=0), r"curvature_batch_fraction must be in \(0, 1\], got 0"),
    (dict(curvature_batch_fraction=1.5), r"curvature_batch_fraction must be in \(0, 1\], got 1.5"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lotion_fx.LotionConfig(**kwargs)


def test_block_size_not_dividing_names_the_layer_and_sizes():
    model = MLP(d_in=48)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'fc1' \(weight \(32, 48\)\): block_size 32 does not divide in_features 48; use a divisor such as \[8, 16\]"):
        lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=32))
    assert_untouched(model, snap)
    # skipping the offending layer is the documented way out
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=32, skip=("fc1",)))
    assert set(lotion_fx.smoothers(prepared)) == {"fc2.weight"}


def test_non_finite_weights_name_the_layer():
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("inf")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'fc2': weight has non-finite values"):
        lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16))
    assert_untouched(model, snap)


def test_model_without_linear_warns_and_is_returned_unprepared():
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU())
    snap = snapshot(model)
    with pytest.warns(UserWarning, match="found no Linear weight to rewrite in Sequential.*returning the model unprepared"):
        out = lotion_fx.prepare(model)
    assert out is model
    assert_untouched(model, snap)


def test_already_prepared_and_unprepared_models():
    model = MLP()
    prepared = lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16))
    with pytest.raises(ValueError, match=r"already prepared.*lotion_fx.original\(prepared\)"):
        lotion_fx.prepare(prepared, lotion_fx.LotionConfig(block_size=16))
    with pytest.raises(TypeError, match="MLP is not a prepared model: call lotion_fx.prepare"):
        with lotion_fx.quantized_eval(MLP()):
            pass
    with pytest.raises(TypeError, match="not a prepared model"):
        lotion_fx.penalty(MLP())
    with pytest.raises(TypeError, match="expects an nn.Module"):
        lotion_fx.prepare(lambda x: x)


@pytest.mark.parametrize("example_inputs, err, match", [
    ("tensor", TypeError, r"not a bare tensor"),
    ("three", TypeError, r"example_inputs do not fit MLP.forward\(x: torch.Tensor\).*too many positional"),
    ("kwarg", TypeError, r"example_inputs do not fit MLP.forward.*unexpected keyword argument 'mask'"),
    ("shape", lotion_fx.passes.CaptureError, r"torch.export failed on MLP with the given example_inputs"),
])
def test_example_inputs_of_the_wrong_structure(example_inputs, err, match):
    model = MLP()
    x = torch.randn(2, 48)
    example_inputs = {"tensor": x, "three": (x, x, x), "kwarg": ((x,), {"mask": x}), "shape": (torch.randn(2, 7),)}[example_inputs]
    snap = snapshot(model)
    with pytest.raises(err, match=match):
        lotion_fx.prepare(model, lotion_fx.LotionConfig(block_size=16), example_inputs=example_inputs)
    assert_untouched(model, snap)
    assert torch.equal(copy.deepcopy(model)(x), model(x))
