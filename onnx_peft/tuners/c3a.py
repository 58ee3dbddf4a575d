"""C3A layer for nn.Linear: block circular convolutions, computed with FFTs.

::

    x [.., in] ──► base_layer (frozen W, b) ─────────────────────────────────┐
    │                                                                        (+) ──► y [.., out]
    └──► blocks x_j [.., n, b] ──► y_i = Re fft( sum_j ifft(x_j) fft(w[i, j]) ) / in ──┘
                                   (a circular correlation per block pair; w: [m, n, b])

Training runs the FFT form (``O(m n b log b)`` per token, float32 as PEFT requires); merging
goes through :class:`onnx_peft.methods.c3a.C3AMethod`, whose block-circulant matrix the ONNX
passes use too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..methods.base import method_for
from ..methods.c3a import KERNEL, C3AConfig, check_block_size
from .base import AdapterLayer, linear_layout


def block_circular_correlation(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``x [.., n b]``, ``kernel [m, n, b]`` -> ``[.., m b]``: ``y_i[p] = sum_j sum_l w[i, j, l] x_j[p + l]``
    (indices mod b), via ``fft(ifft(x_j) fft(w[i, j]))``, float32."""
    m, n, b = kernel.shape
    blocks = x.reshape(*x.shape[:-1], n, b)
    mixed = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(blocks), torch.fft.fft(kernel))
    return torch.fft.fft(mixed).real.reshape(*x.shape[:-1], m * b)


class C3ALayer(AdapterLayer):
    """C3A on ``nn.Linear``. x: ``[..., in]`` -> ``[..., out]``; ``c3a_kernel[name]``:
    ``[out / b, in / b, b]`` float32."""

    adapter_layer_names = (KERNEL,)
    other_param_names = ("c3a_config",)

    def __init__(self, base_layer: nn.Linear, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.out_features, self.in_features = base_layer.weight.shape
        self.c3a_kernel = nn.ParameterDict()
        self.c3a_config: dict[str, C3AConfig] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: C3AConfig) -> None:
        b = config.block_size_for(self.module_path)
        check_block_size(b, self.in_features, self.out_features, self.module_path)
        kernel = torch.zeros(self.out_features // b, self.in_features // b, b)  # FFTs need float32
        init = config.init_weights
        if init == "gaussian":
            nn.init.normal_(kernel)
        elif init == "kaiming_uniform":
            bound = math.sqrt(1.0 / self.in_features)
            nn.init.uniform_(kernel, -bound, bound)
        elif init is not True:  # "xavier_uniform" or False
            bound = math.sqrt(3.0) * math.sqrt(2.0 / (self.in_features + self.out_features))
            nn.init.uniform_(kernel, -bound, bound)
        self.c3a_kernel[adapter_name] = nn.Parameter(kernel.to(self.base_layer.weight.device))
        self.c3a_config[adapter_name] = config

    # -- math ------------------------------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``delta [out, in]`` (block-circulant, from the method's math)."""
        return method_for("C3A").delta_weight(self.c3a_config[adapter_name], self.module_path, self.out_features,
                                              self.in_features, {KERNEL: self.c3a_kernel[adapter_name]})

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + delta`` through the method's math."""
        merged, _ = method_for("C3A").merged_weight(self.c3a_config[adapter_name], self.module_path, weight, None,
                                                    {KERNEL: self.c3a_kernel[adapter_name].detach()}, {})
        return merged

    # -- forward ---------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + sum over active adapters of block_circular_correlation(x, w) / in``."""
        result = self.base_layer(x, *args, **kwargs)
        x32 = x.to(torch.float32)
        for name in self.active_adapters:
            if name in self.c3a_kernel:
                kernel = self.c3a_kernel[name].to(torch.float32)
                update = block_circular_correlation(x32, kernel) / self.in_features
                result = result + update.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"c3a.{type(self).__name__}({self.base_layer!r})"


def make_c3a_layer(module: nn.Module, adapter_name: str, config: C3AConfig, module_path: str) -> C3ALayer:
    """Wrap ``module`` (an nn.Linear) in a C3A layer and create ``adapter_name`` on it."""
    linear_layout(module, module_path, "C3A", conv1d=False)
    layer = C3ALayer(module, module_path)
    add_c3a_adapter(layer, adapter_name, config, module_path)
    return layer


def add_c3a_adapter(layer: C3ALayer, adapter_name: str, config: C3AConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = C3ALayer
make_layer = make_c3a_layer
add_adapter = add_c3a_adapter
