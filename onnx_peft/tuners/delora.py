"""DeLoRA layers for nn.Linear.

::

    x ──► base_layer (frozen W, b) ─────────────────────────────────────┐
    │                                                                   (+) ──► y
    └─► dropout ─► * w_norm [in] ─► A^T [in, r] ─► * s [r] ─► B^T [r, out] ┘
        s = lambda / r / (||A_i|| ||B^i||)

``w_norm`` (the base weight's column norms) is fixed when the adapter is created and saved
with it, as PEFT does, so an adapter means the same thing after the base weight is merged.
Merging adds ``B diag(s) A diag(w_norm)`` through :class:`onnx_peft.methods.delora.DeloraMethod`,
the math the ONNX passes use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..methods.base import method_for
from ..methods.delora import DeloraConfig, delora_scales
from .base import AdapterLayer, linear_layout


class NormBuffers(nn.Module):
    """Per-adapter frozen vectors as buffers (``delora_w_norm.<adapter>`` in the state dict):
    saved and moved with the model, never trained."""

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def keys(self):
        return self._buffers.keys()


class DeloraLayer(AdapterLayer):
    """DeLoRA on ``nn.Linear`` (weight ``[out, in]``). x: ``[..., in]`` -> ``[..., out]``;
    per adapter ``delora_A [r, in]``, ``delora_B [out, r]``, ``delora_lambda [1]`` (trained) and
    ``delora_w_norm [in]`` (a buffer)."""

    adapter_layer_names = ("delora_A", "delora_B", "delora_lambda")
    other_param_names = ("r", "delora_dropout", "delora_w_norm", "delora_config")

    def __init__(self, base_layer: nn.Module, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.out_features, self.in_features = base_layer.weight.shape
        self.r: dict[str, int] = {}
        self.delora_A = nn.ParameterDict()
        self.delora_B = nn.ParameterDict()
        self.delora_lambda = nn.ParameterDict()
        self.delora_w_norm = NormBuffers()
        self.delora_dropout = nn.ModuleDict()
        self.delora_config: dict[str, DeloraConfig] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: DeloraConfig) -> None:
        """PEFT's init: A Kaiming-uniform, B zeros (both Kaiming with ``init_weights=False``), so a
        fresh adapter is a no-op; lambda at the config's bound; ``w_norm`` from the base weight now."""
        r = config.rank_for(self.module_path)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        a, b = torch.empty(r, self.in_features), torch.empty(self.out_features, r)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.r[adapter_name] = r
        self.delora_config[adapter_name] = config
        self.delora_A[adapter_name] = nn.Parameter(a.to(weight.device, dtype))
        self.delora_B[adapter_name] = nn.Parameter(b.to(weight.device, dtype))
        self.delora_lambda[adapter_name] = nn.Parameter(torch.full((1,), config.lambda_for(self.module_path),
                                                                   device=weight.device, dtype=dtype))
        self.delora_w_norm[adapter_name] = self.base_weight().detach().to(dtype).norm(dim=0)
        dropout = config.module_dropout
        self.delora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def _parts(self, adapter_name: str, detach: bool = False) -> dict[str, torch.Tensor]:
        parts = {"delora_A": self.delora_A[adapter_name], "delora_B": self.delora_B[adapter_name],
                 "delora_lambda": self.delora_lambda[adapter_name], "delora_w_norm": self.delora_w_norm[adapter_name]}
        return {k: v.detach() for k, v in parts.items()} if detach else parts

    # -- merging (through the method's math) -------------------------------------------------
    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + B diag(s) A diag(w_norm)`` (``W [out, in]``)."""
        parts = {k: v.to(weight.dtype) for k, v in self._parts(adapter_name, detach=True).items()}
        merged, _ = method_for("DELORA").merged_weight(self.delora_config[adapter_name], self.module_path,
                                                       weight, None, parts, {})
        return merged

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.base_weight().detach()
        return self.merged_weight(adapter_name, torch.zeros_like(weight))

    # -- forward ---------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + sum over active adapters of ((drop(x) * w_norm) A^T * s) B^T``."""
        result = self.base_layer(x, *args, **kwargs)
        previous_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.delora_A:
                continue
            a, b, lam = self.delora_A[name], self.delora_B[name], self.delora_lambda[name]
            h = self.delora_dropout[name](x.to(a.dtype)) * self.delora_w_norm[name]   # [.., in]
            low = (h @ a.T) * delora_scales(a, b, lam, self.r[name])                  # [.., r]
            result = result + low @ b.T                                               # [.., out]
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return f"delora.{type(self).__name__}({self.base_layer!r})"


def make_delora_layer(module: nn.Module, adapter_name: str, config: DeloraConfig, module_path: str) -> DeloraLayer:
    """Wrap ``module`` (an nn.Linear; anything else raises naming it) and create ``adapter_name``."""
    linear_layout(module, module_path, "DeLoRA", conv1d=False)
    layer = DeloraLayer(module, module_path)
    add_delora_adapter(layer, adapter_name, config, module_path)
    return layer


def add_delora_adapter(layer: DeloraLayer, adapter_name: str, config: DeloraConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = DeloraLayer
make_layer = make_delora_layer
add_adapter = add_delora_adapter
