"""VB-LoRA: the config and the math, torch-free.

VB-LoRA (Li et al., 2024) builds every LoRA factor of every layer from one small shared bank of
vectors. Each sub-vector of a factor is a mixture of the top-k bank vectors picked by that
sub-vector's own logits::

    bank [N, L]                                 N vectors of length L, shared by all layers
    logits_A [r, in/L, N], logits_B [out/L, r, N]
    mix(logits) = sum_k softmax(topk(logits))_k * bank[topk index_k]         [..., L]
    A = mix(logits_A).reshape(r, in)                                           [r, in]
    B = mix(logits_B).transpose(0, 2, 1).reshape(out, r)                       [out, r]
    y = x W^T + (x A^T) B^T                     delta_weight = B @ A           [out, in]

PEFT saves the bank once (``base_model.vblora_vector_bank``) and the logits per module, or,
with ``save_only_topk_weights``, only each mixture's top-k indices (``..._topk_indices``,
uint8/int16/int32) and its first k-1 softmax weights (``..._topk_weights``; the last one is 1
minus their sum). Both layouts reduce to the same mixture here.

The delta is low-rank, so it becomes ``lora`` slots (``A^T [in, r]``, ``B^T [r, out]``): a
VB-LoRA adapter swaps with LoRA adapters in one session and shares its per-row banks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, CheckpointError, IncompatibleAdapterError
from .base import AdapterTensors, Method, as_float32, register_method

LOGITS = ("vblora_logits_A", "vblora_logits_B")
TOPK_SUFFIXES = ("_topk_indices", "_topk_weights")


@register_config
@dataclass
class VBLoRAConfig(AdapterConfig):
    """PEFT's VBLoRAConfig: same field names, same defaults."""

    peft_type = "VBLORA"

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def validate(self) -> None:
        for name in ("r", "num_vectors", "vector_length", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise AdapterConfigError(f"VBLoRAConfig.{name} must be a positive integer, got {value!r}")
        if self.topk > self.num_vectors:
            raise AdapterConfigError(
                f"VBLoRAConfig.topk={self.topk} exceeds num_vectors={self.num_vectors}; pick at most that many")
        if self.bias not in ("none", "all", "vblora_only"):
            raise AdapterConfigError(f"VBLoRAConfig.bias must be 'none', 'all' or 'vblora_only', got {self.bias!r}")
        if not 0.0 <= float(self.vblora_dropout) < 1.0:
            raise AdapterConfigError(f"VBLoRAConfig.vblora_dropout must be in [0, 1), got {self.vblora_dropout!r}")
        if float(self.init_vector_bank_bound) < 0:
            raise AdapterConfigError(
                f"VBLoRAConfig.init_vector_bank_bound must be >= 0 (the bank is drawn from U(-bound, bound)), "
                f"got {self.init_vector_bank_bound!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("VBLoRAConfig.layers_pattern needs layers_to_transform")


def topk_mixture(weights: Any, indices: Any, bank: Any) -> Any:
    """``sum_k weights[..., k] * bank[indices[..., k]]``: ``[..., k]`` x ``[N, L]`` -> ``[..., L]``
    (numpy or torch)."""
    return (weights[..., None] * bank[indices]).sum(-2)


def _numpy_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits (descending) with their softmax weights, like ``torch.topk``."""
    indices = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(logits, indices, -1).astype(np.float64)
    top = np.exp(top - top.max(-1, keepdims=True))
    return (top / top.sum(-1, keepdims=True)).astype(np.float32), indices


def mixed(parts: Mapping[str, Any], name: str, topk: int, bank: Any) -> Any:
    """The bank mixture of factor ``name`` (``vblora_logits_A`` / ``_B``), ``[..., L]``: from the
    logits, or from PEFT's saved top-k indices and first k-1 weights (numpy or torch)."""
    if name in parts:
        logits = parts[name]
        if isinstance(logits, np.ndarray):
            weights, indices = _numpy_topk(logits, topk)
        else:
            top, indices = logits.topk(topk, dim=-1)
            weights = top.softmax(dim=-1)
        return topk_mixture(weights, indices, bank)
    indices, partial = parts[name + TOPK_SUFFIXES[0]], parts[name + TOPK_SUFFIXES[1]]
    indices = indices.astype(np.int64) if isinstance(indices, np.ndarray) else indices.long()
    last = 1 - partial.sum(-1)                       # the weight PEFT leaves out: they sum to 1
    return topk_mixture(partial, indices[..., :-1], bank) + last[..., None] * bank[indices[..., -1]]


def vblora_factors(parts: Mapping[str, Any], bank: Any, topk: int) -> tuple[Any, Any]:
    """``(A [r, in], B [out, r])`` of one module (numpy or torch)."""
    mixed_a = mixed(parts, LOGITS[0], topk, bank)                    # [r, in/L, L]
    mixed_b = mixed(parts, LOGITS[1], topk, bank)                    # [out/L, r, L]
    r = mixed_a.shape[0]
    a = mixed_a.reshape(r, -1)
    b = mixed_b.transpose(0, 2, 1) if isinstance(mixed_b, np.ndarray) else mixed_b.transpose(1, 2)
    return a, b.reshape(-1, r)


@register_method
class VBLoRAMethod(Method):
    """VB-LoRA on Linear and Conv1D: ``lora`` slots holding the mixed factors."""

    peft_type = "VBLORA"
    config_class = VBLoRAConfig
    tuner_module = "onnx_peft.tuners.vblora"
    tensor_names = (*LOGITS, *(n + s for n in LOGITS for s in TOPK_SUFFIXES))
    shared_names = ("vblora_vector_bank",)
    required_tensors = ()  # logits, or their top-k indices and weights: checked in group()
    layer_attrs = ("vblora_logits_A", "vblora_logits_B", "vblora_vector_bank")

    def group(self, tensors, source="adapter", saved_modules=()) -> AdapterTensors:
        """Each module holds its logits, or (``save_only_topk_weights``) their top-k indices and
        weights; a module with neither complete layout is refused."""
        out = super().group(tensors, source, saved_modules)
        for module, parts in sorted(out.modules.items()):
            for name in LOGITS:
                if name not in parts and not all(name + s in parts for s in TOPK_SUFFIXES):
                    raise CheckpointError(
                        f"{source}: module {module} has neither {name} nor {name}_topk_indices + "
                        f"{name}_topk_weights; the checkpoint is incomplete")
        return out

    def features(self, config, module, parts):
        length = config.vector_length
        a = parts.get(LOGITS[0], parts.get(LOGITS[0] + TOPK_SUFFIXES[0]))
        b = parts.get(LOGITS[1], parts.get(LOGITS[1] + TOPK_SUFFIXES[0]))
        return (a.shape[1] * length, b.shape[0] * length) if a is not None and b is not None else None

    def _factors(self, config: VBLoRAConfig, module: str, parts, shared) -> tuple[Any, Any]:
        bank = shared["vblora_vector_bank"]
        if tuple(bank.shape) != (config.num_vectors, config.vector_length):
            raise IncompatibleAdapterError(
                f"module {module}: the vector bank is {list(bank.shape)} but the config says num_vectors="
                f"{config.num_vectors}, vector_length={config.vector_length}; the tensors and the "
                "adapter_config.json do not belong together")
        return vblora_factors(parts, bank, config.topk)

    def merged_weight(self, config, module, weight, bias, parts, shared):
        a, b = self._factors(config, module, parts, shared)
        if tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(weight.shape):
            raise IncompatibleAdapterError(
                f"module {module}: the VB-LoRA factors make a {[b.shape[0], a.shape[1]]} update but the "
                f"weight is {list(weight.shape)}")
        return weight + b @ a, bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        a, b = self._factors(config, module, {k: as_float32(v) if "indices" not in k else v
                                               for k, v in parts.items()},
                             {k: as_float32(v) for k, v in shared.items()})
        return {"lora": {"lora_A.weight": np.ascontiguousarray(a.T, dtype=np.float32),
                         "lora_B.weight": np.ascontiguousarray(b.T, dtype=np.float32)}}
