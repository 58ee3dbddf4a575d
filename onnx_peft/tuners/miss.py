"""MiSS (and Bone) layers for nn.Linear.

Balance / mini mode (the block is W-independent)::

    x ──► base_layer (frozen W) ────────────────────────────────┐
    │                                                            (+) ──► y
    └──► dropout ──► pad to a multiple of r ──► sum r-wide chunks [.., r] ──► @ B [r, out]

Bat mode (the update depends on W)::

    y = x (W + dW(W))^T + b,    dW_(a,c) = W_(a,c) B[a] + B[a]   (r x r blocks)

A Bone adapter lives in ``bone_block`` (PEFT's key for it), a MiSS one in ``miss_block``; the
math, from :mod:`onnx_peft.methods.miss`, is the same. When any active adapter of a layer is
in bat mode, all active adapters are folded into the weight in order (as merging does), so
the unmerged and merged layer agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import AdapterConfigError
from ..methods.base import method_for
from ..methods.miss import block_shape, full_block, layer_problem, miss_mode, shard_delta_t
from .base import AdapterLayer, linear_layout


class MissLayer(AdapterLayer):
    """MiSS/Bone on ``nn.Linear``: x ``[..., in]`` -> ``[..., out]``."""

    adapter_layer_names = ("miss_block", "bone_block")
    other_param_names = ("miss_config", "miss_dropout")

    def __init__(self, base_layer: nn.Linear, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.miss_block = nn.ParameterDict()
        self.bone_block = nn.ParameterDict()
        self.miss_dropout = nn.ModuleDict()
        self.miss_config: dict[str, AdapterConfig] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: AdapterConfig) -> None:
        """Create the block: zeros (a no-op), or random with ``init_weights=False`` as in PEFT."""
        problem = layer_problem(config, self.in_features, self.out_features)
        if problem is not None:
            raise AdapterConfigError(f"module {self.module_path}: {type(config).__name__}: {problem}")
        block = torch.zeros(block_shape(config, self.in_features, self.out_features))
        if miss_mode(config) == "balance" and not config.init_weights:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else block.dtype
        self._blocks(config)[adapter_name] = nn.Parameter(block.to(weight.device, dtype))
        p = float(getattr(config, "miss_dropout", 0.0))
        self.miss_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.miss_config[adapter_name] = config

    def _blocks(self, config: AdapterConfig) -> nn.ParameterDict:
        return getattr(self, method_for(config).block)

    def block(self, adapter_name: str) -> nn.Parameter:
        return self._blocks(self.miss_config[adapter_name])[adapter_name]

    # -- math ------------------------------------------------------------------------------
    def updated(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W'`` of one adapter, through the method's math (numpy and torch share it)."""
        config, block = self.miss_config[adapter_name], self.block(adapter_name)
        method = method_for(config)
        merged, _ = method.merged_weight(config, self.module_path, weight.to(block.dtype), None,
                                         {method.block: block}, {})
        return merged

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.updated(adapter_name, weight)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """balance/mini: ``W' - dW``; bat: ``W_(a,c) = (W'_(a,c) - B[a]) (I + B[a])^-1`` per block."""
        config, block = self.miss_config[adapter_name], self.block(adapter_name).detach()
        mode = miss_mode(config)
        weight = weight.to(block.dtype)
        if mode != "bat":
            return weight - shard_delta_t(block, self.in_features, self.out_features, mode).T
        n_out, r = block.shape[0], block.shape[-1]
        tiles = weight.reshape(n_out, r, self.in_features // r, r).swapaxes(1, 2)     # [a, c, r, r]
        eye = torch.eye(r, device=block.device, dtype=torch.float32)
        inverse = torch.linalg.inv(eye + block.float()).to(block.dtype)[:, None]       # [a, 1, r, r]
        restored = (tiles - block[:, None]) @ inverse
        return restored.swapaxes(1, 2).reshape(self.out_features, self.in_features)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.base_layer.weight
        return self.updated(adapter_name, weight) - weight.to(self.block(adapter_name).dtype)

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """balance/mini: ``y = base(x) + sum_k chunk_k(dropout(x)) @ B`` (x padded to a multiple
        of r, cut in r-wide chunks); bat: ``y = x (W + dW(W))^T + b``, adapters folded in order."""
        names = [n for n in self.active_adapters if n in self.miss_config]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if any(miss_mode(self.miss_config[n]) == "bat" for n in names):
            weight = self.base_layer.weight
            for name in names:                   # W' = W + dW(W), adapter after adapter
                weight = self.updated(name, weight)
            bias = self.bias.to(weight.dtype) if self.bias is not None else None
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            block = self.block(name)
            full = full_block(block, self.out_features, miss_mode(self.miss_config[name]))  # [r, out]
            r = full.shape[0]
            h = self.miss_dropout[name](x.to(block.dtype))
            h = F.pad(h, (0, -h.shape[-1] % r))                                          # [.., r*k]
            chunks = h.reshape(*h.shape[:-1], -1, r).sum(-2)                             # [.., r]
            result = result + (chunks @ full).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"miss.{type(self).__name__}({self.base_layer!r})"


def make_miss_layer(module: nn.Module, adapter_name: str, config: AdapterConfig, module_path: str) -> MissLayer:
    """Wrap ``module`` in a MiSS layer and create ``adapter_name`` on it."""
    linear_layout(module, module_path, config.peft_type, conv1d=False)
    layer = MissLayer(module, module_path)
    add_miss_adapter(layer, adapter_name, config, module_path)
    return layer


def add_miss_adapter(layer: MissLayer, adapter_name: str, config: AdapterConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = MissLayer
make_layer = make_miss_layer
add_adapter = add_miss_adapter
