"""The torch layer shared by the LyCORIS methods (LoHa, LoKr) on nn.Linear and nn.Conv1d/2d.

A LyCORIS adapter builds a dense update ``dW`` (shaped like the base weight) from small
factors and runs it through the base layer's own operation, without the bias::

    x ──► base_layer (frozen W, bias) ──────────────────────┐
    │                                                       (+) ──► y
    └──► linear / conv with dW = rank_dropout(factors -> dW) ┘     (skipped by module_dropout)

    Linear x: [..., in] -> [..., out];  Conv x: [batch, in, *spatial] -> [batch, out, *spatial']

``dW`` comes from the method's torch-free math (onnx_peft.methods.loha / lokr), and merging
calls that method's ``merged_weight``, so ONNX merges, conversions and this layer agree. In
training, rank dropout zeroes random output rows of ``dW`` and module dropout skips the whole
adapter for a step, drawing random numbers in PEFT's order.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError
from ..methods.base import method_for
from ..methods.loha import LycorisConfig
from .base import AdapterLayer

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LycorisLayer(AdapterLayer):
    """Per-adapter LyCORIS state; a method subclass names its factor tensors and makes them."""

    peft_type: ClassVar[str]
    # hyper-parameters per adapter, as PEFT's LycorisLayer (plus the config, for merging)
    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout",
                         "lycoris_config")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self.lycoris_config: dict[str, LycorisConfig] = {}
        self.module_path = ""
        weight = base_layer.weight
        self.out_features = weight.shape[0]
        # Linear: in; conv: in / groups channels (each output sees that many), and the kernel
        self.in_features = weight.shape[1]
        self.kernel_size: tuple[int, ...] = tuple(weight.shape[2:])

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LycorisConfig, module_path: str) -> None:
        """Create ``adapter_name`` with the module's rank and alpha (rank/alpha patterns)."""
        r, alpha = config.rank_for(module_path), config.alpha_for(module_path)
        self.module_path = module_path
        self.r[adapter_name], self.alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = config.scaling_for(module_path)
        self.rank_dropout[adapter_name] = float(config.rank_dropout)
        self.rank_dropout_scale[adapter_name] = config.rescales_rank_dropout
        self.module_dropout[adapter_name] = float(config.module_dropout)
        self.lycoris_config[adapter_name] = config
        effective = bool(config.use_effective_conv2d) and any(k != 1 for k in self.kernel_size)
        shapes = self.factor_shapes(r, config, effective)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        for attr, shape in shapes.items():
            param = nn.Parameter(torch.empty(shape, device=weight.device, dtype=dtype))
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            getattr(self, attr)[adapter_name] = param
        zero = self.zero_init_factor(adapter_name, config.init_weights)
        if zero is not None:  # one zero factor makes the fresh adapter a no-op
            nn.init.zeros_(getattr(self, zero)[adapter_name])

    def core_shape(self, r: int) -> tuple[int, ...]:
        """A CP core's shape ``[r, r, k1, k2]`` (a 1-d kernel as ``[r, r, k, 1]``, as PEFT)."""
        kernel = self.kernel_size if len(self.kernel_size) == 2 else (*self.kernel_size, 1)
        return (r, r, *kernel)

    @abc.abstractmethod
    def factor_shapes(self, r: int, config: LycorisConfig, effective_conv: bool) -> dict[str, tuple[int, ...]]:
        """The factor tensors to create, ``{container name: shape}`` (PEFT's shapes)."""

    @abc.abstractmethod
    def zero_init_factor(self, adapter_name: str, init_weights: bool | str) -> str | None:
        """The factor that starts at zero under ``init_weights`` (None: all random)."""

    # -- math ------------------------------------------------------------------------------
    def parts(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's factors keyed as in PEFT checkpoints (``hada_w1_a``, ``lokr_w1`` ...)."""
        return {attr: getattr(self, attr)[adapter_name] for attr in self.adapter_layer_names
                if adapter_name in getattr(self, attr)}

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``dW`` in the base weight's shape ``[out, in, *k]``."""
        method = method_for(self.peft_type)
        delta = method.delta_weight(self.lycoris_config[adapter_name], self.module_path, self.parts(adapter_name))
        return delta.reshape(self.base_layer.weight.shape)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            method = method_for(self.peft_type)
            merged, _ = method.merged_weight(self.lycoris_config[adapter_name], self.module_path, weight, None,
                                             self.parts(adapter_name), {})
        return merged

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return super().unmerged_weight(adapter_name, weight)

    def _rank_dropped(self, adapter_name: str, delta: torch.Tensor) -> torch.Tensor:
        """``dW`` with random output rows zeroed (kept rows divided by their share when the
        method rescales), as PEFT's rank dropout."""
        keep = (torch.rand(delta.shape[0]) > self.rank_dropout[adapter_name]).to(delta.dtype)
        if self.rank_dropout_scale[adapter_name]:
            keep = keep / keep.mean()
        return delta * keep.view(-1, *[1] * (delta.dim() - 1)).to(delta.device)

    def _apply_delta(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``dW`` as its weight and no bias."""
        if isinstance(self.base_layer, nn.Linear):
            return F.linear(x, delta)
        return self.base_layer._conv_forward(x, delta, None)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``y = base(x) + sum over active adapters of op(x, dW)`` (the base op, no bias), with
        module and rank dropout in training."""
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.r:
                continue
            if self.training and torch.rand(1) <= self.module_dropout[name]:
                continue  # module dropout: this adapter sits out the step
            delta = self.get_delta_weight(name)
            if self.training and self.rank_dropout[name]:
                delta = self._rank_dropped(name, delta)
            result = result + self._apply_delta(x.to(delta.dtype), delta)
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return f"{self.peft_type.lower()}.{type(self).__name__}({self.base_layer!r})"


def make_lycoris_layer(layer_cls: type[LycorisLayer], module: nn.Module, adapter_name: str,
                       config: LycorisConfig, module_path: str) -> LycorisLayer:
    """Wrap ``module`` in ``layer_cls`` and create ``adapter_name``; PEFT's module types only."""
    if not isinstance(module, SUPPORTED):
        raise AdapterConfigError(
            f"module {module_path} ({type(module).__name__}) cannot take a {layer_cls.peft_type} adapter; "
            "supported: nn.Linear, nn.Conv1d, nn.Conv2d (exclude it with exclude_modules)")
    layer = layer_cls(module)
    layer.update_layer(adapter_name, config, module_path)
    return layer
