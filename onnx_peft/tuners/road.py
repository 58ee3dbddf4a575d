"""RoAd layers for nn.Linear.

::

    x ──► base_layer (frozen W, b) ──► y [.., out] ──► y C + swap(y) S ──► y'
                                        groups of g: element i pairs with i + g/2

``C, S [n, 2, g/2]`` come from ``road_theta`` / ``road_alpha`` (:func:`road_coefficients`, per
variant). Several active adapters rotate one after the other, as in PEFT. Merging folds the
rotation into the weight and the bias (``R W``, ``R b``) through
:class:`onnx_peft.methods.road.RoadMethod`, the math the ONNX passes use; unmerging applies the
closed-form inverse of each 2x2 block.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterConfigError, OnnxPeftError
from ..methods.base import method_for
from ..methods.road import RoadConfig, road_coefficients, road_inverse, road_merged, road_rotate
from .base import AdapterLayer, linear_layout


class RoadLayer(AdapterLayer):
    """RoAd on ``nn.Linear`` (weight ``[out, in]``). x: ``[..., in]`` -> ``[..., out]``;
    ``road_theta[name]`` / ``road_alpha[name]``: ``[out / 2]`` (road_1), ``[out]`` (road_2) or
    ``[2 out]`` (road_4)."""

    adapter_layer_names = ("road_theta", "road_alpha")
    other_param_names = ("road_config",)

    def __init__(self, base_layer: nn.Module, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.out_features, self.in_features = base_layer.weight.shape
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.road_config: dict[str, RoadConfig] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: RoadConfig) -> None:
        """PEFT's init: angles 0 and scales 1 (a no-op); ``init_weights=False``: theta ~ N(0, 0.5),
        alpha ~ N(1, 0.5)."""
        if self.out_features % config.group_size:
            raise AdapterConfigError(
                f"module {self.module_path} has {self.out_features} outputs, not a multiple of "
                f"RoadConfig.group_size={config.group_size}; choose a group_size that divides it")
        size = config.vector_size(self.out_features)
        if config.init_weights:
            theta, alpha = torch.zeros(size), torch.ones(size)
        else:
            theta, alpha = torch.randn(size) * 0.5, 1 + torch.randn(size) * 0.5
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.road_theta[adapter_name] = nn.Parameter(theta.to(weight.device, dtype))
        self.road_alpha[adapter_name] = nn.Parameter(alpha.to(weight.device, dtype))
        self.road_config[adapter_name] = config

    def coefficients(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, S)`` ``[n, 2, g/2]`` of one adapter (with gradients)."""
        config = self.road_config[adapter_name]
        return road_coefficients(config.variant, config.group_size, self.road_theta[adapter_name],
                                 self.road_alpha[adapter_name])

    # -- forward ---------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = base(x)``, then for each active adapter ``y <- y C + swap(y) S``."""
        result = self.base_layer(x, *args, **kwargs)
        previous_dtype = result.dtype
        for name in self.active_adapters:
            if name in self.road_theta:
                cos, sin = self.coefficients(name)
                result = road_rotate(result.to(cos.dtype), cos, sin)
        return result.to(previous_dtype)

    # -- merging: the weight and the bias both rotate ------------------------------------------
    def _rotated(self, adapter_name: str, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base_layer
        weight = self.base_weight().data
        bias = None if getattr(base, "bias", None) is None else base.bias.data
        parts = {"road_theta": self.road_theta[adapter_name].detach().to(weight.dtype),
                 "road_alpha": self.road_alpha[adapter_name].detach().to(weight.dtype)}
        config = self.road_config[adapter_name]
        if not inverse:
            return method_for("ROAD").merged_weight(config, self.module_path, weight, bias, parts, {})
        cos, sin = road_inverse(*road_coefficients(config.variant, config.group_size,
                                                   parts["road_theta"], parts["road_alpha"]))
        return road_merged(weight, bias, cos, sin)

    def _assign(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.set_base_weight(weight)
        if bias is not None:
            self.base_layer.bias.data = bias.to(self.base_layer.bias.dtype)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the rotations into ``W`` and ``b`` (``R W``, ``R b``)."""
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name not in self.road_theta or name in self.merged_adapters:
                continue
            weight, bias = self._rotated(name)
            finite = torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())
            if safe_merge and not finite:
                raise OnnxPeftError(f"merging adapter {name!r} gives NaN/inf weights; the adapter is broken")
            self._assign(weight, bias)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            self._assign(*self._rotated(self.merged_adapters.pop(), inverse=True))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``R W - W`` (RoAd is multiplicative; this is what merging changes in the weight)."""
        return self._rotated(adapter_name)[0] - self.base_weight().data

    def __repr__(self) -> str:
        return f"road.{type(self).__name__}({self.base_layer!r})"


def make_road_layer(module: nn.Module, adapter_name: str, config: RoadConfig, module_path: str) -> RoadLayer:
    """Wrap ``module`` (an nn.Linear; anything else raises naming it) and create ``adapter_name``."""
    linear_layout(module, module_path, "RoAd", conv1d=False)
    layer = RoadLayer(module, module_path)
    add_road_adapter(layer, adapter_name, config, module_path)
    return layer


def add_road_adapter(layer: RoadLayer, adapter_name: str, config: RoadConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = RoadLayer
make_layer = make_road_layer
add_adapter = add_road_adapter
