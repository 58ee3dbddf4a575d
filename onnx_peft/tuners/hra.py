"""HRA layers for nn.Linear and nn.Conv2d: Householder reflections applied to the weight.

::

    u [in, r] ──► R = H_0 ... H_{r-1},  H_i = I - 2 v_i v_i^T  (v_i = u_i / |u_i|, or Gram-Schmidt)
                  │
    x ──► base_layer with weight W R (frozen W) ──► y          y = x (W R)^T + b

Several active adapters compose as ``W R_a R_b``. The reflected weight comes from
:meth:`onnx_peft.methods.hra.HraMethod.merged_weight`, shared with the ONNX passes; a conv
kernel ``[out, in, k, k]`` is reflected as ``[out, in*k*k]`` (PEFT's layout of ``hra_u``).
"""

from __future__ import annotations

import abc
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError
from ..methods.base import method_for
from ..methods.hra import U_NAME, HRAConfig, hra_reflect
from .base import AdapterLayer


class HraLayer(AdapterLayer):
    """Per-adapter ``hra_u [n, r]`` (``n`` = in features, or ``in*k*k`` for a conv kernel)."""

    adapter_layer_names = ("hra_u",)
    other_param_names = ("hra_config",)

    def __init__(self, base_layer: nn.Module, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.hra_u = nn.ParameterDict()
        self.hra_config: dict[str, HRAConfig] = {}

    @property
    def reflected_features(self) -> int:
        """``n``: the length of each reflection vector (columns of the flattened weight)."""
        return self.base_layer.weight[0].numel()

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: HRAConfig) -> None:
        """Create ``hra_u [n, r]``; PEFT's init repeats each column twice so that R = I."""
        r = config.r
        u = torch.empty(self.reflected_features, r)
        if not config.init_weights:
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        elif r % 2:
            warnings.warn(f"HRA at {self.module_path}: the symmetric init needs an even r (got {r}); "
                          "using a random one, so the fresh adapter is not a no-op", stacklevel=2)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        else:
            half = torch.empty(self.reflected_features, r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else u.dtype
        self.hra_u[adapter_name] = nn.Parameter(u.to(weight.device, dtype))
        self.hra_config[adapter_name] = config

    # -- math ------------------------------------------------------------------------------
    def reflected(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight @ R`` of one adapter (any shape ``[out, ...]``), through the method's math."""
        u = self.hra_u[adapter_name]
        merged, _ = method_for("HRA").merged_weight(self.hra_config[adapter_name], self.module_path,
                                                    weight.to(u.dtype), None, {U_NAME: u}, {})
        return merged

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.reflected(adapter_name, weight)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W' R^-1`` (R is orthogonal: the reflections in reverse order)."""
        u = self.hra_u[adapter_name].detach()
        flat = weight.to(u.dtype).reshape(weight.shape[0], -1)
        return hra_reflect(flat, u, self.hra_config[adapter_name].apply_GS, inverse=True).reshape(weight.shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W R - W``: HRA is multiplicative, this is only for callers that want a difference."""
        weight = self.base_layer.weight
        return self.reflected(adapter_name, weight) - weight.to(self.hra_u[adapter_name].dtype)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = op(x, W R_a R_b ..., b)``: the base layer's op with the reflected weight."""
        names = [n for n in self.active_adapters if n in self.hra_u]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        weight = self.base_layer.weight
        for name in names:                       # W R_a R_b ...
            weight = self.reflected(name, weight)
        bias = self.bias.to(weight.dtype) if self.bias is not None else None
        return self._reflect_forward(x.to(weight.dtype), weight, bias).to(x.dtype)

    @abc.abstractmethod
    def _reflect_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's op with the reflected ``weight``."""

    def __repr__(self) -> str:
        return f"hra.{type(self).__name__}({self.base_layer!r})"


class Linear(HraLayer):
    """HRA on ``nn.Linear``: x ``[..., in]`` -> ``[..., out]``."""

    def _reflect_forward(self, x, weight, bias):
        return F.linear(x, weight, bias)


class Conv2d(HraLayer):
    """HRA on ``nn.Conv2d`` with a square kernel and one group: x ``[b, in, h, w]`` -> ``[b, out, h', w']``.

    The conv runs with the base layer's own stride/padding/dilation (PEFT passes only the first
    stride and padding; the two agree on symmetric settings).
    """

    def __init__(self, base_layer: nn.Conv2d, module_path: str) -> None:
        kernel = tuple(base_layer.kernel_size)
        if base_layer.groups != 1 or kernel[0] != kernel[1]:
            raise AdapterConfigError(
                f"module {module_path}: HRA needs a Conv2d with groups=1 and a square kernel (got "
                f"groups={base_layer.groups}, kernel_size={kernel}); exclude it with exclude_modules")
        super().__init__(base_layer, module_path)

    def _reflect_forward(self, x, weight, bias):
        return self.base_layer._conv_forward(x, weight, bias)


def make_hra_layer(module: nn.Module, adapter_name: str, config: HRAConfig, module_path: str) -> HraLayer:
    """Wrap ``module`` in the HRA layer for its type and create ``adapter_name`` on it."""
    layer: HraLayer
    if isinstance(module, nn.Linear):
        layer = Linear(module, module_path)
    elif isinstance(module, nn.Conv2d):
        layer = Conv2d(module, module_path)
    else:
        raise AdapterConfigError(
            f"module {module_path} ({type(module).__name__}) cannot take an HRA adapter; supported: "
            "nn.Linear, nn.Conv2d")
    add_hra_adapter(layer, adapter_name, config, module_path)
    return layer


def add_hra_adapter(layer: HraLayer, adapter_name: str, config: HRAConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = HraLayer
make_layer = make_hra_layer
add_adapter = add_hra_adapter
