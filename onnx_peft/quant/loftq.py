"""LoftQ: initialise LoRA so that ``Q + s * B @ A`` approximates the float weight ``W``.

Why: a 4-bit base ``Q`` loses information; LoftQ (https://huggingface.co/papers/2310.08659) puts
the best rank-r correction of ``W - Q`` into the LoRA factors, so fine-tuning starts from a model
closer to the float one. PEFT's version needs a CUDA device; this one runs wherever torch does,
with the quantizer of :mod:`onnx_peft.quant.formats` (bit-identical to bitsandbytes)::

    res = W
    repeat loftq_iter times:
        Q    = dequant(quant(res))          # NF4 [out, in] (or LLM.int8 for 8 bits)
        L, R = rank-r SVD of (W - Q)        # L = U sqrt(S) [out, r], R = sqrt(S) Vh [r, in]
        res  = W - L @ R
    lora_A = R / sqrt(s)   lora_B = L / sqrt(s)   base = Q

PEFT leaves out the ``1/sqrt(s)`` (its issue #1982), which is only right for ``lora_alpha == r``;
with ``s == 1`` the two give the same numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..errors import OnnxPeftError
from . import formats
from .formats import QuantizationError, QuantState4bit
from .layers import (
    Linear4bit,
    _bnb_kind,
    _quantize_4bit,
    _quantize_int8,
    dequantized_weight,
    is_quantized_linear,
    linear_features,
)


@dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig``: ``loftq_bits`` (4 = NF4, 8 = LLM.int8) and ``loftq_iter``
    (alternating quantize/SVD rounds). ``LoraConfig.loftq_config`` holds it as a dict."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class LoftQResult(NamedTuple):
    """``state``: the quantized base (QuantState4bit, or ``(CB int8 [out, in], SCB float32 [out])``
    for 8 bits); ``lora_A [r, in]``, ``lora_B [out, r]`` float32 with ``W ~ Q + B @ A``."""

    state: QuantState4bit | tuple[np.ndarray, np.ndarray]
    lora_A: torch.Tensor
    lora_B: torch.Tensor


def low_rank_decomposition(weight: torch.Tensor, reduced_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of ``weight [out, in]``: ``L [out, r] @ R [r, in]`` (PEFT's split of sqrt(S))."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(S[:reduced_rank])
    return U[:, :reduced_rank] * root, root[:, None] * Vh[:reduced_rank]


def dequantize_state(state: QuantState4bit | tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    """float32 [out, in] of a state returned by :func:`loftq_init`."""
    if isinstance(state, QuantState4bit):
        return torch.from_numpy(formats.dequantize_4bit(state))
    return torch.from_numpy(formats.dequantize_int8(*state))


def _quantize(weight: torch.Tensor, num_bits: int, quant_type: str, blocksize: int, name: str):
    if num_bits == 4:
        return _quantize_4bit(weight, quant_type, blocksize, False, name)
    return _quantize_int8(weight, name)


@torch.no_grad()
def loftq_init(weight: torch.Tensor, num_bits: int = 4, reduced_rank: int = 16, num_iter: int = 1,
               quant_type: str = "nf4", blocksize: int = 64, name: str = "weight") -> LoftQResult:
    """Alternate quantization and rank-``reduced_rank`` SVD of the residual ``num_iter`` times, as
    PEFT's ``loftq_init`` (on CPU or any device). ``weight``: ``[out, in]``."""
    if num_bits not in (4, 8):
        raise QuantizationError(f"{name}: LoftQ supports loftq_bits 4 (NF4/FP4) or 8 (LLM.int8), got {num_bits}")
    if num_iter <= 0:
        raise QuantizationError(f"{name}: loftq_iter must be at least 1, got {num_iter}")
    if weight.dim() != 2 or not 0 < reduced_rank <= min(weight.shape):
        raise QuantizationError(f"{name}: LoftQ needs a 2-D weight and 0 < r <= min(out, in); got shape "
                                f"{list(weight.shape)} and r={reduced_rank}")
    device = weight.device
    weight = weight.detach().to(torch.float32)
    res = weight
    for i in range(num_iter):
        state = _quantize(res, num_bits, quant_type, blocksize, name)
        residual = weight - dequantize_state(state).to(device)
        lora_B, lora_A = low_rank_decomposition(residual, reduced_rank)
        if i + 1 == num_iter:
            break
        res = weight - lora_B @ lora_A
    return LoftQResult(state, lora_A, lora_B)


def _config_fields(loftq_config: Any) -> tuple[int, int]:
    if loftq_config is None:
        return LoftQConfig().loftq_bits, LoftQConfig().loftq_iter
    fields = loftq_config if isinstance(loftq_config, dict) else asdict(loftq_config)
    return int(fields.get("loftq_bits", 4)), int(fields.get("loftq_iter", 1))


def _split_scaling(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    if scaling <= 0:
        raise QuantizationError(f"LoftQ needs a positive LoRA scaling (lora_alpha / r), got {scaling}")
    root = math.sqrt(scaling)
    return lora_A / root, lora_B / root


@torch.no_grad()
def apply_loftq(base_layer: nn.Module, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float,
                loftq_config: LoftQConfig | dict | None = None, fan_in_fan_out: bool = False,
                name: str = "weight") -> torch.Tensor:
    """``LoraConfig(init_lora_weights="loftq")`` for one float linear layer: fill ``lora_A`` /
    ``lora_B`` in place and return the new base weight (the dequantized ``Q``, in the base
    weight's layout and dtype) for the caller to store. ``s * B @ A`` then equals ``W - Q``'s
    best rank-r part."""
    if is_quantized_linear(base_layer):
        raise OnnxPeftError(
            f"{name}: init_lora_weights='loftq' quantizes a float base itself; this layer is already "
            f"quantized ({type(base_layer).__name__}). Load the model in float, or keep it quantized and "
            "call onnx_peft.quant.loftq.replace_lora_weights_loftq(peft_model)")
    base = base_layer.weight
    weight = base.T if fan_in_fan_out else base
    num_bits, num_iter = _config_fields(loftq_config)
    r = lora_A.weight.shape[0]
    result = loftq_init(weight, num_bits, r, num_iter, name=name)
    A, B = _split_scaling(result.lora_A, result.lora_B, scaling)
    lora_A.weight.data = A.to(lora_A.weight.device, lora_A.weight.dtype)
    lora_B.weight.data = B.to(lora_B.weight.device, lora_B.weight.dtype)
    q = dequantize_state(result.state).to(base.device, base.dtype)
    return q.T if fan_in_fan_out else q


# ---------------------------------------------------------------- models already in 4 bits


class _SafetensorsWeights:
    """Float weights read one tensor at a time from a (sharded) ``model.safetensors``."""

    def __init__(self, model_path: str | os.PathLike, base_model_prefix: str | None) -> None:
        path = os.fspath(model_path)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        single = path if path.endswith(".safetensors") else os.path.join(folder, "model.safetensors")
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(single):
            self.files: dict[str, str] | None = None
            self.single: str | None = single
        elif os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files, self.single = {k: os.path.join(folder, v) for k, v in weight_map.items()}, None
        else:
            raise OnnxPeftError(f"replace_lora_weights_loftq: no model.safetensors (or sharded index) in "
                                f"{folder!r}; pass model_path= the folder holding the float checkpoint")
        self.prefix = base_model_prefix

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        candidates = [key]
        if self.prefix and key.startswith(self.prefix + "."):
            candidates.append(key[len(self.prefix) + 1:])
        for candidate in candidates:
            path = self.single if self.files is None else self.files.get(candidate)
            if path is None:
                continue
            with safe_open(path, framework="pt", device="cpu") as f:
                if candidate in f.keys():
                    return f.get_tensor(candidate)
        raise OnnxPeftError(f"replace_lora_weights_loftq: {key!r} is not in the float checkpoint; "
                            "model_path must be the checkpoint this model was quantized from")


def _model_path(peft_model: nn.Module, model_path: str | os.PathLike | None) -> str | os.PathLike:
    if model_path is not None:
        return model_path
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    guess = getattr(getattr(base, "config", None), "_name_or_path", None)
    if guess and os.path.isdir(guess):
        return guess
    raise OnnxPeftError("replace_lora_weights_loftq: cannot tell where the float weights are; pass "
                        "model_path= the folder (or model.safetensors) the model was loaded from")


@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path: str | os.PathLike | None = None,
                               adapter_name: str = "default",
                               callback: Callable[[nn.Module, str], bool] | None = None) -> None:
    """PEFT's ``replace_lora_weights_loftq``: for each LoRA layer on a 4-bit base (ours or
    bitsandbytes'), set ``A, B`` from the SVD of ``W - dequant(Q)``, W read lazily from the float
    safetensors at ``model_path``. ``callback(model, module_name) -> keep?`` may roll a layer back."""
    prefix = "base_model.model."
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    weights = _SafetensorsWeights(_model_path(peft_model, model_path), getattr(base, "base_model_prefix", None))
    found = False
    for name, module in peft_model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        base_layer = getattr(module, "base_layer", None)
        if not isinstance(lora_A, nn.ModuleDict) or adapter_name not in lora_A or base_layer is None \
                or not _is_4bit(base_layer):
            continue
        if not name.startswith(prefix):
            raise OnnxPeftError(f"{name}: expected a PeftModel (module names under {prefix!r})")
        found = True
        key = name[len(prefix):]
        in_features, out_features = linear_features(base_layer)
        weight = weights.get(key + ".weight").to(torch.float32)
        if tuple(weight.shape) != (out_features, in_features):
            raise OnnxPeftError(f"{key}.weight has shape {list(weight.shape)} in the checkpoint, but the layer "
                                f"is [out, in] = {[out_features, in_features]}")
        residual = weight.to(base_layer.weight.device) - dequantized_weight(base_layer)
        lora_B, lora_A_new = low_rank_decomposition(residual, module.r[adapter_name])
        A, B = _split_scaling(lora_A_new, lora_B, module.scaling[adapter_name])
        a_param, b_param = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        before = a_param.data, b_param.data
        a_param.data, b_param.data = A.to(a_param.dtype), B.to(b_param.dtype)
        if callback is not None and not callback(peft_model, key):
            a_param.data, b_param.data = before
    if not found:
        raise OnnxPeftError(f"replace_lora_weights_loftq: no LoRA layer (adapter {adapter_name!r}) on a 4-bit "
                            "base; load the model in 4 bits (BitsAndBytesConfig or onnx_peft quantize_model) "
                            "and add LoRA first")


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, Linear4bit) or _bnb_kind(module) == "4bit"
