"""AdaLoRA: the config and the math, torch-free.

AdaLoRA (Zhang et al., 2023) writes the update in SVD form and prunes singular values while
training, so each layer ends with the rank its importance earns::

    y = x W^T + (x (A * E)^T) B^T * s / (ranknum + 1e-5)
    delta_weight = s / (ranknum + 1e-5) * B @ (A * E)         A: [r, in], E: [r, 1], B: [out, r]

``s`` is ``lora_alpha`` (or the layer's rank when ``lora_alpha <= 0``) and ``ranknum`` the rank
the adapter was created with (``init_r``; PEFT never saves it and keeps it when a layer is
shrunk). A pruned triplet has ``E = 0``. After training, ``rank_pattern`` (``{"<module>.lora_E":
[kept, ...]}``) records which triplets survive and PEFT saves only those, so a layer's saved
rank is ``sum(kept)``.

The delta is low-rank: ``lora`` slots ``(A * E)^T [in, r]`` and ``(s' B)^T [r, out]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import AdapterConfig, check_scale, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, as_float32, register_method

RANKNUM_EPS = 1e-5


@register_config
@dataclass
class AdaLoraConfig(AdapterConfig):
    """PEFT's AdaLoraConfig: LoraConfig's fields that AdaLoRA uses, plus the budget schedule.

    Not a subclass of our LoraConfig (PEFT's is): code that asks ``isinstance(c, LoraConfig)``
    must not mistake an SVD-form adapter for a plain LoRA one. ``r`` is ignored (``init_r`` is
    the starting rank), as in PEFT.
    """

    peft_type = "ADALORA"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    use_dora: bool = False
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def validate(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if self.use_dora:
            raise AdapterConfigError("AdaLoraConfig.use_dora: AdaLoRA does not support DoRA")
        check_scale(self.lora_alpha, "AdaLoraConfig.lora_alpha")
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "target_r" else 1):
                raise AdapterConfigError(f"AdaLoraConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.total_step, int) or self.total_step <= 0:
            raise AdapterConfigError(
                f"AdaLoraConfig.total_step must be the number of training steps (> 0), got {self.total_step!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise AdapterConfigError(
                f"AdaLoraConfig.tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave "
                "no budgeting phase; decrease tinit/tfinal or increase total_step")
        for name in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise AdapterConfigError(f"AdaLoraConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if float(self.orth_reg_weight) < 0:
            raise AdapterConfigError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise AdapterConfigError(f"AdaLoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"AdaLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("AdaLoraConfig.layers_pattern needs layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise AdapterConfigError(
                "AdaLoraConfig.layers_to_transform cannot be used when target_modules is a regex string")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise AdapterConfigError("AdaLoraConfig.rank_pattern must map '<module>.lora_E' to a list of "
                                     f"booleans, got {self.rank_pattern!r}")

    def kept_triplets(self, module_path: str) -> list[bool] | None:
        """The ``rank_pattern`` entry of ``module_path`` (keys ``<module>.lora_E`` as PEFT saves
        them, or ``<module>.lora_E.<adapter>`` as it holds them while training), or None."""
        for key, kept in (self.rank_pattern or {}).items():
            if _pattern_module(key) == module_path:
                return [bool(k) for k in (kept.tolist() if hasattr(kept, "tolist") else kept)]
        return None

    def rank_for(self, module_path: str) -> int:
        """The rank a layer is created with: ``sum(kept)`` under a rank pattern, else ``init_r``."""
        kept = self.kept_triplets(module_path)
        return self.init_r if kept is None else sum(kept)

    def scale_for(self, rank: int) -> float:
        """``s / (ranknum + 1e-5)`` for a layer of ``rank`` (PEFT's ``scaling / ranknum``)."""
        scaling = self.lora_alpha if self.lora_alpha > 0 else float(rank)
        return scaling / (self.init_r + RANKNUM_EPS)


def _pattern_module(key: str) -> str:
    """``model.layers.0.q_proj.lora_E(.default)`` -> ``model.layers.0.q_proj``."""
    return re.sub(r"\.lora_E(\.[^.]+)?$", "", key)


def adalora_delta_weight(lora_A: Any, lora_E: Any, lora_B: Any, scale: float, base_shape: tuple[int, ...]) -> Any:
    """``scale * B @ (A * E)`` shaped like the base weight ``[out, in]`` (``[out, in, kh, kw]``
    for Conv2d, whose A is ``[r, in * kh * kw]``). numpy or torch."""
    delta = (lora_B @ (lora_A * lora_E)) * scale
    return delta.reshape(tuple(base_shape)) if len(base_shape) > 2 else delta


@register_method
class AdaLoraMethod(Method):
    """AdaLoRA on Linear / Conv1D (and Conv2d in torch): ``lora`` slots with E and the scale folded."""

    peft_type = "ADALORA"
    config_class = AdaLoraConfig
    tuner_module = "onnx_peft.tuners.adalora"
    tensor_names = ("lora_A", "lora_B", "lora_E")
    layer_attrs = ("lora_A", "lora_B", "lora_E")

    def features(self, config, module, parts):
        return int(parts["lora_A"].shape[1]), int(parts["lora_B"].shape[0])

    def _checked(self, config: AdaLoraConfig, module: str, parts) -> tuple[Any, Any, Any]:
        a, e, b = parts["lora_A"], parts["lora_E"], parts["lora_B"]
        rank = config.rank_for(module)
        if a.shape[0] != rank or tuple(e.shape) != (rank, 1) or b.shape[1] != rank:
            raise IncompatibleAdapterError(
                f"module {module} has lora_A {list(a.shape)}, lora_E {list(e.shape)}, lora_B {list(b.shape)} but "
                f"the config says rank {rank} (init_r / rank_pattern); the adapter_config.json does not belong "
                "to these weights")
        return a, e, b

    def merged_weight(self, config, module, weight, bias, parts, shared):
        a, e, b = self._checked(config, module, parts)
        return weight + adalora_delta_weight(a, e, b, config.scale_for(a.shape[0]), tuple(weight.shape)), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        a, e, b = (as_float32(t) for t in self._checked(config, module, parts))
        scale = np.float32(config.scale_for(a.shape[0]))
        return {"lora": {"lora_A.weight": np.ascontiguousarray((a * e).T),      # [in, r]
                         "lora_B.weight": np.ascontiguousarray((b * scale).T)}}  # [r, out]
