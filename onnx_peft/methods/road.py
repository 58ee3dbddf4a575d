"""RoAd (2-D rotation adaptation): the config and the math, torch-free.

RoAd rotates (and scales) the *output* of a Linear, bias included, in 2-D pairs. The output
``y [.., out]`` is cut into groups of ``g = group_size``; in each group element ``i`` pairs with
element ``i + g/2``. Viewing ``y`` as ``[.., n, 2, g/2]`` (``n g = out``), with ``swap`` exchanging
the two halves of each group::

    y' = y * C + swap(y) * S           C, S: [n, 2, g/2]  (stored flat as [out])
    pair (a, b) -> (C0 a + S0 b,  S1 a + C1 b)    with  C = alpha cos(theta),  S = (-1, +1) alpha sin(theta)

What PEFT stores per module (``road_theta``, ``road_alpha``, same size) and how it becomes C, S::

    road_1  [out / 2]   one angle and scale per pair, shared by both halves of a group
    road_2  [out]       one per element
    road_4  [2 out]     per group [2, g]: cos from theta[:, 0] with alpha[:, 0], sin from theta[:, 1] with alpha[:, 1]

Merged, the rotation moves into the weight and the bias (``R (W x + b) = (R W) x + R b``)::

    W' = rotate(W^T)^T     b' = rotate(b)

Unmerged in ONNX this is the ``rotate_out`` form (two ``[n, g]`` slots, elementwise, per row).
Each 2x2 block ``[[C0, S0], [S1, C1]]`` inverts in closed form (:func:`road_inverse`), which is
how the tuner unmerges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, as_float32, register_method

VARIANTS = ("road_1", "road_2", "road_4")
# parameters per output feature, by variant
_SIZE_PER_OUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@register_config
@dataclass
class RoadConfig(AdapterConfig):
    """PEFT's RoadConfig: same field names, same defaults."""

    peft_type = "ROAD"

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise AdapterConfigError(f"RoadConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        size = self.group_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 2:
            raise AdapterConfigError(f"RoadConfig.group_size must be a positive even integer (elements pair up "
                                     f"within a group), got {size!r}")
        if not isinstance(self.init_weights, bool):
            raise AdapterConfigError(f"RoadConfig.init_weights must be True or False, got {self.init_weights!r}")

    def vector_size(self, out_features: int) -> int:
        """Length of ``road_theta`` / ``road_alpha`` on a layer with ``out_features`` outputs."""
        return int(out_features * _SIZE_PER_OUT[self.variant])


def _cos_sin(theta: Any) -> tuple[Any, Any]:
    if isinstance(theta, np.ndarray):
        return np.cos(theta), np.sin(theta)
    return theta.cos(), theta.sin()  # torch: keeps autograd, dtype and device


def _signs(like: Any) -> Any:
    """``(-1, +1)`` shaped ``[1, 2, 1]`` in the library, dtype and device of ``like``."""
    if isinstance(like, np.ndarray):
        return np.array([-1.0, 1.0], like.dtype).reshape(1, 2, 1)
    return like.new_tensor([-1.0, 1.0]).reshape(1, 2, 1)


def road_coefficients(variant: str, group_size: int, theta: Any, alpha: Any) -> tuple[Any, Any]:
    """``(C, S)``, each ``[n, 2, g/2]``, from PEFT's ``road_theta`` / ``road_alpha`` (numpy or torch,
    gradients kept); ``S`` carries the minus sign of the first half (``y' = y C + swap(y) S``)."""
    half = group_size // 2
    if variant == "road_1":    # [n * half]: the same pair numbers for both halves
        theta, alpha = (t.reshape(-1, 1, half)[:, [0, 0], :] for t in (theta, alpha))
        cos, sin = _cos_sin(theta)
        first, second = alpha * cos, alpha * sin
    elif variant == "road_2":  # [n * g]
        theta, alpha = (t.reshape(-1, 2, half) for t in (theta, alpha))
        cos, sin = _cos_sin(theta)
        first, second = alpha * cos, alpha * sin
    elif variant == "road_4":  # [n * 2g]: per group, g numbers for C then g for S
        theta, alpha = (t.reshape(-1, 2, group_size) for t in (theta, alpha))
        first = alpha[:, 0, :] * _cos_sin(theta[:, 0, :])[0]
        second = alpha[:, 1, :] * _cos_sin(theta[:, 1, :])[1]
        first, second = first.reshape(-1, 2, half), second.reshape(-1, 2, half)
    else:
        raise AdapterConfigError(f"RoadConfig.variant must be one of {VARIANTS}, got {variant!r}")
    return first, second * _signs(second)


def road_inverse(cos: Any, sin: Any) -> tuple[Any, Any]:
    """The ``(C, S)`` that undoes ``(cos, sin)``: each pair's block ``[[C0, S0], [S1, C1]]`` has
    the inverse ``[[C1, -S0], [-S1, C0]] / (C0 C1 - S0 S1)``."""
    swap = [1, 0]
    det = cos * cos[:, swap, :] - sin * sin[:, swap, :]
    return cos[:, swap, :] / det, -sin / det


def road_rotate(y: Any, cos: Any, sin: Any) -> Any:
    """``y [.., out]`` -> ``y C + swap(y) S`` (numpy or torch), ``C, S [n, 2, g/2]``."""
    n, _, half = cos.shape
    groups = y.reshape(*y.shape[:-1], n, 2, half)
    return (groups * cos + groups[..., [1, 0], :] * sin).reshape(y.shape)


def road_merged(weight: Any, bias: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
    """``(W' [out, in], b')``: the output rotation folded into the Linear (``R W``, ``R b``)."""
    merged = road_rotate(weight.T, cos, sin).T
    return merged, None if bias is None else road_rotate(bias, cos, sin)


@register_method
class RoadMethod(Method):
    """RoAd on nn.Linear: ``rotate_out`` slots ``C, S [n, g]`` (elementwise; per-row banks)."""

    peft_type = "ROAD"
    config_class = RoadConfig
    tuner_module = "onnx_peft.tuners.road"
    tensor_names = ("road_theta", "road_alpha")
    required_tensors = ("road_theta", "road_alpha")
    layer_attrs = ("road_theta", "road_alpha")
    changes_bias = True

    def coefficients(self, config: RoadConfig, module: str, parts: Mapping[str, Any],
                     out_features: int) -> tuple[Any, Any]:
        """``(C, S)`` of ``module`` after checking the stored sizes against the config."""
        theta, alpha = parts["road_theta"], parts["road_alpha"]
        size = config.vector_size(out_features)
        for name, vector in (("road_theta", theta), ("road_alpha", alpha)):
            if tuple(vector.shape) != (size,):
                raise IncompatibleAdapterError(
                    f"module {module} has {name} of shape {list(vector.shape)} but a {config.variant} adapter on "
                    f"{out_features} outputs has [{size}]; the adapter_config.json does not belong to these weights")
        if out_features % config.group_size:
            raise IncompatibleAdapterError(
                f"module {module} has {out_features} outputs, not a multiple of RoadConfig.group_size="
                f"{config.group_size}")
        return road_coefficients(config.variant, config.group_size, theta, alpha)

    def merged_weight(self, config, module, weight, bias, parts, shared):
        cos, sin = self.coefficients(config, module, parts, int(weight.shape[0]))
        return road_merged(weight, bias, cos, sin)

    def slot_tensors(self, config, module, parts, shared, base_weight):
        # the vectors say how many outputs (the graph's Reshape checks it): no need to read W
        out_features = int(round(parts["road_theta"].shape[0] / _SIZE_PER_OUT[config.variant]))
        cos, sin = self.coefficients(config, module, {k: as_float32(v) for k, v in parts.items()}, out_features)
        n = cos.shape[0]
        return {"rotate_out": {"rotate_out.cos": np.ascontiguousarray(cos.reshape(n, -1), np.float32),
                               "rotate_out.sin": np.ascontiguousarray(sin.reshape(n, -1), np.float32)}}
