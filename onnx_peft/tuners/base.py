"""AdapterLayer: wrap a frozen base module by composition and hold named adapters.

The verbs shared by every method live here (activate, delete, merge, unmerge, and the
``forward`` template); a method provides ``update_layer`` (create an adapter),
``get_delta_weight`` (through onnx_peft.methods) and ``adapted_forward``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

from ..errors import AdapterConfigError, OnnxPeftError

LINEAR_TYPES = "nn.Linear, transformers Conv1D"


def linear_layout(module: nn.Module, module_path: str, method_name: str, supported: str | None = None, *,
                  conv1d: bool = True, hint: str = "") -> bool:
    """``fan_in_fan_out`` of a linear ``module``: False for ``nn.Linear`` (weight ``[out, in]``),
    True for transformers' ``Conv1D`` (weight ``[in, out]``, recognised by its ``nf``). The layout
    is a property of the module type, not of the config (PEFT overrides a wrong value too).

    Any other module raises AdapterConfigError naming ``module_path``, ``method_name`` and the
    ``supported`` types (default: nn.Linear, plus Conv1D unless ``conv1d=False`` for methods
    that take only nn.Linear), then ``hint`` if given. ``method_name`` takes "an" when it starts
    with a vowel (an IA3, a LoRA).
    """
    if isinstance(module, nn.Linear):
        return False
    if conv1d and type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return True
    if supported is None:
        supported = LINEAR_TYPES if conv1d else "nn.Linear"
    article = "an" if method_name[:1] in "AEIOU" else "a"
    raise AdapterConfigError(
        f"module {module_path} ({type(module).__name__}) cannot take {article} {method_name} adapter; "
        f"supported: {supported}" + (f". {hint}" if hint else ""))


class AdapterLayer(nn.Module, metaclass=abc.ABCMeta):
    """Base of every tuner layer: ``self.base_layer`` is the wrapped (frozen) module."""

    # Names of the ModuleDict/ParameterDict attributes that hold per-adapter tensors.
    adapter_layer_names: tuple[str, ...] = ()
    # Names of plain dict attributes holding per-adapter hyper-parameters.
    other_param_names: tuple[str, ...] = ()
    # Keyword arguments of PeftModel.forward/generate this layer reads (Poly's task_ids); they
    # are in ``self.call_args`` for the duration of the call (see :func:`layer_call_args`).
    call_kwargs: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.call_args: dict[str, Any] = {}

    # -- bookkeeping -----------------------------------------------------------------------
    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for key in getattr(self, attr).keys():
                if key not in names:
                    names.append(key)
        return names

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        """Activate ``adapter_names``; only active adapters' tensors get gradients."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for key, holder in container.items():
                holder.requires_grad_(trainable and key in names)
        self.active_adapters = [n for n in names if n in self.adapter_names()]

    def delete_adapter(self, adapter_name: str) -> None:
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    # -- the base weight, float even on a 4/8-bit base --------------------------------------
    @property
    def quantized(self) -> bool:
        """True when the base is a 4/8-bit linear (ours or bitsandbytes'): its weight is packed."""
        from ..quant.layers import is_quantized_linear

        return is_quantized_linear(self.base_layer)

    def base_weight(self) -> torch.Tensor:
        """``W`` in the base's own layout as the float tensor the layer multiplies by (the stored
        weight, or the dequantized one of a quantized base)."""
        if self.quantized:
            from ..quant.layers import dequantized_weight

            return dequantized_weight(self.base_layer)
        return self.base_layer.weight

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Store a new base weight: in place, or requantized into the base's own 4/8-bit format."""
        if self.quantized:
            from ..quant.layers import requantize_into

            requantize_into(self.base_layer, weight)
        else:
            self.base_layer.weight.data = weight.to(self.base_layer.weight.dtype)

    # -- merging ---------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weight (W += delta) so inference costs nothing extra; a
        quantized base is dequantized, merged and requantized (the rounding error stays)."""
        for name in adapter_names if adapter_names is not None else list(self.active_adapters):
            if name not in self.adapter_names() or name in self.merged_adapters:
                continue
            new_weight = self.merged_weight(name, self.base_weight().data)
            if safe_merge and not torch.isfinite(new_weight).all():
                raise OnnxPeftError(f"merging adapter {name!r} gives NaN/inf weights; the adapter is broken")
            self.set_base_weight(new_weight)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.set_base_weight(self.unmerged_weight(name, self.base_weight().data))

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.get_delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.get_delta_weight(adapter_name).to(weight.dtype)

    @abc.abstractmethod
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's weight update, in the base weight's layout (from onnx_peft.methods)."""

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The template every method shares: with adapters disabled, unmerge them (if merged)
        and run the base layer; when merged, the base layer already holds them; otherwise
        :meth:`adapted_forward`."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    @abc.abstractmethod
    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The unmerged forward with the active adapters (each method's math)."""


@contextlib.contextmanager
def layer_call_args(model: nn.Module, kwargs: MutableMapping[str, Any]) -> Iterator[None]:
    """Hand a PeftModel.forward/generate call's keyword arguments meant for adapter layers
    (``AdapterLayer.call_kwargs``: Poly's ``task_ids [batch]``) to those layers for the duration
    of the call, popping them from ``kwargs`` so that the wrapped model never sees them (PEFT
    does the same with forward pre-hooks). A model without such layers is left as it is."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer) and m.call_kwargs]
    taken = {name: kwargs.pop(name) for layer in layers for name in layer.call_kwargs if name in kwargs}
    for layer in layers:
        layer.call_args = {k: v for k, v in taken.items() if k in layer.call_kwargs}
    try:
        yield
    finally:
        for layer in layers:
            layer.call_args = {}


class ModulesToSaveWrapper(nn.Module):
    """A fully trained copy of a module per adapter (e.g. a classification head).

    ``original_module`` stays frozen; ``modules_to_save[adapter]`` is used while that
    adapter is active, the original otherwise.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def add(self, adapter_name: str) -> None:
        import copy

        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
            self.modules_to_save[adapter_name].requires_grad_(True)

    def set_adapter(self, adapter_names: str | list[str], trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        active = [n for n in names if n in self.modules_to_save]
        if len(active) > 1:
            raise OnnxPeftError(
                f"adapters {active} each have their own copy of a module to save; activate only one"
            )
        for key, module in self.modules_to_save.items():
            module.requires_grad_(trainable and key in active)
        self.active_adapter = active[0] if active else None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @property
    def weight(self) -> torch.Tensor:
        return self.current().weight

    def current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
