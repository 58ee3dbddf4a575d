"""(IA)^3: the config and the math, torch-free.

(IA)^3 learns one vector ``l`` per adapted layer and rescales activations with it, elementwise.
A *feedforward* module scales the layer's input, every other module its output (bias included)::

    feedforward:  y = (x * l) W^T + b      l: [in]    PEFT stores ia3_l as [1, in]
    otherwise:    y = (x W^T + b) * l      l: [out]   PEFT stores ia3_l as [out, 1]

Merged, the scale moves into the weight (and, for output scaling, into the bias)::

    feedforward:  W' = W * l[None, :]      b' = b
    otherwise:    W' = W * l[:, None]      b' = b * l

Unmerged in ONNX, the two cases are the ``ia3_in`` and ``ia3_out`` branch forms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, as_float32, register_method


@register_config
@dataclass
class IA3Config(AdapterConfig):
    """PEFT's IA3Config: same field names, same defaults.

    ``feedforward_modules`` names the modules whose *input* is scaled (a list matched as a suffix
    of the module path, or a regex matched against the whole path); it must be a subset of
    ``target_modules``.
    """

    peft_type = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def validate(self) -> None:
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (list, str)):
                raise AdapterConfigError(f"IA3Config.{name} must be a list of names or a regex string, got {value!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise AdapterConfigError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            extra = sorted(set(ff) - set(targets))
            raise AdapterConfigError(
                f"IA3Config.feedforward_modules must be a subset of target_modules; {extra} are not targets"
            )

    def is_feedforward(self, module_path: str) -> bool:
        """True when ``module_path`` has its input scaled (PEFT's rule: a regex must match the whole
        path; a list entry matches when the path ends with it)."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, module_path) is not None
        return any(module_path.endswith(name) for name in ff or ())


def ia3_merged(weight: Any, bias: Any, scale: Any, feedforward: bool) -> tuple[Any, Any]:
    """``(W', b')`` for ``W [out, in]``, ``b [out]`` (or None) and ``scale`` (``[in]`` when
    ``feedforward``, else ``[out]``); numpy arrays or torch tensors alike."""
    if feedforward:
        return weight * scale.reshape(1, -1), bias
    return weight * scale.reshape(-1, 1), None if bias is None else bias * scale.reshape(-1)


@register_method
class IA3Method(Method):
    """(IA)^3 on Linear and Conv1D: an ``ia3_in`` (feedforward) or ``ia3_out`` slot ``l``."""

    peft_type = "IA3"
    config_class = IA3Config
    tuner_module = "onnx_peft.tuners.ia3"
    tensor_names = ("ia3_l",)
    required_tensors = ("ia3_l",)
    layer_attrs = ("ia3_l",)

    def scale(self, config: IA3Config, module: str, parts: Mapping[str, Any]) -> tuple[Any, bool]:
        """``(l as a vector, feedforward)`` of ``module``; the stored shape must agree with the
        config (``[1, in]`` feedforward, ``[out, 1]`` otherwise)."""
        vector = parts["ia3_l"]
        feedforward = config.is_feedforward(module)
        expected = "[1, in]" if feedforward else "[out, 1]"
        ok = len(vector.shape) == 2 and (vector.shape[0] == 1 if feedforward else vector.shape[1] == 1)
        if not ok:
            raise IncompatibleAdapterError(
                f"module {module} has ia3_l of shape {list(vector.shape)} but the config makes it "
                f"{'a feedforward' if feedforward else 'an output-scaling'} module ({expected}); "
                "check feedforward_modules in adapter_config.json")
        return vector.reshape(-1), feedforward

    def merged_weight(self, config, module, weight, bias, parts, shared):
        scale, feedforward = self.scale(config, module, parts)
        return ia3_merged(weight, bias, scale, feedforward)

    def slot_tensors(self, config, module, parts, shared, base_weight):
        scale, feedforward = self.scale(config, module, parts)
        if feedforward:
            return {"ia3_in": {"ia3_l.in": as_float32(scale)}}
        return {"ia3_out": {"ia3_l.out": as_float32(scale)}}

