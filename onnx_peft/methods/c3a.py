"""C3A (circular convolution adaptation): the config and the math, torch-free.

C3A splits the input ``[in]`` into ``n`` blocks of size ``b`` and the output ``[out]`` into
``m``; output block ``i`` gets the sum over input blocks ``j`` of a circular correlation with a
trained kernel ``w[i, j] [b]`` (PEFT computes it with FFTs), scaled by ``1 / in``::

    c3a_kernel w: [m, n, b]        m = out / b, n = in / b
    y_i[p] += 1/in  sum_j sum_l  w[i, j, l] x_j[(p + l) mod b]

As a matrix, each ``[b, b]`` block of the update is circulant::

    delta[i b + p, j b + q] = w[i, j, (q - p) mod b] / in          delta: [out, in]

:func:`circulant_delta` builds that matrix by indexing (exact, numpy or torch); unmerged in
ONNX it is a ``dense`` branch ``D = delta^T [in, out]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import AdapterConfig, check_positive_ints, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from ..targets import pattern_value
from .base import Method, as_float32, register_method

KERNEL = "c3a_kernel"
_BIAS_CHOICES = ("none", "all", "c3a_only")
_INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@register_config
@dataclass
class C3AConfig(AdapterConfig):
    """PEFT's C3AConfig: same field names, same defaults (``init_weights=True`` is a no-op
    adapter; ``False`` means ``xavier_uniform``)."""

    peft_type = "C3A"

    block_size: int = 256
    target_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool | str | None = "xavier_uniform"

    def validate(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self.block_size_pattern = dict(self.block_size_pattern or {})
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise AdapterConfigError(f"C3AConfig.block_size must be a positive integer, got {self.block_size!r}")
        check_positive_ints(self.block_size_pattern, "C3AConfig.block_size_pattern")
        if self.bias not in _BIAS_CHOICES:
            raise AdapterConfigError(f"C3AConfig.bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in _INITS):
            raise AdapterConfigError(
                f"C3AConfig.init_weights must be True (zeros), False, 'gaussian', 'kaiming_uniform' or "
                f"'xavier_uniform', got {self.init_weights!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise AdapterConfigError("C3AConfig.layers_to_transform cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise AdapterConfigError("C3AConfig.layers_pattern cannot be used when target_modules is a regex string")

    def block_size_for(self, module_path: str) -> int:
        return int(pattern_value(self.block_size_pattern, module_path, self.block_size))


def check_block_size(block_size: int, in_features: int, out_features: int, module: str) -> None:
    """``block_size`` must divide both sides of the layer (PEFT's rule), else the error names both."""
    if in_features % block_size or out_features % block_size:
        raise AdapterConfigError(
            f"C3A block_size={block_size} must divide in_features={in_features} and out_features={out_features} "
            f"of {module}; pick a common divisor (or set block_size_pattern for this module)")


def circulant_delta(kernel: Any, in_features: int) -> Any:
    """``delta [out, in]`` from ``kernel [m, n, b]``: block ``(i, j)`` is the circulant
    ``w[i, j, (q - p) mod b]`` ``[b, b]``, all divided by ``in_features``. numpy gives float32; a
    torch tensor keeps its dtype and device (and autograd)."""
    m, n, b = (int(d) for d in kernel.shape)
    shift = (np.arange(b)[None, :] - np.arange(b)[:, None]) % b         # [p, q] -> (q - p) mod b
    if isinstance(kernel, np.ndarray):
        blocks = as_float32(kernel)[:, :, shift]                        # [m, n, b(p), b(q)]
        return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3).reshape(m * b, n * b)) / np.float32(in_features)
    import torch

    blocks = kernel[:, :, torch.from_numpy(shift).to(kernel.device)]
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) / in_features


@register_method
class C3AMethod(Method):
    """C3A on nn.Linear: the block-circulant delta as a ``dense`` slot ``D = delta^T [in, out]``."""

    peft_type = "C3A"
    config_class = C3AConfig
    tuner_module = "onnx_peft.tuners.c3a"
    tensor_names = (KERNEL,)
    required_tensors = (KERNEL,)
    layer_attrs = (KERNEL,)

    def features(self, config, module, parts):
        m, n, b = parts[KERNEL].shape
        return int(n * b), int(m * b)

    def delta_weight(self, config: C3AConfig, module: str, out_features: int, in_features: int,
                     parts: Mapping[str, Any]) -> Any:
        """``delta [out, in]`` of ``module`` (numpy or torch, like its kernel), checked against
        the config's block size and the layer's shape."""
        kernel = parts[KERNEL]
        b = config.block_size_for(module)
        expected = (out_features // b, in_features // b, b)
        if in_features % b or out_features % b or tuple(kernel.shape) != expected:
            raise IncompatibleAdapterError(
                f"module {module} has c3a_kernel of shape {list(kernel.shape)} but a {out_features}x{in_features} "
                f"layer with block_size={b} needs {list(expected)}; the adapter_config.json or the base model "
                "does not belong to these weights")
        return circulant_delta(kernel, in_features)

    def merged_weight(self, config, module, weight, bias, parts, shared):
        out_features, in_features = weight.shape
        delta = self.delta_weight(config, module, out_features, in_features, parts)
        return weight + (delta if isinstance(weight, np.ndarray) else delta.to(weight.dtype)), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        out_features, in_features = base_weight().shape
        delta = self.delta_weight(config, module, out_features, in_features, {KERNEL: as_float32(parts[KERNEL])})
        return {"dense": {"delta.weight": np.ascontiguousarray(delta.T)}}
