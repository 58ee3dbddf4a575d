"""SHiRA (sparse high-rank adapter): the config and the math, torch-free.

SHiRA trains ``n = r (in + out)`` entries of the weight itself (as many numbers as a rank-r
LoRA), at positions fixed by a mask; the update is sparse but of high rank::

    delta[rows[k], cols[k]] += shira_weight[k]        indices = [rows; cols]: [2, n] int32
    y = x (W + delta)^T + b                           W, delta: [out, in]

PEFT stores the positions with the adapter (``<module>.shira_indices``, int32 ``[2, n]``), so
a checkpoint is self-describing whatever mask made it. Unmerged in ONNX the delta is a
``dense`` branch ``D = delta^T [in, out]`` (a sparse one would need a gather per token).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, as_float32, register_method

WEIGHT, INDICES = "shira_weight", "shira_indices"


@register_config
@dataclass
class ShiraConfig(AdapterConfig):
    """PEFT's ShiraConfig: same field names, same defaults.

    ``mask_type="random"`` draws the ``r (in + out)`` positions of each layer with
    ``torch.randperm`` seeded by ``random_seed`` (PEFT's ``random_mask``); any other mask type
    loads from a checkpoint (which stores the positions) but cannot start a new adapter here.
    """

    peft_type = "SHIRA"

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise AdapterConfigError(f"ShiraConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.mask_type, str) or not self.mask_type:
            raise AdapterConfigError(f"ShiraConfig.mask_type must be a mask name such as 'random', got {self.mask_type!r}")
        seed = self.random_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise AdapterConfigError(f"ShiraConfig.random_seed must be None or a non-negative integer, got {seed!r}")


def sparse_delta(values: Any, indices: Any, out_features: int, in_features: int) -> Any:
    """``delta [out, in]``: zeros with ``values [n]`` added at ``indices [2, n]`` (a repeated
    position sums, as PEFT's sparse COO tensor does). numpy gives float32; torch keeps the
    values' dtype and device and stays differentiable in ``values``."""
    if isinstance(values, np.ndarray):
        delta = np.zeros((out_features, in_features), np.float32)
        np.add.at(delta, (indices[0], indices[1]), as_float32(values))
        return delta
    import torch

    delta = torch.zeros(out_features, in_features, dtype=values.dtype, device=values.device)
    rows, cols = indices.to(values.device).long()
    return delta.index_put((rows, cols), values, accumulate=True)


@register_method
class ShiraMethod(Method):
    """SHiRA on nn.Linear: the sparse delta as a ``dense`` slot ``D = delta^T [in, out]``."""

    peft_type = "SHIRA"
    config_class = ShiraConfig
    tuner_module = "onnx_peft.tuners.shira"
    tensor_names = (WEIGHT, INDICES)
    required_tensors = (WEIGHT, INDICES)
    layer_attrs = (WEIGHT, INDICES)

    def checked(self, config: ShiraConfig, module: str, parts: Mapping[str, Any], out_features: int,
                in_features: int) -> tuple[Any, Any]:
        """``(values [n], indices [2, n])`` of ``module``, checked against the config's ``r`` and
        the layer's shape (PEFT writes the indices as float32 on Windows: made integers here)."""
        values, indices = parts[WEIGHT], parts[INDICES]
        n = config.r * (in_features + out_features)
        if tuple(values.shape) != (n,) or tuple(indices.shape) != (2, n):
            raise IncompatibleAdapterError(
                f"module {module}: shira_weight {list(values.shape)} and shira_indices {list(indices.shape)} do not "
                f"fit r={config.r} on a {out_features}x{in_features} layer (expected [{n}] and [2, {n}]); the "
                "adapter_config.json does not belong to these weights, or the base model differs")
        if isinstance(indices, np.ndarray):
            indices = indices.astype(np.int64)
            if n and (indices.min() < 0 or indices[0].max() >= out_features or indices[1].max() >= in_features):
                raise IncompatibleAdapterError(
                    f"module {module}: shira_indices point outside its {out_features}x{in_features} weight; "
                    "the adapter was trained on another base model")
        return values, indices

    def delta_weight(self, config: ShiraConfig, module: str, out_features: int, in_features: int,
                     parts: Mapping[str, Any]) -> Any:
        """``delta [out, in]`` of ``module`` (numpy or torch, like its tensors)."""
        values, indices = self.checked(config, module, parts, out_features, in_features)
        return sparse_delta(values, indices, out_features, in_features)

    def merged_weight(self, config, module, weight, bias, parts, shared):
        out_features, in_features = weight.shape
        delta = self.delta_weight(config, module, out_features, in_features, parts)
        return weight + (delta if isinstance(weight, np.ndarray) else delta.to(weight.dtype)), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        out_features, in_features = base_weight().shape
        delta = self.delta_weight(config, module, out_features, in_features,
                                  {WEIGHT: as_float32(parts[WEIGHT]), INDICES: np.asarray(parts[INDICES])})
        return {"dense": {"delta.weight": np.ascontiguousarray(delta.T)}}
