"""PackedLinear: an nn.Linear whose weight is a LotionPackedTensor kept as three plain buffers.

Why: torch.compile treats a tensor-subclass parameter as a graph input that is unwrapped (and
guarded) in Python on every call, about 25 us of host time per weight on an H100 host with torch
2.11, so a 1B decode step of 113 such weights was host-bound at 0.37x bf16
(benchmarks/profile_decode.py). Here the compiled forward sees only plain tensors (codes, scales,
tensor scale); `module.weight` still returns the LotionPackedTensor (for nn.MultiheadAttention,
inspection and dispatch) and the state dict stores it under `weight`, so checkpoints are those of
a Linear holding the subclass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lotion_fx.backends import triton_matmul as K
from lotion_fx.backends.torchao_export import LotionPackedTensor

_INNER = LotionPackedTensor.tensor_data_names  # qdata, scale, tensor_scale


class PackedLinear(nn.Linear):
    """y = x @ dequant(W).T + b with W in our packed layout: Triton kernels on CUDA, F.linear on the
    dequantized weight elsewhere (bit-exact to quantized_eval). Read-only: assigning `weight` raises."""

    def __init__(self, weight: LotionPackedTensor, bias: Tensor | None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._set_packed(weight)
        self.register_parameter("bias", bias if bias is None or isinstance(bias, nn.Parameter)
                                else nn.Parameter(bias, requires_grad=False))

    @classmethod
    def from_linear(cls, linear: nn.Module, weight: LotionPackedTensor) -> PackedLinear:
        """A PackedLinear with `linear`'s bias and the quantized `weight` (out, in)."""
        return cls(weight, getattr(linear, "bias", None))

    def _set_packed(self, w: LotionPackedTensor) -> None:
        for name in _INNER:
            self.register_buffer(name, getattr(w, name), persistent=False)
        self.fmt, self.block, self.weight_dtype = w.fmt, w.block, w.dtype

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to(dtype) / .half() must not cast the codes' scales (the dequantized values would change):
        # the packed buffers follow device moves only; the weight's dtype (dequantize's output) follows.
        packed = {id(getattr(self, n)) for n in _INNER}

        def keep_packed(t: Tensor) -> Tensor:
            out = fn(t)
            return out if id(t) not in packed or out.dtype == t.dtype else t.to(device=out.device)

        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        return super()._apply(keep_packed, recurse)

    @property
    def weight(self) -> LotionPackedTensor:  # type: ignore[override]
        return LotionPackedTensor(self.qdata, self.scale, self.tensor_scale, self.fmt, self.block,
                                  self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return K.packed_linear(x, self.qdata, self.scale, self.tensor_scale, self.bias, self.fmt)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.fmt!r}, block={self.block}")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        w = state_dict.get(prefix + "weight")
        if w is None:
            missing_keys.append(prefix + "weight")
        elif not isinstance(w, LotionPackedTensor) or tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: expected a LotionPackedTensor of shape "
                              f"{(self.out_features, self.in_features)}, got {type(w).__name__} {tuple(w.shape)}; "
                              "load a checkpoint saved from a converted model")
        else:
            self._set_packed(w.to(self.qdata.device))
        rest = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace, in place, every nn.Linear whose weight is a LotionPackedTensor by a PackedLinear
    (same weight object's tensors, same bias): what convert does for its default target."""
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and isinstance(mod.weight, LotionPackedTensor):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, PackedLinear.from_linear(mod, mod.weight))
    return model
