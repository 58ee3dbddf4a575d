"""HRA (Householder reflection adaptation): the config and the math, torch-free.

HRA multiplies a frozen weight ``W [out, in]`` on its INPUT side by a product of ``r``
Householder reflections, one per column of ``u [in, r]`` (PEFT's ``hra_u``)::

    W' = W R,   R = H_0 H_1 ... H_{r-1},   H_i = I - 2 v_i v_i^T,   v_i = u_i / |u_i|
    y  = x W'^T + b = x R^T W^T + b

``apply_GS`` first orthonormalises the columns (Gram-Schmidt, ``Q [in, r]``); the reflections
then commute and ``R = I - 2 Q Q^T``.

R - I has rank <= r, so the unmerged adapter is a low-rank update and becomes ``lora`` slots
(the compact WY form of a product of reflections, ``R = I - V T V^T`` with ``T [r, r]`` upper
triangular)::

    x W'^T = x W^T + (x V) (-(W V T)^T)       A_slot = V [in, r],  B_slot = -(W V T)^T [r, out]

B_slot folds in the base weight, so the slots are computed per base model (``base_weight()``);
being ``lora`` slots they have a per-row (MultiAdapter) form and swap with LoRA adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, as_float32, register_method

U_NAME = "hra_u"


@register_config
@dataclass
class HRAConfig(AdapterConfig):
    """PEFT's HRAConfig: same field names, same defaults."""

    peft_type = "HRA"

    r: int = 8
    apply_GS: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterConfigError(f"HRAConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.apply_GS, bool):
            raise AdapterConfigError(f"HRAConfig.apply_GS must be True or False, got {self.apply_GS!r}")
        if not isinstance(self.init_weights, bool):
            raise AdapterConfigError(f"HRAConfig.init_weights must be True or False, got {self.init_weights!r}")
        # PEFT accepts any '<method>_only' (hra_only): the tuned layers' biases train too
        if not isinstance(self.bias, str) or not (self.bias in ("none", "all") or self.bias.endswith("_only")):
            raise AdapterConfigError(f"HRAConfig.bias must be 'none', 'all' or 'hra_only', got {self.bias!r}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise AdapterConfigError(
                "HRAConfig.layers_to_transform / layers_pattern cannot be used when target_modules is a regex")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("HRAConfig.layers_pattern needs layers_to_transform")


# -- the math (numpy arrays and torch tensors alike) --------------------------------------------
def _unit(column: Any) -> Any:
    return column / ((column * column).sum() ** 0.5)


def reflection_vectors(u: Any, apply_GS: bool) -> list[Any]:
    """The unit vectors ``v_i [in, 1]`` of the reflections, in product order.

    Without ``apply_GS``: ``u_i / |u_i|``. With it: Gram-Schmidt on the columns of ``u``
    (as PEFT: each column minus its projections on the previous unit vectors, normalised).
    """
    columns = [u[:, i:i + 1] for i in range(u.shape[1])]
    if not apply_GS:
        return [_unit(c) for c in columns]
    units: list[Any] = []
    for column in columns:
        for q in units:
            column = column - (q.T @ column) * q
        units.append(_unit(column))
    return units


def hra_reflect(weight: Any, u: Any, apply_GS: bool, inverse: bool = False) -> Any:
    """``W R`` (or ``W R^-1`` with ``inverse``) for ``W [out, n]``, ``u [n, r]``.

    Applied one reflection at a time, ``W <- W - 2 (W v) v^T``, so no ``[n, n]`` matrix is
    built. ``R^-1 = R^T`` reverses the order; with apply_GS the reflections commute.
    """
    units = reflection_vectors(u, apply_GS)
    for v in reversed(units) if inverse else units:
        weight = weight - 2 * (weight @ v) @ v.T
    return weight


def wy_factor(v: np.ndarray) -> np.ndarray:
    """``T [r, r]`` with ``H_0 ... H_{r-1} = I - V T V^T`` for unit columns ``V [n, r]``.

    Appending a reflection ``I - 2 v v^T`` to ``I - V T V^T`` gives ``T' = [[T, -2 T V^T v], [0, 2]]``.
    Dependent columns (PEFT's default init repeats each column twice, R = I) are fine.
    """
    r = v.shape[1]
    gram = v.T @ v
    t = np.zeros((r, r), dtype=v.dtype)
    for k in range(r):
        t[:k, k] = -2 * t[:k, :k] @ gram[:k, k]
        t[k, k] = 2
    return t


def hra_lora_slots(weight: np.ndarray, u: np.ndarray, apply_GS: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(A_slot [in, r], B_slot [r, out])`` with ``x (W R)^T = x W^T + (x A_slot) B_slot``.

    Computed in float64: ``R - I = -V T V^T`` so ``x (R - I)^T W^T = (x V)(-(W V T)^T)``.
    """
    w = np.asarray(weight, np.float64)
    v = np.concatenate(reflection_vectors(np.asarray(u, np.float64), apply_GS), axis=1)
    t = 2 * np.eye(v.shape[1]) if apply_GS else wy_factor(v)     # GS: R = I - 2 Q Q^T
    return as_float32(v), as_float32(-(w @ v @ t).T)


# -- the method seam ---------------------------------------------------------------------------
@register_method
class HraMethod(Method):
    """HRA on Linear (and Conv2d in torch): ``lora`` slots with the base weight folded in."""

    peft_type = "HRA"
    config_class = HRAConfig
    tuner_module = "onnx_peft.tuners.hra"
    tensor_names = (U_NAME,)
    layer_attrs = (U_NAME,)

    def features(self, config, module, parts):
        """None: ``hra_u [in, r]`` tells ``in`` but not ``out`` (the graph's weight has both)."""
        return None

    def merged_weight(self, config, module, weight, bias, parts, shared):
        """``W' = W R`` (conv kernels are flattened to ``[out, in*k*k]`` as PEFT does); bias unchanged."""
        u = parts[U_NAME]
        if isinstance(weight, np.ndarray):
            weight, u = as_float32(weight), as_float32(u)
        shape = tuple(weight.shape)
        flat = weight.reshape(shape[0], -1)
        if flat.shape[1] != u.shape[0]:
            raise IncompatibleAdapterError(
                f"module {module}: hra_u has {u.shape[0]} rows but the weight has {flat.shape[1]} inputs")
        return hra_reflect(flat, u, config.apply_GS).reshape(*shape), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        u = as_float32(parts[U_NAME])
        if u.ndim != 2 or u.shape[1] != config.r:
            raise IncompatibleAdapterError(
                f"module {module} has hra_u of shape {list(u.shape)} but the config says r={config.r}; "
                "the adapter_config.json does not belong to these weights")
        weight = base_weight()
        if weight.ndim != 2 or weight.shape[1] != u.shape[0]:
            raise IncompatibleAdapterError(
                f"module {module}: hra_u has {u.shape[0]} rows but the layer's weight is {list(weight.shape)}; "
                "only linear layers take HRA slots (merge conv adapters with export mode='merged')")
        a, b = hra_lora_slots(weight, u, config.apply_GS)
        return {"lora": {"lora_A.weight": np.ascontiguousarray(a), "lora_B.weight": np.ascontiguousarray(b)}}
