"""(IA)^3 layers for nn.Linear and transformers' Conv1D.

::

    feedforward module:  x ──► * l [in] ──► base_layer (W, b) ──────────────► y
    any other module:    x ──► base_layer (W, b) ──► * l [out] (bias too) ──► y

Several active adapters multiply their vectors, as in PEFT. Merging folds ``l`` into ``W``
(and into ``b`` for output scaling) through :class:`onnx_peft.methods.ia3.IA3Method`, the
same math the ONNX passes use; unmerging divides it out again.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterConfigError, OnnxPeftError
from ..methods.base import method_for
from ..methods.ia3 import IA3Config, ia3_merged
from .base import AdapterLayer, linear_layout


class IA3Layer(AdapterLayer):
    """(IA)^3 on ``nn.Linear`` (weight ``[out, in]``) or GPT-2's ``Conv1D`` (weight ``[in, out]``,
    ``fan_in_fan_out``). x: ``[..., in]`` -> ``[..., out]``.

    Whether the layer scales its input (``is_feedforward``) is fixed by the first adapter's
    config, as PEFT does; ``ia3_l[name]`` is ``[1, in]`` then, ``[out, 1]`` otherwise.
    """

    adapter_layer_names = ("ia3_l",)
    other_param_names = ("ia3_config",)

    def __init__(self, base_layer: nn.Module, module_path: str, is_feedforward: bool,
                 fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = fan_in_fan_out
        shape = base_layer.weight.shape
        self.in_features, self.out_features = (shape[0], shape[1]) if fan_in_fan_out else (shape[1], shape[0])
        self.ia3_l = nn.ParameterDict()
        self.ia3_config: dict[str, IA3Config] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: IA3Config) -> None:
        if config.is_feedforward(self.module_path) != self.is_feedforward:
            raise AdapterConfigError(
                f"adapter {adapter_name!r} makes {self.module_path} "
                f"{'a' if not self.is_feedforward else 'not a'} feedforward module, unlike the adapters "
                "already on it; use the same feedforward_modules for every IA3 adapter of a model")
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        vector = torch.ones(shape) if config.init_ia3_weights else torch.randn(shape)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else vector.dtype
        self.ia3_l[adapter_name] = nn.Parameter(vector.to(weight.device, dtype))
        self.ia3_config[adapter_name] = config

    # -- forward ---------------------------------------------------------------------------
    def _active_scale(self) -> torch.Tensor | None:
        """The product of the active adapters' vectors (``[in]`` or ``[out]``), or None."""
        scale = None
        for name in self.active_adapters:
            if name in self.ia3_l:
                vector = self.ia3_l[name].flatten()
                scale = vector if scale is None else scale * vector
        return scale

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """feedforward: ``base(x * l)``; otherwise ``base(x) * l``."""
        scale = self._active_scale()
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)

    # -- merging ---------------------------------------------------------------------------
    def _out_first(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def _scaled(self, adapter_name: str, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base layer's ``(W, b)`` (W in its own layout) with ``adapter_name`` merged in, or
        divided out (``inverse``; a zero scale cannot be undone and is left as is)."""
        base = self.base_layer
        weight = self._out_first(base.weight.data)
        bias = None if getattr(base, "bias", None) is None else base.bias.data
        vector = self.ia3_l[adapter_name].detach()
        if inverse:
            flat = vector.flatten()
            inv = torch.where(flat == 0, torch.ones_like(flat), 1 / flat)
            weight, bias = ia3_merged(weight, bias, inv, self.is_feedforward)
        else:
            weight, bias = method_for("IA3").merged_weight(
                self.ia3_config[adapter_name], self.module_path, weight, bias, {"ia3_l": vector}, {})
        return self._out_first(weight), bias

    def _assign(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self.base_layer
        base.weight.data = weight.to(base.weight.dtype)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the adapters' scales into the weight (and the bias, for output scaling)."""
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name not in self.ia3_l or name in self.merged_adapters:
                continue
            weight, bias = self._scaled(name)
            finite = torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())
            if safe_merge and not finite:
                raise OnnxPeftError(f"merging adapter {name!r} gives NaN/inf weights; the adapter is broken")
            self._assign(weight, bias)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._assign(*self._scaled(self.merged_adapters.pop(), inverse=True))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W' - W`` in the base weight's layout (IA3 is multiplicative; this is what merging changes)."""
        return self._scaled(adapter_name)[0] - self.base_layer.weight.data

    def __repr__(self) -> str:
        return f"ia3.{type(self).__name__}({self.base_layer!r}, feedforward={self.is_feedforward})"


def before_inject(base_model: nn.Module, adapter_name: str, config: IA3Config) -> None:
    """PEFT fills a missing ``feedforward_modules`` from a per-architecture table; we have none,
    so ask for it rather than silently scaling outputs where PEFT would scale inputs."""
    if config.feedforward_modules is None:
        raise AdapterConfigError(
            "IA3Config.feedforward_modules is required: name the modules whose input is scaled "
            "(e.g. ['down_proj'] for Llama, ['c_proj'] for GPT-2's MLP), or [] for none")


def make_ia3_layer(module: nn.Module, adapter_name: str, config: IA3Config, module_path: str) -> IA3Layer:
    """Wrap ``module`` in an IA3 layer and create ``adapter_name`` on it."""
    fan_in_fan_out = linear_layout(module, module_path, "IA3")
    layer = IA3Layer(module, module_path, config.is_feedforward(module_path), fan_in_fan_out)
    add_ia3_adapter(layer, adapter_name, config, module_path)
    return layer


def add_ia3_adapter(layer: IA3Layer, adapter_name: str, config: IA3Config, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = IA3Layer
make_layer = make_ia3_layer
add_adapter = add_ia3_adapter
