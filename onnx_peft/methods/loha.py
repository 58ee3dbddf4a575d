"""LoHa (low-rank Hadamard product) and the LyCORIS base it shares with LoKr, torch-free.

LoHa's update is the element-wise product of two rank-r matrices, so its rank can reach r^2
while it trains ``2 r (in + out)`` numbers::

    dW = s * (w1_a @ w1_b) * (w2_a @ w2_b)        w*_a: [out, r], w*_b: [r, in], s = alpha / r

A convolution with ``use_effective_conv2d`` (and a kernel larger than 1) keeps its kernel in
a CP core ``t [r, r, k1, k2]`` instead: each factor is ``cp_weight(t, w_a [r, out], w_b [r, in])``.

The update is dense, so the unmerged ONNX form is ``dense`` (``D = dW^T [in, out]``; see
methods/forms.py). The math here runs on numpy arrays and torch tensors alike: the tuner
(onnx_peft.tuners.loha), MergeAdapters and convert-adapters all call it.

:class:`LycorisConfig` and :class:`LycorisMethod` are the LyCORIS family's shared part (PEFT's
``lycoris_utils``): the config fields, ``alpha / r`` scaling, merging and the dense slot.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..config import AdapterConfig, check_scale, register_config
from ..errors import AdapterConfigError, CheckpointError, IncompatibleAdapterError
from ..targets import pattern_value
from .base import Method, register_method
from .forms import DenseForm


# -- math shared by LoHa and LoKr (numpy or torch) -----------------------------------------------
def einsum(spec: str, *operands: Any) -> Any:
    """``np.einsum`` for numpy arrays, ``torch.einsum`` for tensors."""
    if isinstance(operands[0], np.ndarray):
        return np.einsum(spec, *operands)
    import torch

    return torch.einsum(spec, *operands)


def cp_weight(core: Any, w_a: Any, w_b: Any) -> Any:
    """A conv kernel from its CP decomposition (FedPara's "Proposition 3").

    core: ``[r, r, k1, k2]``, w_a: ``[r, out]``, w_b: ``[r, in]`` -> ``[out, in, k1, k2]``.
    """
    return einsum("ijkl,ip,jr->prkl", core, w_a, w_b)


def as_float32_parts(parts: Mapping[str, Any]) -> dict[str, Any]:
    """numpy half-precision tensors as float32 (numpy fp16 matmul is ~20x slower); torch as is."""
    return {k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype.itemsize < 4 else v
            for k, v in parts.items()}


# -- the shared config ----------------------------------------------------------------------------
@dataclass
class LycorisConfig(AdapterConfig):
    """PEFT's LyCORIS config fields (LoHa's and LoKr's), same names and defaults."""

    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    # init_weights values besides True/False (LoKr: "lycoris")
    init_choices: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        name = type(self).__name__
        ranks = {"r": self.r, **{f"rank_pattern[{k!r}]": v for k, v in (self.rank_pattern or {}).items()}}
        for key, rank in ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise AdapterConfigError(f"{name}.{key} must be a positive integer, got {rank!r}")
        check_scale(self.alpha, f"{name}.alpha")
        for key, alpha in (self.alpha_pattern or {}).items():
            check_scale(alpha, f"{name}.alpha_pattern[{key!r}]")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise AdapterConfigError(f"{name}.{key} must be in [0, 1), got {value!r}")
        if not isinstance(self.init_weights, bool) and self.init_weights not in self.init_choices:
            choices = ", ".join(["True", "False", *map(repr, self.init_choices)])
            raise AdapterConfigError(f"{name}.init_weights={self.init_weights!r} is not supported; use {choices}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError(f"{name}.layers_pattern needs layers_to_transform")

    def rank_for(self, module_path: str) -> int:
        return int(pattern_value(self.rank_pattern or {}, module_path, self.r))

    def alpha_for(self, module_path: str) -> float:
        return pattern_value(self.alpha_pattern or {}, module_path, self.alpha)

    def scaling_for(self, module_path: str) -> float:
        """``alpha / r`` of the module (PEFT's LyCORIS scaling, whatever the factor shapes)."""
        return self.alpha_for(module_path) / self.rank_for(module_path)

    @property
    def rescales_rank_dropout(self) -> bool:
        """Whether rank dropout divides the kept rows by their mean (LoHa always does)."""
        return True


# -- the shared method ----------------------------------------------------------------------------
class LycorisMethod(Method):
    """A LyCORIS method: a dense update ``dW`` made from small factors, merged as ``W + dW``
    and inserted as the ``dense`` form ``D = dW^T [in, out]`` (Linear only)."""

    @abc.abstractmethod
    def delta_weight(self, config: LycorisConfig, module: str, parts: Mapping[str, Any]) -> Any:
        """``dW`` from the factors: ``[out, in]`` for a Linear; for a conv, a tensor with the
        kernel's element count that reshapes to the kernel ``[out, in, *k]``."""

    def merged_weight(self, config, module, weight, bias, parts, shared):
        """``(W + dW, bias)``: ``W [out, in, *k]`` and the bias unchanged."""
        delta = self.delta_weight(config, module, as_float32_parts(parts))
        return weight + delta.reshape(tuple(weight.shape)), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        """``{"dense": {"delta.weight": dW^T [in, out]}}``."""
        parts = {k: np.asarray(v, np.float32) for k, v in parts.items()}
        delta = self.delta_weight(config, module, parts)
        if delta.ndim != 2:
            raise IncompatibleAdapterError(
                f"module {module} has a {self.peft_type} convolution update of shape {list(delta.shape)}; only "
                "linear layers can be inserted or converted (merge conv adapters with export mode='merged')")
        return {DenseForm.name: {DenseForm.D: np.ascontiguousarray(delta.T)}}

    def _check_rank(self, config: LycorisConfig, module: str, parts: Mapping[str, Any], names: tuple[str, ...]) -> None:
        """The factors ``names`` (``[r, ...]``) must have the rank the config gives ``module``:
        the scaling ``alpha / r`` depends on it."""
        rank = config.rank_for(module)
        for name in names:
            if name in parts and parts[name].shape[0] != rank:
                raise IncompatibleAdapterError(
                    f"module {module} has {name} of shape {list(parts[name].shape)} but the config says r={rank}; "
                    "the adapter_config.json does not belong to these weights")

    @staticmethod
    def _require(module: str, parts: Mapping[str, Any], *names: str) -> None:
        for name in names:
            if name not in parts:
                raise CheckpointError(f"module {module} has no {name}; the checkpoint is incomplete")


# -- LoHa -----------------------------------------------------------------------------------------
@register_config
@dataclass
class LoHaConfig(LycorisConfig):
    """PEFT's LoHaConfig: same field names, same defaults."""

    peft_type = "LOHA"

    init_weights: bool = True


def loha_delta_weight(parts: Mapping[str, Any], scale: float) -> Any:
    """``s * (w1_a @ w1_b) * (w2_a @ w2_b)``, or with CP cores ``s * cp(t1, ..) * cp(t2, ..)``.

    Linear: w*_a ``[out, r]``, w*_b ``[r, in]`` -> ``[out, in]``. Conv (flattened kernel):
    w*_b ``[r, in * k1 * k2]``. Effective conv: t* ``[r, r, k1, k2]``, w*_a ``[r, out]``,
    w*_b ``[r, in]`` -> ``[out, in, k1, k2]``.
    """
    if "hada_t1" in parts:
        w1 = cp_weight(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
        w2 = cp_weight(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
    else:
        w1 = parts["hada_w1_a"] @ parts["hada_w1_b"]
        w2 = parts["hada_w2_a"] @ parts["hada_w2_b"]
    return (w1 * w2) * scale


@register_method
class LoHaMethod(LycorisMethod):
    """LoHa on Linear and Conv1d/2d; ``dense`` slots for Linear."""

    peft_type = "LOHA"
    config_class = LoHaConfig
    tuner_module = "onnx_peft.tuners.loha"
    tensor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    required_tensors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    layer_attrs = tensor_names

    def features(self, config, module, parts):
        w1_a, w1_b = parts["hada_w1_a"], parts["hada_w1_b"]
        if "hada_t1" in parts or w1_a.ndim != 2 or w1_b.ndim != 2:
            return None
        return int(w1_b.shape[1]), int(w1_a.shape[0])

    def delta_weight(self, config, module, parts):
        self._require(module, parts, *self.required_tensors)
        if "hada_t1" in parts:
            self._require(module, parts, "hada_t2")
        self._check_rank(config, module, parts, ("hada_w1_b", "hada_w2_b"))
        return loha_delta_weight(parts, config.scaling_for(module))
