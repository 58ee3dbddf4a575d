"""4-bit (NF4/FP4) and 8-bit linear layers in pure torch, stored as bitsandbytes stores them.

Why: QLoRA needs a frozen quantized base, and machines without bitsandbytes (or its kernels)
still need to train and export one with the exact codes and absmax values bitsandbytes would
have written. The format itself (code tables, nibble order, double quantization, rounding order)
lives once, in numpy, in :mod:`onnx_peft.quant.formats`; this file holds the layers, the few
lines that replay that format's dequantization with torch ops on the layer's device, and the
seam helpers the LoRA tuner calls on any quantized linear (ours or bitsandbytes')::

    x [..., in] ──► x.to(compute_dtype) @ dequant(weight)^T + bias ──► y [..., out] (x's dtype)

    Linear4bit buffers (bitsandbytes' layout):
      weight  uint8 [out*in/2, 1]   two codes per byte, first in the high nibble
      absmax  float32 [blocks]      (uint8 [blocks] with double_quant, plus nested_absmax
                                     float32 [ceil(blocks/256)], nested_quant_map [256], nested_offset [])
      quant_map float32 [16]        the NF4 or FP4 code
    Linear8bit buffers (bitsandbytes' Linear8bitLt): weight int8 [out, in], SCB float32 [out]
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OnnxPeftError
from . import formats
from .formats import QuantizationError, QuantState4bit

INT8_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it
_NESTED_KEYS = ("nested_absmax", "nested_quant_map", "nested_offset")


# ---------------------------------------------------------------- torch replay of formats.py


def _dequantize_4bit_torch(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                           shape: tuple[int, int], blocksize: int) -> torch.Tensor:
    """formats.dequantize_4bit with torch ops: ``quant_map[nibble] * absmax[block]`` -> [out, in]."""
    n = shape[0] * shape[1]
    flat = packed.reshape(-1)
    nibbles = torch.stack((flat >> 4, flat & 0x0F), dim=-1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (quant_map[nibbles] * scale).reshape(shape)


def _dequantize_nested_torch(codes: torch.Tensor, nested_absmax: torch.Tensor,
                             nested_quant_map: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """formats.dequantize_nested_absmax with torch ops: ``code[q] * nested_absmax[block] + offset``."""
    scale = nested_absmax.repeat_interleave(formats.NESTED_BLOCKSIZE)[: codes.numel()]
    return nested_quant_map[codes.long()] * scale + offset


def _dequantize_int8_torch(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """formats.dequantize_int8 with torch ops: ``CB * SCB[row] * (1/127)`` -> float32 [out, in]."""
    return cb.float() * scb.reshape(-1, 1).float() * INT8_SCALE


def _weight_numpy(weight: torch.Tensor) -> np.ndarray:
    return weight.detach().to("cpu", torch.float32).contiguous().numpy()


def _tensor(array, dtype: type, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=dtype)).to(device)  # np.array copies


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


class _FixedDtypeBuffers(nn.Module):
    """Quant-state buffers follow ``.to(device)`` but never ``.half()``: rounding absmax or the
    code to fp16 would silently change every dequantized weight."""

    _fixed: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        kept = {k: self._buffers[k] for k in self._fixed if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for key, old in kept.items():
            new = self._buffers[key]
            if new.dtype != old.dtype:
                self._buffers[key] = old.to(new.device)
        return self


# ---------------------------------------------------------------- layers


class Linear4bit(_FixedDtypeBuffers):
    """NF4/FP4 linear, bit-compatible with ``bitsandbytes.nn.Linear4bit``. x: [..., in] -> [..., out]."""

    _fixed = ("absmax", "quant_map", *_NESTED_KEYS)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = False,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        formats._check_4bit(quant_type, blocksize, f"Linear4bit({in_features}, {out_features})")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        blocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                   device=device))
        self.register_buffer("quant_map", torch.from_numpy(formats.CODES_4BIT[quant_type].copy()).to(device))
        if double_quant:
            nested_blocks = -(-blocks // formats.NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax", torch.zeros(nested_blocks, device=device))
            self.register_buffer("nested_quant_map", torch.from_numpy(formats.DYNAMIC_CODE.copy()).to(device))
            self.register_buffer("nested_offset", torch.zeros((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False, compute_dtype: torch.dtype = torch.float32,
                    name: str = "weight") -> Linear4bit:
        """Quantize ``linear.weight [out, in]`` as ``bitsandbytes.functional.quantize_4bit`` would."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type, blocksize,
                    double_quant, compute_dtype, device=linear.weight.device)
        layer.load_quant_state(_quantize_4bit(linear.weight, quant_type, blocksize, double_quant, name))
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def load_quant_state(self, state: QuantState4bit) -> None:
        """Write ``state`` (codes, absmax, nested absmax) into this layer's buffers."""
        if state.shape != (self.out_features, self.in_features) or state.quant_type != self.quant_type \
                or state.blocksize != self.blocksize or (state.nested is not None) != self.double_quant:
            raise QuantizationError(
                f"a {state.quant_type} state of shape {list(state.shape)} (block {state.blocksize}, double "
                f"quant {state.nested is not None}) does not fit {self!r}; build the layer from the state's "
                "own settings with Linear4bit.from_quant_state")
        device, nested = self.weight.device, state.nested
        self.weight = _tensor(state.packed.reshape(-1, 1), np.uint8, device)
        if nested is None:
            self.absmax = _tensor(state.absmax, np.float32, device)
            return
        self.absmax = _tensor(nested["absmax"], np.uint8, device)
        self.nested_absmax = _tensor(nested["nested_absmax"], np.float32, device)
        self.nested_quant_map = _tensor(nested["nested_quant_map"], np.float32, device)
        self.nested_offset = _tensor(nested["nested_offset"], np.float32, device)

    @classmethod
    def from_quant_state(cls, state: QuantState4bit, bias: torch.Tensor | None = None,
                         compute_dtype: torch.dtype = torch.float32) -> Linear4bit:
        """A layer holding exactly ``state`` (e.g. one read from a bitsandbytes checkpoint)."""
        out_features, in_features = state.shape
        layer = cls(in_features, out_features, bias is not None, state.quant_type, state.blocksize,
                    state.nested is not None, compute_dtype)
        layer.load_quant_state(state)
        if bias is not None:
            layer.bias.data = bias.detach().clone()
        return layer

    def float_absmax(self) -> torch.Tensor:
        """float32 [blocks]: the absmax values, de-double-quantized when stored nested."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_nested_torch(self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_offset)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in], equal to ``bitsandbytes.functional.dequantize_4bit``."""
        return _dequantize_4bit_torch(self.weight, self.float_absmax(), self.quant_map,
                                      (self.out_features, self.in_features), self.blocksize)

    def quant_state(self) -> QuantState4bit:
        """This layer's codes and absmax as a numpy :class:`QuantState4bit` (for ONNX export)."""
        nested = None
        if self.double_quant:
            nested = {"absmax": _numpy(self.absmax), "nested_absmax": _numpy(self.nested_absmax),
                      "nested_quant_map": _numpy(self.nested_quant_map),
                      "nested_offset": float(self.nested_offset), "nested_blocksize": formats.NESTED_BLOCKSIZE}
        return QuantState4bit(self.quant_type, self.blocksize, (self.out_features, self.in_features),
                              _numpy(self.weight).reshape(-1), _numpy(self.float_absmax()), nested, "float32")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize().to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


class Linear8bit(_FixedDtypeBuffers):
    """LLM.int8 row-wise linear, bit-compatible with ``bitsandbytes.nn.Linear8bitLt`` (threshold 0).
    x: [..., in] -> [..., out]; ``W = CB * SCB / 127``."""

    _fixed = ("SCB",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.zeros(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32,
                    name: str = "weight") -> Linear8bit:
        """Quantize as ``Int8Params`` does: the weight is rounded to fp16 first, then row-wise to int8."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                    device=linear.weight.device)
        layer.load_int8(*_quantize_int8(linear.weight, name))
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def load_int8(self, cb: np.ndarray, scb: np.ndarray) -> None:
        self.weight = _tensor(cb, np.int8, self.weight.device)
        self.SCB = _tensor(scb, np.float32, self.weight.device)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in], equal to ``bitsandbytes.functional.int8_vectorwise_dequant``."""
        return _dequantize_int8_torch(self.weight, self.SCB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantize().to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


def _quantize_4bit(weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool,
                   name: str) -> QuantState4bit:
    """formats.quantize_4bit, with the double-quant offset taken from torch's own mean (as bitsandbytes)."""
    state = formats.quantize_4bit(_weight_numpy(weight), quant_type, blocksize, False, name=name)
    if double_quant:
        offset = float(torch.from_numpy(state.absmax).mean())
        state.nested = formats.quantize_nested_absmax(state.absmax, offset)
        state.absmax = formats.dequantize_nested_absmax(state.nested)
    return state


def _quantize_int8(weight: torch.Tensor, name: str) -> tuple[np.ndarray, np.ndarray]:
    return formats.quantize_int8(_weight_numpy(weight.detach().to(torch.float16)), name=name)


# ---------------------------------------------------------------- whole models


def _skipped(name: str, skip_modules: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) or s in parts for s in skip_modules)


def quantize_model(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                   compute_dtype: torch.dtype = torch.float32,
                   skip_modules: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` (except ``skip_modules``: names, dotted suffixes or path parts)
    in place by :class:`Linear4bit` (``"nf4"``/``"fp4"``) or :class:`Linear8bit` (``"int8"``)."""
    if quant_type not in (*formats.QUANT_TYPES_4BIT, "int8"):
        raise QuantizationError(f"quantize_model: unknown quant_type {quant_type!r}; use 'nf4', 'fp4' or 'int8'")
    skip = tuple(skip_modules)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not _skipped(name, skip)]
    for name, linear in targets:
        if quant_type == "int8":
            new: nn.Module = Linear8bit.from_linear(linear, compute_dtype, name=name)
        else:
            new = Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype, name=name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _is_kbit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or any(is_quantized_linear(m) for m in model.modules()))


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """PEFT's recipe before QLoRA: freeze every parameter, upcast fp16/bf16 parameters (norms,
    embeddings, biases; never packed 4-bit weights) to fp32, and with gradient checkpointing make
    the input embeddings' output require grad (so reentrant checkpoints see a grad path)."""
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad = False
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if not (use_gradient_checkpointing and _is_kbit(model)):
        return model
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise OnnxPeftError(
            f"prepare_model_for_kbit_training: {type(model).__name__} has no gradient_checkpointing_enable "
            "(only transformers models do); pass use_gradient_checkpointing=False")
    if kwargs.get("use_reentrant", True):
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# ---------------------------------------------------------------- seam helpers (LoRA tuner, export)


def _bnb_kind(module: nn.Module) -> str | None:
    """'4bit' / '8bit' for bitsandbytes' Linear4bit (and LinearNF4/FP4) / Linear8bitLt, without importing it."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes"):
            if cls.__name__ == "Linear4bit":
                return "4bit"
            if cls.__name__ == "Linear8bitLt":
                return "8bit"
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """Our Linear4bit/Linear8bit or bitsandbytes' Linear4bit/Linear8bitLt."""
    return isinstance(module, (Linear4bit, Linear8bit)) or _bnb_kind(module) is not None


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer, quantized or not (a packed weight's
    shape [out*in/2, 1] says nothing about them)."""
    if isinstance(module, (Linear4bit, Linear8bit, nn.Linear)):  # bitsandbytes' layers are nn.Linear
        return module.in_features, module.out_features
    raise QuantizationError(f"{type(module).__name__} is not a linear layer this library knows; "
                            "expected nn.Linear, onnx_peft Linear4bit/Linear8bit or bitsandbytes Linear4bit/Linear8bitLt")


def _bnb_unpack_for_cpu(module: nn.Module) -> None:
    """bitsandbytes (CPUs with AVX512-BF16) repacks a Linear4bit's codes and rounds its absmax to bf16
    on the first eval forward; undo the repacking in place as its own ``_save_to_state_dict`` does."""
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, state)


def _bnb_int8(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    scb = getattr(module.weight, "SCB", None)
    scb = module.state.SCB if scb is None else scb
    if module.weight.dtype != torch.int8 or scb is None:
        raise QuantizationError(f"{type(module).__name__} holds an unquantized weight (has_fp16_weights=True "
                                "or never moved to a device); quantize it with .to(device) first")
    return module.weight.data, scb


def quant_state(module: nn.Module) -> QuantState4bit:
    """The exact 4-bit codes and absmax of ``module`` (ours or bitsandbytes'), for ONNX export."""
    if isinstance(module, Linear4bit):
        return module.quant_state()
    if _bnb_kind(module) == "4bit":
        if getattr(module.weight, "quant_state", None) is None:
            raise QuantizationError(f"{type(module).__name__} has no quant state (its weight was never "
                                    "quantized); load the checkpoint with its quant state or call .to(device)")
        _bnb_unpack_for_cpu(module)
        return formats.from_bnb_state(module.weight.data, module.weight.quant_state)
    raise QuantizationError(f"{type(module).__name__} is not a 4-bit linear layer; quant_state() reads "
                            "onnx_peft Linear4bit or bitsandbytes Linear4bit")


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """float32 [out, in] on the module's device: exactly the weight its forward multiplies by."""
    if isinstance(module, (Linear4bit, Linear8bit)):
        return module.dequantize()
    kind = _bnb_kind(module)
    if kind == "4bit":
        device = module.weight.device
        return torch.from_numpy(formats.dequantize_4bit(quant_state(module))).to(device)
    if kind == "8bit":
        if module.weight.dtype != torch.int8:  # has_fp16_weights: a plain float weight
            return module.weight.detach().float()
        scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
        return _dequantize_int8_torch(module.weight.data, scb)  # (its forward moves SCB into .state)
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    raise QuantizationError(f"{type(module).__name__} is not a quantized linear layer")


def requantize_into(module: nn.Module, weight: torch.Tensor, name: str = "weight") -> None:
    """Write ``weight [out, in]`` back in ``module``'s own format (same quant type, block size,
    double quant, storage dtype): how a LoRA merge lands in a quantized base."""
    in_features, out_features = linear_features(module)
    if tuple(weight.shape) != (out_features, in_features):
        raise QuantizationError(f"{name}: cannot write a weight of shape {list(weight.shape)} into a layer "
                                f"of [out, in] = {[out_features, in_features]}")
    weight = weight.detach()
    if isinstance(module, Linear4bit):
        module.load_quant_state(_quantize_4bit(weight, module.quant_type, module.blocksize,
                                               module.double_quant, name))
    elif isinstance(module, Linear8bit):
        module.load_int8(*_quantize_int8(weight, name))
    elif _bnb_kind(module) == "4bit":
        _requantize_bnb_4bit(module, weight, name)
    elif _bnb_kind(module) == "8bit":
        _requantize_bnb_8bit(module, weight, name)
    else:
        raise QuantizationError(f"{name}: {type(module).__name__} is not a quantized linear layer")


def _requantize_bnb_4bit(module: nn.Module, weight: torch.Tensor, name: str) -> None:
    bnb = importlib.import_module("bitsandbytes")
    _bnb_unpack_for_cpu(module)
    old = module.weight
    state = _quantize_4bit(weight, old.quant_type, old.blocksize, old.quant_state.nested, name)
    state.dtype = str(old.quant_state.dtype).replace("torch.", "")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in formats.to_bnb_state_dict(state).items()}
    packed = tensors.pop("weight").view(old.dtype).to(old.device)
    module.weight = bnb.nn.Params4bit.from_prequantized(packed, tensors, requires_grad=False,
                                                        device=old.device, module=module)


def _requantize_bnb_8bit(module: nn.Module, weight: torch.Tensor, name: str) -> None:
    bnb = importlib.import_module("bitsandbytes")
    device = module.weight.device
    cb, scb = (torch.from_numpy(t).to(device) for t in _quantize_int8(weight, name))
    module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    module.state.CB, module.state.SCB = None, None  # forward moves the new CB/SCB into its state
