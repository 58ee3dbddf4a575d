"""FourierFT layers for nn.Linear and transformers' Conv1D.

::

    x ──► base_layer (frozen W, b) ───────────────────────────────┐
    │                                                              (+) ──► y
    └──► x delta^T,  delta = Re(ifft2(S)) * scaling  [out, in] ───┘
         S [out, in]: zeros except S[rows, cols] = spectrum [n]

Training runs PEFT's FFT (cheap for any ``n``, differentiable); merging goes through
:class:`onnx_peft.methods.fourierft.FourierFTMethod`, the math the ONNX passes use, and the
frequency positions come from its :func:`frequency_indices` (torch's randperm, replayed).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError
from ..methods.base import method_for
from ..methods.fourierft import FourierFTConfig, frequency_indices
from .base import AdapterLayer, linear_layout


class FourierFTLayer(AdapterLayer):
    """FourierFT on ``nn.Linear`` (weight ``[out, in]``) or GPT-2's ``Conv1D`` (weight ``[in, out]``,
    ``fan_in_fan_out``). x: ``[..., in]`` -> ``[..., out]``; ``fourierft_spectrum[name]``: ``[n]``."""

    adapter_layer_names = ("fourierft_spectrum",)
    other_param_names = ("fourierft_config", "indices")

    def __init__(self, base_layer: nn.Module, module_path: str, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.fan_in_fan_out = fan_in_fan_out
        shape = base_layer.weight.shape
        self.in_features, self.out_features = (shape[0], shape[1]) if fan_in_fan_out else (shape[1], shape[0])
        self.fourierft_spectrum = nn.ParameterDict()
        self.fourierft_config: dict[str, FourierFTConfig] = {}
        self.indices: dict[str, torch.Tensor] = {}  # [2, n]: rows, cols (not saved, as in PEFT)

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: FourierFTConfig) -> None:
        n = config.n_frequency_for(self.module_path)
        if n > self.in_features * self.out_features:
            raise AdapterConfigError(
                f"FourierFTConfig.n_frequency={n} is more than {self.module_path} has weights "
                f"({self.out_features}x{self.in_features}); lower it or use n_frequency_pattern")
        rows, cols = frequency_indices(self.out_features, self.in_features, n, int(config.random_loc_seed))
        self.indices[adapter_name] = torch.tensor(np.stack([rows, cols]))
        spectrum = torch.zeros(n) if config.init_weights else torch.randn(n)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else spectrum.dtype
        self.fourierft_spectrum[adapter_name] = nn.Parameter(spectrum.to(weight.device, dtype))
        self.fourierft_config[adapter_name] = config

    # -- math ------------------------------------------------------------------------------
    def delta_out_in(self, adapter_name: str) -> torch.Tensor:
        """``Re(ifft2(S)) * scaling`` ``[out, in]`` (the FFT needs float32; the result has the
        spectrum's dtype)."""
        spectrum = self.fourierft_spectrum[adapter_name]
        rows, cols = self.indices[adapter_name].to(spectrum.device)
        dense = torch.zeros(self.out_features, self.in_features, device=spectrum.device)
        dense[rows, cols] = spectrum.float()
        delta = torch.fft.ifft2(dense).real * self.fourierft_config[adapter_name].scaling
        return delta.to(spectrum.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.delta_out_in(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + delta`` through the method's math (weight in the base layer's layout)."""
        out_first = weight.T if self.fan_in_fan_out else weight
        spectrum = self.fourierft_spectrum[adapter_name].detach().float()
        merged, _ = method_for("FOURIERFT").merged_weight(
            self.fourierft_config[adapter_name], self.module_path, out_first.float(), None,
            {"fourierft_spectrum": spectrum}, {})
        return merged.T if self.fan_in_fan_out else merged

    # -- forward ---------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + sum over active adapters of x delta^T``."""
        result = self.base_layer(x, *args, **kwargs)
        previous_dtype = result.dtype
        for name in self.active_adapters:
            if name in self.fourierft_spectrum:
                delta = self.delta_out_in(name)
                result = result + F.linear(x.to(delta.dtype), delta)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return f"fourierft.{type(self).__name__}({self.base_layer!r})"


def make_fourierft_layer(module: nn.Module, adapter_name: str, config: FourierFTConfig,
                         module_path: str) -> FourierFTLayer:
    """Wrap ``module`` in a FourierFT layer and create ``adapter_name`` on it."""
    layer = FourierFTLayer(module, module_path, linear_layout(module, module_path, "FourierFT"))
    add_fourierft_adapter(layer, adapter_name, config, module_path)
    return layer


def add_fourierft_adapter(layer: FourierFTLayer, adapter_name: str, config: FourierFTConfig,
                          module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = FourierFTLayer
make_layer = make_fourierft_layer
add_adapter = add_fourierft_adapter
