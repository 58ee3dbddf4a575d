"""RandLoRA: the config and the math, torch-free.

RandLoRA (Albert et al., 2025) reaches full rank with frozen random bases shared by every layer
and trains only per-layer scales. For a layer with ``m = min(in, out)``, ``M = max(in, out)``
and ``n = ceil(m / r)`` bases::

    A [r, 1, m_max], B [M_max, n_max, r]      frozen, shared (sized for the largest layer)
    lambda [r, n], gamma [n, m]               trained, per layer
    U_A = (lambda[:, :, None] * A[:, :n, :m] * gamma[None]).reshape(r n, m)     [R, m]
    U_B = B[:M, :n, :].reshape(M, n r)                                           [M, R]
    in <= out:  delta = s * U_B @ U_A         in > out:  delta = s * U_A^T @ U_B^T
    y = x W^T + x delta^T,   s = randlora_alpha / r,   delta [out, in]

(``U_A`` flattens rank-major, ``U_B`` basis-major: PEFT pairs them so, and so do we.)
PEFT saves the bases per module (``<module>.randlora_A`` / ``randlora_B``) and once more as
``base_model.randlora_A`` / ``base_model.randlora_B``, unless ``save_projection=False``: then
they are drawn again from ``projection_prng_key`` (with torch's generator; next to the
PyTorch model only).

The delta is a product of two factors, so it becomes ``lora`` slots (``first^T [in, R]``,
``(s second)^T [R, out]``, ``R = r n >= m``): a RandLoRA adapter swaps with LoRA adapters in one
session and shares its per-row banks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, CheckpointError, IncompatibleAdapterError
from .base import AdapterTensors, Method, as_float32, register_method


@register_config
@dataclass
class RandLoraConfig(AdapterConfig):
    """PEFT's RandLoraConfig: same field names, same defaults."""

    peft_type = "RANDLORA"

    r: int = 32
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: int = 640
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterConfigError(f"RandLoraConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise AdapterConfigError(
                f"RandLoraConfig.projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        if self.bias not in ("none", "all", "randlora_only"):
            raise AdapterConfigError(
                f"RandLoraConfig.bias must be 'none', 'all' or 'randlora_only', got {self.bias!r}")
        if not 0.0 <= float(self.randlora_dropout) < 1.0:
            raise AdapterConfigError(
                f"RandLoraConfig.randlora_dropout must be in [0, 1), got {self.randlora_dropout!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("RandLoraConfig.layers_pattern needs layers_to_transform")


def num_bases(in_features: int, out_features: int, r: int) -> int:
    """``ceil(min(in, out) / r)``: enough rank-``r`` bases for full rank."""
    return math.ceil(min(in_features, out_features) / r)


def randlora_factors(lambda_: Any, gamma: Any, basis_A: Any, basis_B: Any, in_features: int,
                     out_features: int) -> tuple[Any, Any]:
    """``(first [R, in], second [out, R])`` with ``delta = s * second @ first`` (numpy or torch)."""
    r, n = lambda_.shape
    small, large = min(in_features, out_features), max(in_features, out_features)
    update_A = (lambda_[:, :, None] * basis_A[:, :n, :small] * gamma[None]).reshape(r * n, small)
    update_B = basis_B[:large, :n, :].reshape(large, n * r)
    if small == in_features:
        return update_A, update_B
    return update_B.T, update_A.T


@register_method
class RandLoraMethod(Method):
    """RandLoRA on Linear and Conv1D: ``lora`` slots with the scales and bases folded in."""

    peft_type = "RANDLORA"
    config_class = RandLoraConfig
    tuner_module = "onnx_peft.tuners.randlora"
    tensor_names = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")
    required_tensors = ("randlora_lambda", "randlora_gamma")
    shared_names = ("randlora_A", "randlora_B")
    layer_attrs = ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B")

    def group(self, tensors, source="adapter", saved_modules=()) -> AdapterTensors:
        found = {self._shared_key(key) for key in tensors}
        if not set(self.shared_names) <= found:
            raise CheckpointError(
                f"{source}: this RandLoRA adapter was saved without its bases randlora_A / randlora_B "
                "(save_projection=False); they can be redrawn from projection_prng_key only next to the "
                "PyTorch model (onnx_peft.PeftModel.from_pretrained does). Re-save it from there with "
                "save_projection=True")
        return super().group(tensors, source, saved_modules)

    def _factors(self, config: RandLoraConfig, module: str, parts: Mapping[str, Any],
                 shared: Mapping[str, Any], in_features: int, out_features: int) -> tuple[Any, Any]:
        lambda_, gamma = parts["randlora_lambda"], parts["randlora_gamma"]
        # each module carries a copy of the shared bases; either serves
        basis_A = parts["randlora_A"] if "randlora_A" in parts else shared["randlora_A"]
        basis_B = parts["randlora_B"] if "randlora_B" in parts else shared["randlora_B"]
        n = num_bases(in_features, out_features, config.r)
        small, large = min(in_features, out_features), max(in_features, out_features)
        if tuple(lambda_.shape) != (config.r, n) or tuple(gamma.shape) != (n, small):
            raise IncompatibleAdapterError(
                f"module {module} ({in_features} -> {out_features}, r={config.r}) needs randlora_lambda "
                f"[{config.r}, {n}] and randlora_gamma [{n}, {small}], got {list(lambda_.shape)} and "
                f"{list(gamma.shape)}; the tensors, the config and the model do not belong together")
        if basis_A.shape[0] != config.r or basis_A.shape[2] < small or basis_B.shape[0] < large \
                or basis_B.shape[1] < n or basis_B.shape[2] != config.r:
            raise IncompatibleAdapterError(
                f"module {module}: the bases randlora_A {list(basis_A.shape)} / randlora_B "
                f"{list(basis_B.shape)} do not fit a {in_features} -> {out_features} layer with r={config.r}")
        return randlora_factors(lambda_, gamma, basis_A, basis_B, in_features, out_features)

    def merged_weight(self, config, module, weight, bias, parts, shared):
        out_features, in_features = weight.shape
        first, second = self._factors(config, module, parts, shared, in_features, out_features)
        scaling = config.randlora_alpha / config.r
        return weight + (second @ first) * scaling, bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        out_features, in_features = base_weight().shape
        parts = {k: as_float32(v) for k, v in parts.items()}
        shared = {k: as_float32(v) for k, v in shared.items()}
        first, second = self._factors(config, module, parts, shared, in_features, out_features)
        scaling = np.float32(config.randlora_alpha / config.r)
        return {"lora": {"lora_A.weight": np.ascontiguousarray(first.T),
                         "lora_B.weight": np.ascontiguousarray((second * scaling).T)}}
