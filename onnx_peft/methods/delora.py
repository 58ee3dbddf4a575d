"""DeLoRA (decoupled low-rank adaptation): the config and the math, torch-free.

DeLoRA is a rank-``r`` update whose strength is set by one learned number ``lambda`` per layer,
decoupled from the directions: each rank-one term ``B[:, i] A[i, :]`` is normalised to unit
norm, and the input is weighted by the base weight's column norms ``w_norm`` (frozen when the
adapter is created, saved in the checkpoint)::

    s_i   = lambda / r / (max(||A[i, :]||, 1e-4) * max(||B[:, i]||, 1e-4))          [r]
    delta = B diag(s) A diag(w_norm)                                                [out, in]
    y     = x W^T + b + ((x * w_norm) A^T * s) B^T

PEFT stores ``delora_A [r, in]``, ``delora_B [out, r]``, ``delora_lambda [1]`` and
``delora_w_norm [in]`` per module. Unmerged in ONNX it is the ``lora`` form with the
normalisation folded in numpy: ``A_slot = (A diag(w_norm))^T [in, r]``, ``B_slot = (diag(s) B^T) [r, out]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import AdapterConfig, check_positive_ints, check_scale, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from ..targets import checked_pattern, pattern_value
from .base import Method, as_float32, register_method

_BIAS_CHOICES = ("none", "all", "delora_only")
_NORM_FLOOR = 1e-4  # PEFT clamps the rank-one norms from below by this


@register_config
@dataclass
class DeloraConfig(AdapterConfig):
    """PEFT's DeloraConfig: same field names, same defaults (``delora_lambda`` is the initial
    bound on the update's Frobenius norm; ``lambda_pattern`` sets it per module like ``rank_pattern``)."""

    peft_type = "DELORA"

    r: int = 8
    delora_lambda: float = 15
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lambda_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterConfigError(f"DeloraConfig.r must be a positive integer, got {self.r!r}")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.lambda_pattern = dict(self.lambda_pattern or {})
        check_positive_ints(self.rank_pattern, "DeloraConfig.rank_pattern")
        check_scale(self.delora_lambda, "DeloraConfig.delora_lambda")
        for key, value in self.lambda_pattern.items():
            checked_pattern(key, "DeloraConfig.lambda_pattern")
            check_scale(value, f"DeloraConfig.lambda_pattern[{key!r}]")
        dropout = self.module_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise AdapterConfigError(f"DeloraConfig.module_dropout must be in [0, 1), got {dropout!r}")
        if self.bias not in _BIAS_CHOICES:
            raise AdapterConfigError(f"DeloraConfig.bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise AdapterConfigError(f"DeloraConfig.init_weights must be True or False, got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("DeloraConfig.layers_pattern needs layers_to_transform")

    def rank_for(self, module_path: str) -> int:
        return int(pattern_value(self.rank_pattern, module_path, self.r))

    def lambda_for(self, module_path: str) -> float:
        return float(pattern_value(self.lambda_pattern, module_path, self.delora_lambda))


def _norms(matrix: Any, axis: int) -> Any:
    """Euclidean norms along ``axis``, clamped below by PEFT's floor (numpy or torch)."""
    if isinstance(matrix, np.ndarray):
        return np.maximum(np.sqrt((matrix * matrix).sum(axis=axis)), _NORM_FLOOR)
    return matrix.norm(dim=axis).clamp(min=_NORM_FLOOR)


def delora_scales(a: Any, b: Any, lam: Any, r: int) -> Any:
    """``s [r] = lambda / r / (||A_i|| ||B^i||)``: each rank-one term at norm ``lambda / r``."""
    return lam.reshape(-1) / r / (_norms(a, 1) * _norms(b, 0))


def delora_delta(a: Any, b: Any, lam: Any, w_norm: Any, r: int) -> Any:
    """``B diag(s) A diag(w_norm)`` ``[out, in]`` from ``A [r, in]``, ``B [out, r]`` (numpy or torch)."""
    return (b * delora_scales(a, b, lam, r)) @ (a * w_norm.reshape(1, -1))


@register_method
class DeloraMethod(Method):
    """DeLoRA on nn.Linear: ``lora`` slots with the norms, lambda and ``w_norm`` folded in."""

    peft_type = "DELORA"
    config_class = DeloraConfig
    tuner_module = "onnx_peft.tuners.delora"
    tensor_names = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    required_tensors = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    layer_attrs = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")

    def features(self, config, module, parts):
        a, b = parts["delora_A"], parts["delora_B"]
        return (int(a.shape[1]), int(b.shape[0])) if len(a.shape) == 2 and len(b.shape) == 2 else None

    def checked(self, config: DeloraConfig, module: str, parts: Mapping[str, Any]) -> tuple[Any, Any, Any, Any, int]:
        """``(A, B, lambda, w_norm, r)`` of ``module``, shapes checked against each other and the config."""
        a, b, lam, w_norm = (parts[k] for k in self.tensor_names)
        r = config.rank_for(module)
        ok = (len(a.shape) == 2 and len(b.shape) == 2 and a.shape[0] == r and b.shape[1] == r
              and tuple(w_norm.shape) == (a.shape[1],) and tuple(lam.shape) == (1,))
        if not ok:
            raise IncompatibleAdapterError(
                f"module {module} has delora_A {list(a.shape)}, delora_B {list(b.shape)}, delora_lambda "
                f"{list(lam.shape)}, delora_w_norm {list(w_norm.shape)}; with r={r} DeLoRA needs [r, in], "
                "[out, r], [1], [in]: the adapter_config.json does not belong to these weights")
        return a, b, lam, w_norm, r

    def merged_weight(self, config, module, weight, bias, parts, shared):
        a, b, lam, w_norm, r = self.checked(config, module, parts)
        return weight + delora_delta(a, b, lam, w_norm, r), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        a, b, lam, w_norm, r = self.checked(config, module, {k: as_float32(v) for k, v in parts.items()})
        scales = delora_scales(a, b, lam, r)
        return {"lora": {"lora_A.weight": np.ascontiguousarray((a * w_norm.reshape(1, -1)).T, np.float32),
                         "lora_B.weight": np.ascontiguousarray((b * scales).T, np.float32)}}
