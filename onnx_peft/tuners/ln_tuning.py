"""LN Tuning layers: a trained copy of a LayerNorm / RMSNorm per adapter.

::

    x ──► ln_tuning_layers[active] (trained copy: w', b') ──► y      (adapter active)
    x ──► base_layer (frozen: w, b) ─────────────────────────► y      (adapters off / merged)

As in PEFT, one adapter runs at a time (a copy replaces the layer, copies do not add up).
Merging writes the copy's parameters into the base layer through
:class:`onnx_peft.methods.ln_tuning.LNTuningMethod` (the same definition MergeAdapters uses on
an ONNX graph) and keeps the base values to put back on unmerge.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterConfigError, OnnxPeftError
from ..methods.base import method_for
from ..methods.ln_tuning import BIAS, WEIGHT, LNTuningConfig
from .base import AdapterLayer


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer: LayerNorm, or a module with a 1-D ``weight`` (and at most a 1-D
    ``bias``) and nothing else trainable (RMSNorm, T5LayerNorm, LlamaRMSNorm, ...)."""
    if isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    params = dict(module.named_parameters(recurse=False))
    return bool(params) and not list(module.children()) and set(params) <= {"weight", "bias"} \
        and all(p.dim() == 1 for p in params.values()) and "norm" in type(module).__name__.lower()


class LNTuningLayer(AdapterLayer):
    """A norm layer with one trained copy per adapter. x: ``[..., hidden]`` -> ``[..., hidden]``."""

    adapter_layer_names = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.ln_tuning_layers = nn.ModuleDict()
        self.ln_tuning_config: dict[str, LNTuningConfig] = {}
        self._originals: dict[str, torch.Tensor | None] = {}  # base (w, b) while an adapter is merged

    def update_layer(self, adapter_name: str, config: LNTuningConfig) -> None:
        """The adapter starts as an exact copy of the base layer (a no-op until trained)."""
        self.ln_tuning_layers[adapter_name] = copy.deepcopy(self.base_layer)
        self.ln_tuning_config[adapter_name] = config

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.ln_tuning_config.pop(adapter_name, None)

    # -- forward ---------------------------------------------------------------------------
    def _active(self) -> str | None:
        names = [n for n in self.active_adapters if n in self.ln_tuning_layers]
        if len(names) > 1:
            raise OnnxPeftError(
                f"{self.module_path}: LN Tuning runs one adapter at a time (a trained copy replaces the "
                f"layer), but {names} are active; activate one with set_adapter")
        return names[0] if names else None

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``ln_tuning_layers[active](x)``: the trained copy instead of the base layer."""
        name = self._active()
        layer = self.base_layer if name is None else self.ln_tuning_layers[name]
        return layer(x, *args, **kwargs)

    # -- merging ---------------------------------------------------------------------------
    def _parts(self, adapter_name: str) -> dict[str, torch.Tensor]:
        copy_ = self.ln_tuning_layers[adapter_name]
        parts = {WEIGHT: copy_.weight.detach()}
        if getattr(copy_, "bias", None) is not None:
            parts[BIAS] = copy_.bias.detach()
        return parts

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Write the adapter's trained parameters into the base layer (one adapter at a time)."""
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters)
                 if n in self.ln_tuning_layers and n not in self.merged_adapters]
        if not names:
            return
        if len(names) > 1 or self.merged_adapters:
            raise OnnxPeftError(
                f"{self.module_path}: LN Tuning merges one adapter at a time ({names + self.merged_adapters} "
                "asked); unmerge first or merge one adapter")
        name = names[0]
        base = self.base_layer
        bias = getattr(base, "bias", None)
        weight, new_bias = method_for("LN_TUNING").merged_weight(
            self.ln_tuning_config[name], self.module_path, base.weight.data,
            None if bias is None else bias.data, self._parts(name), {})
        finite = torch.isfinite(weight).all() and (new_bias is None or torch.isfinite(new_bias).all())
        if safe_merge and not finite:
            raise OnnxPeftError(f"merging adapter {name!r} gives NaN/inf weights; the adapter is broken")
        self._originals = {"weight": base.weight.data.clone(), "bias": None if bias is None else bias.data.clone()}
        base.weight.data = weight.clone().to(base.weight.dtype)
        if bias is not None and new_bias is not None:
            base.bias.data = new_bias.clone().to(bias.dtype)
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        base = self.base_layer
        base.weight.data = self._originals["weight"]
        if self._originals["bias"] is not None:
            base.bias.data = self._originals["bias"]
        self._originals = {}
        self.merged_adapters.clear()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``w' - w`` (``[hidden]``): how far the trained scale moved from the base one."""
        return self.ln_tuning_layers[adapter_name].weight.detach() - self.base_layer.weight.data

    def __repr__(self) -> str:
        return f"ln_tuning.{type(self).__name__}({self.base_layer!r})"


def make_ln_tuning_layer(module: nn.Module, adapter_name: str, config: LNTuningConfig,
                         module_path: str) -> LNTuningLayer:
    """Wrap the norm ``module`` and create ``adapter_name`` on it; other modules raise."""
    if not _is_norm(module):
        raise AdapterConfigError(
            f"module {module_path} ({type(module).__name__}) cannot take an LN Tuning adapter; supported: "
            "nn.LayerNorm, nn.RMSNorm and RMSNorm-style layers (a 1-D weight, optional 1-D bias). Target the "
            "norm layers by name, e.g. ['input_layernorm', 'post_attention_layernorm', 'norm'] for Llama")
    layer = LNTuningLayer(module, module_path)
    add_ln_tuning_adapter(layer, adapter_name, config, module_path)
    return layer


def add_ln_tuning_adapter(layer: LNTuningLayer, adapter_name: str, config: LNTuningConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = LNTuningLayer
make_layer = make_ln_tuning_layer
add_adapter = add_ln_tuning_adapter


# PEFT's defaults when target_modules is not given (peft.utils.constants, by model_type)
DEFAULT_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
}


def default_targets(model: nn.Module, config: LNTuningConfig) -> list[str]:
    """PEFT's norms for the model's type; other models must name theirs."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise AdapterConfigError(f"LNTuningConfig.target_modules is required for model type {model_type!r} "
                                 f"(defaults exist for {sorted(DEFAULT_TARGETS)})")
    return list(DEFAULT_TARGETS[model_type])
