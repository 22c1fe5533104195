"""Build torchao tensor subclasses from lotion_fx's own integer codes and block scales.

Every tensor here is assembled from `reference.quantize` (codes) and the scales of
`reference.block_scales` through torchao's plain constructors, never through torchao's own
quantize functions, so `tensor.dequantize()` equals `fake_quantize(w, fmt, block)` element for
element. Targets (torchao 0.18):

| our format | torchao class                 | storage                                   |
|------------|-------------------------------|-------------------------------------------|
| int8       | Int8Tensor (default)          | int8 codes, fp32 scale per block          |
| int8, int4 | IntxUnpackedToInt8Tensor      | int8 codes, fp32 scale, int8 zero point 0 |
| nvfp4      | NVFP4Tensor (weight-only)     | packed E2M1 x2, E4M3 block scales, fp32   |
| mxfp4      | MXTensor (storage only)       | packed E2M1 x2, E8M0 block scales         |
| int8, int4,| LotionPackedTensor (default)  | the packed layout of backends.triton_matmul; |
| nvfp4,     |                               | linear runs our Triton kernels on CUDA    |
| mxfp4      |                               | (mxfp4: E8M0 bits as uint8, no kernel yet) |

`LotionPackedTensor` is our own torchao-style subclass (`TorchAOBaseTensor`): on CUDA its
`F.linear` calls `lotion_fx::weight_only_linear` (Triton, traced by torch.compile without a graph
break); on CPU it is `F.linear(x, dequantize())`, the exact computation of `quantized_eval`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch.utils._pytree import tree_map_only
from torchao.utils import TorchAOBaseTensor

from lotion_fx import reference as R
from lotion_fx.backends import triton_matmul as K
from lotion_fx.formats import PACKED, get_format

# Which classes can hold a format, and its default, are the format's facts (Format.torchao_targets).
# classes whose embedding op works (a tied Embedding can share the quantized weight).
EMBEDDING_OK = (PACKED, "Int8Tensor", "IntxUnpackedToInt8Tensor")
RUNNABLE_DEVICES = ("cpu", "cuda")  # every weight-only path below is dequantize + torch matmul
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(
    fmt: str, block: int, target: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why torchao 0.18 cannot hold/run this weight bit-exactly, or None when it can."""
    form = get_format(fmt)
    if target not in form.torchao_targets:
        return f"torchao target {target!r} cannot hold format {form.name!r}; choose one of {list(form.torchao_targets)}"
    if target == "MXTensor":
        return (
            "torchao 0.18 MXTensor has no weight-only linear (its matmul also quantizes the "
            "activations, so the output would differ from quantized_eval); convert mxfp4 to the default "
            f"{PACKED} (runs dequantize + matmul), or build MXTensor with backends.torchao_export.to_torchao "
            "for storage"
        )
    if device.type not in RUNNABLE_DEVICES:
        return f"torchao {target} weight-only linear runs on {list(RUNNABLE_DEVICES)}, not {device.type!r}"
    if dtype not in WEIGHT_DTYPES:
        return f"torchao tensors dequantize to float32/bfloat16/float16, not {dtype}; cast the model first"
    if len(shape) != 2:
        return f"weight of shape {shape} is not 2-D"
    if target == PACKED and shape[1] % form.codes_per_byte:
        return f"{form.name} packs {form.codes_per_byte} codes per byte: in_features {shape[1]} must be a multiple"
    if target == PACKED and form.tensor_scale_bytes and block == R.PER_TENSOR:
        return (f"{form.name} needs block scales under its tensor scale: use a block size (16 is the NVFP4 "
                "recipe), not per-tensor")
    if target == "NVFP4Tensor" and block != 16:
        return f"torchao NVFP4Tensor has block size 16 only, the layer uses {block or 'per-tensor'}"
    return None


def block_spec(block: int) -> int | str:
    """A resolved block (0 = per tensor) as the block_size spec `reference` takes."""
    return "tensor" if block == R.PER_TENSOR else block


def _torchao_block(shape: tuple[int, ...], block: int) -> tuple[int, int]:
    n, k = shape
    return (n, k) if block == R.PER_TENSOR else (1, block)


def _scale_grid(scales: Tensor, shape: tuple[int, ...], block: int) -> Tensor:
    """Our (rows, nblocks) scales as torchao's (N // bn, K // bk) fp32 grid."""
    bn, bk = _torchao_block(shape, block)
    return scales.to(torch.float32).reshape(shape[0] // bn, shape[1] // bk).contiguous()


def _pack_e2m1(codes: Tensor) -> Tensor:
    """E2M1 grid values -> torchao's packed uint8 (two codes per byte, low nibble first)."""
    from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked, pack_uint4

    return pack_uint4(f32_to_f4_unpacked(codes.to(torch.float32).contiguous()))


def _e8m0_bits(scales: Tensor) -> Tensor:
    """mxfp4's block scales (exact powers of two, 2^-127 to 2^127) as their E8M0 bits, uint8 e = log2 + 127."""
    return (torch.frexp(scales.to(torch.float32))[1] + 126).to(torch.uint8)


def _nvfp4_checked(w: Tensor, block: int, scales: Tensor) -> tuple[Tensor, Tensor]:
    """E4M3 block scales (rows, nblocks) and the fp32 tensor scale, checked against block_scales."""
    e4m3, tensor_scale = R.nvfp4_scales(w, block)
    e4m3 = e4m3.squeeze(-1)
    # block_scales is e4m3 * tensor_scale wherever the block is non-zero (all-zero blocks
    # have code 0, so their stored scale does not matter).
    live = scales != 1
    if not torch.equal((e4m3 * tensor_scale)[live], scales[live]):
        raise AssertionError("nvfp4 scales disagree with block_scales")
    return e4m3, tensor_scale


def to_torchao(weight: Tensor, fmt: str, block: int, target: str | None = None) -> Tensor:
    """The torchao tensor holding RTN(weight) in `fmt` with `block` columns (0 = per tensor)."""
    fmt = get_format(fmt).name
    target = target or get_format(fmt).default_torchao_target
    w = weight.detach()
    shape = tuple(w.shape)
    codes, scales = R.quantize(w, fmt, block_spec(block))
    if target == PACKED:
        if fmt == "nvfp4":
            e4m3, tensor_scale = _nvfp4_checked(w, block, scales)
            scale = e4m3.to(torch.float32).to(torch.float8_e4m3fn).reshape(shape[0], shape[1] // block)
        elif fmt == "mxfp4":
            scale, tensor_scale = _e8m0_bits(_scale_grid(scales, shape, block)), torch.ones((), device=w.device)
        else:
            scale, tensor_scale = _scale_grid(scales, shape, block), torch.ones((), device=w.device)
        return LotionPackedTensor(K.pack_codes(codes, fmt), scale, tensor_scale.to(torch.float32).reshape(()),
                                  fmt, block, w.dtype)
    if target == "Int8Tensor":
        from torchao.quantization import Int8Tensor

        return Int8Tensor(
            codes.to(torch.int8), _scale_grid(scales, shape, block), list(_torchao_block(shape, block)), w.dtype
        )
    if target == "IntxUnpackedToInt8Tensor":
        from torchao.quantization import IntxUnpackedToInt8Tensor

        s = _scale_grid(scales, shape, block)
        return IntxUnpackedToInt8Tensor(
            qdata=codes.to(torch.int8),
            scale=s,
            zero_point=torch.zeros_like(s, dtype=torch.int8),
            target_dtype=torch.int8 if get_format(fmt).bits == 8 else torch.int4,
            block_size=_torchao_block(shape, block),
            dtype=w.dtype,
            activation_quantization=None,
        )
    if target == "NVFP4Tensor":
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

        e4m3, tensor_scale = _nvfp4_checked(w, block, scales)
        return NVFP4Tensor(
            _pack_e2m1(codes),
            e4m3.to(torch.float32).to(torch.float8_e4m3fn).reshape(shape[0], shape[1] // block),
            block,
            w.dtype,
            per_tensor_scale=tensor_scale.to(torch.float32).reshape(()),
            act_per_tensor_scale=None,
            is_swizzled_scales=False,
            use_triton_kernel=False,
            act_quant_kwargs=None,
        )
    if target == "MXTensor":
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

        biased = _e8m0_bits(scales.reshape(shape[0], shape[1] // block))
        return MXTensor(
            _pack_e2m1(codes), biased.view(torch.float8_e8m0fnu), torch.float4_e2m1fn_x2,
            block, w.dtype, KernelPreference.EMULATED, None, False,
        )
    raise ValueError(f"unknown torchao target {target!r}: choose one of {list(get_format(fmt).torchao_targets)}")


def nbytes(t: Tensor) -> int:
    """Bytes a (possibly torchao subclass) tensor stores, summing its inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:  # a plain tensor or Parameter
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(nbytes(getattr(t, n)) for n in names if getattr(t, n) is not None)


class LotionPackedTensor(TorchAOBaseTensor):
    """A Linear weight held as our packed int8/int4/nvfp4 codes and scales (backends.triton_matmul).

    `dequantize()` is bit-exact to `fake_quantize(w, fmt, block)`. `F.linear` runs the Triton
    weight-only kernels when weight and input are on CUDA, else `F.linear(x, dequantize())`.
    `block` is the block size in columns (0 = per tensor). Ops without a dedicated
    implementation (e.g. `aten.t` when nn.MultiheadAttention reads `out_proj.weight`) run on the
    dequantized weight, so they compute what `quantized_eval` does; in-place ops are refused.
    """

    tensor_data_names = ["qdata", "scale", "tensor_scale"]
    tensor_attribute_names = ["fmt", "block", "dtype"]

    def __new__(cls, qdata: Tensor, scale: Tensor, tensor_scale: Tensor, fmt: str, block: int, dtype: torch.dtype):
        k = qdata.shape[1] * get_format(fmt).codes_per_byte
        return torch.Tensor._make_wrapper_subclass(
            cls, (qdata.shape[0], k), dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata: Tensor, scale: Tensor, tensor_scale: Tensor, fmt: str, block: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.qdata, self.scale, self.tensor_scale = qdata, scale, tensor_scale
        self.fmt, self.block = fmt, block

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(fmt={self.fmt!r}, block={self.block}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype}, device={self.device})")

    def dequantize(self, output_dtype: torch.dtype | None = None) -> Tensor:
        """The weight `quantized_eval` uses, as a plain tensor."""
        return K.dequantize_reference(self.qdata, self.scale, self.tensor_scale, self.fmt, output_dtype or self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = cls._ATEN_OP_TABLE.get(cls, {}).get(func)
        if impl is not None:
            return impl(func, types, args, kwargs)
        if func._schema.is_mutable:
            raise NotImplementedError(
                f"{func} would modify a LotionPackedTensor in place; quantized weights are read-only "
                "(train the prepared model instead, then convert again)"
            )
        deq = lambda t: t.dequantize()  # noqa: E731
        return func(*tree_map_only(cls, deq, args), **tree_map_only(cls, deq, kwargs))


_implements = LotionPackedTensor.implements
_implements_torch_function = LotionPackedTensor.implements_torch_function


@_implements(torch.ops.aten.linear.default)
@_implements_torch_function(torch.nn.functional.linear)
def _linear(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return K.packed_linear(x, w.qdata, w.scale, w.tensor_scale, bias, w.fmt)


@_implements(torch.ops.aten.embedding.default)
def _embedding(func, types, args, kwargs):
    """Rows of a (tied) embedding: gather the packed rows and their scales, dequantize only those."""
    w, idx = args[0], args[1]
    flat = idx.reshape(-1)
    scale = w.scale[flat] if w.scale.shape[0] == w.shape[0] else w.scale
    rows = K.dequantize_reference(w.qdata[flat], scale, w.tensor_scale, w.fmt, w.dtype)
    return rows.reshape(*idx.shape, w.shape[1])


torch.serialization.add_safe_globals([LotionPackedTensor])


_ST_KEY = "lotion_fx.packed"


def save_safetensors(state_dict: dict[str, Tensor], path: str) -> None:
    """Write a converted model's state dict as safetensors: our packed tensors as their inner
    tensors plus JSON metadata, torchao's own subclasses through torchao's flattening."""
    import json

    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    plain, ours, packed, first = {}, {}, {}, {}
    for key, v in state_dict.items():
        v = v.data if isinstance(v, torch.nn.Parameter) else v
        if not isinstance(v, LotionPackedTensor):
            plain[key] = v
        elif (v.qdata.data_ptr(), v.qdata.shape) in first:  # a tied weight: stored once, rebuilt as the same tensor
            packed[key] = {"alias_of": first[(v.qdata.data_ptr(), v.qdata.shape)]}
        else:
            first[(v.qdata.data_ptr(), v.qdata.shape)] = key
            packed[key] = {"fmt": v.fmt, "block": v.block, "dtype": str(v.dtype).removeprefix("torch.")}
            for name in LotionPackedTensor.tensor_data_names:
                ours[f"{key}:{name}"] = getattr(v, name).contiguous()
    data, meta = flatten_tensor_state_dict(plain)
    save_file({**data, **ours}, path, metadata={**meta, _ST_KEY: json.dumps(packed)})


def load_safetensors(path: str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The state dict `save_safetensors` wrote, with LotionPackedTensor / torchao tensors rebuilt."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(path, "pt") as f:
        meta = dict(f.metadata() or {})
    packed = json.loads(meta.pop(_ST_KEY, "{}"))
    tensors = load_file(path, device=str(device))
    out = {}
    for key, attrs in packed.items():
        if "alias_of" in attrs:
            continue
        inner = [tensors.pop(f"{key}:{n}") for n in LotionPackedTensor.tensor_data_names]
        out[key] = LotionPackedTensor(*inner, attrs["fmt"], int(attrs["block"]), getattr(torch, attrs["dtype"]))
    restored, leftover = unflatten_tensor_state_dict(tensors, meta)
    if leftover:
        raise ValueError(f"{path}: tensors {sorted(leftover)[:5]} could not be rebuilt")
    out.update({key: out[attrs["alias_of"]] for key, attrs in packed.items() if "alias_of" in attrs})
    return {**restored, **out}
