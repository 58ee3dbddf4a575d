"""WaveFT layers for nn.Linear and transformers' Conv1D.

::

    x ──► base_layer (frozen W, b) ────────────────────────────────────┐
    │                                                                   (+) ──► y
    └──► x delta^T,  delta = crop(idwt2(S)) * scaling  [out, in]  ─────┘
         S: zeros except ``n`` trained wavelet coefficients (waveft_spectrum [n])

The math (positions, padding, the separable inverse transform) is
:func:`onnx_peft.methods.waveft.wavelet_delta`, shared with merging and the ONNX passes.
``proportional_parameters`` splits ``n_frequency x (number of targets)`` over the targets by
their size, as PEFT does; it is resolved in :func:`before_inject`, which sees every target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError
from ..methods.base import method_for
from ..methods.waveft import SPECTRUM, WaveFTConfig
from ..targets import is_target
from .base import AdapterLayer, linear_layout


class WaveFTLayer(AdapterLayer):
    """WaveFT on ``nn.Linear`` (weight ``[out, in]``) or GPT-2's ``Conv1D`` (weight ``[in, out]``).
    x: ``[..., in]`` -> ``[..., out]``; ``waveft_spectrum[name]``: ``[n]``."""

    adapter_layer_names = (SPECTRUM,)
    other_param_names = ("waveft_config",)

    def __init__(self, base_layer: nn.Module, module_path: str, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.fan_in_fan_out = fan_in_fan_out
        shape = base_layer.weight.shape
        self.in_features, self.out_features = (shape[0], shape[1]) if fan_in_fan_out else (shape[1], shape[0])
        self.waveft_spectrum = nn.ParameterDict()
        self.waveft_config: dict[str, WaveFTConfig] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: WaveFTConfig) -> None:
        proportional = getattr(config, "proportional_n_frequency", None) or {}
        n = proportional.get(self.module_path) or config.n_frequency_for(self.module_path)
        if n > self.in_features * self.out_features:
            raise AdapterConfigError(
                f"WaveFTConfig.n_frequency={n} is more than {self.module_path} has weights "
                f"({self.out_features}x{self.in_features}); lower it or use n_frequency_pattern")
        spectrum = torch.zeros(n) if config.init_weights else torch.randn(n) * 0.01
        self.waveft_spectrum[adapter_name] = nn.Parameter(spectrum.to(self.base_layer.weight.device))
        self.waveft_config[adapter_name] = config

    # -- math ------------------------------------------------------------------------------
    def delta_out_in(self, adapter_name: str) -> torch.Tensor:
        """``delta [out, in]``, differentiable in the spectrum."""
        return method_for("WAVEFT").delta_weight(self.waveft_config[adapter_name], self.module_path,
                                                 self.out_features, self.in_features,
                                                 {SPECTRUM: self.waveft_spectrum[adapter_name]})

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.delta_out_in(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + delta`` through the method's math (weight in the base layer's layout)."""
        out_first = weight.T if self.fan_in_fan_out else weight
        merged, _ = method_for("WAVEFT").merged_weight(self.waveft_config[adapter_name], self.module_path, out_first,
                                                       None, {SPECTRUM: self.waveft_spectrum[adapter_name].detach()}, {})
        return merged.T if self.fan_in_fan_out else merged

    # -- forward ---------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + sum over active adapters of x delta^T``."""
        result = self.base_layer(x, *args, **kwargs)
        previous_dtype = result.dtype
        for name in self.active_adapters:
            if name in self.waveft_spectrum:
                delta = self.delta_out_in(name)
                result = result + F.linear(x.to(delta.dtype), delta)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return f"waveft.{type(self).__name__}({self.base_layer!r})"


def before_inject(base_model: nn.Module, adapter_name: str, config: WaveFTConfig) -> None:
    """``proportional_parameters``: ``n`` of each target = ``max(1, round(n_frequency x targets x
    its in*out / the sum of in*out))`` (PEFT's rule), kept on the config for the layers."""
    if not config.proportional_parameters:
        return
    sizes = {}
    for key, module in base_model.model.named_modules():
        if key and is_target(key, config):
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and weight is not None):
                sizes[key] = weight.numel()
    if not sizes:
        raise AdapterConfigError("WaveFTConfig.proportional_parameters: target_modules matched no Linear/Conv1D")
    budget, total = config.n_frequency * len(sizes), sum(sizes.values())
    config.proportional_n_frequency = {key: max(1, round(size / total * budget)) for key, size in sizes.items()}


def make_waveft_layer(module: nn.Module, adapter_name: str, config: WaveFTConfig, module_path: str) -> WaveFTLayer:
    """Wrap ``module`` in a WaveFT layer and create ``adapter_name`` on it."""
    layer = WaveFTLayer(module, module_path, linear_layout(module, module_path, "WaveFT"))
    add_waveft_adapter(layer, adapter_name, config, module_path)
    return layer


def add_waveft_adapter(layer: WaveFTLayer, adapter_name: str, config: WaveFTConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = WaveFTLayer
make_layer = make_waveft_layer
add_adapter = add_waveft_adapter
