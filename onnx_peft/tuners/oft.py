"""OFT layer for nn.Linear: rotate the input block by block, then run the frozen Linear.

::

    x [.., in] ──► reshape [.., n, b] ──► @ R_k (per block) ──► reshape [.., in] ──► base_layer ──► y
                                           R_k = cayley(skew(oft_R[k]))   [b, b]

``y = (x R) W^T + bias``; merged, ``W' = W R^T``. All rotation math comes from
:mod:`onnx_peft.methods.oft` (shared with the ONNX passes); this file holds the parameters.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..methods.base import method_for
from ..methods.oft import OFTConfig, coft_project, neumann_terms, oft_layout, rotation_blocks
from .base import AdapterLayer, linear_layout


class OFTRotation(nn.Module):
    """One adapter's trained numbers: ``weight [rows, b(b-1)/2]`` (``rows = n_blocks``, or 1
    with ``block_share``), PEFT's ``oft_R.<adapter>.weight``."""

    def __init__(self, rows: int, block_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, block_size * (block_size - 1) // 2))


class Linear(AdapterLayer):
    """OFT on ``nn.Linear`` (weight ``[out, in]``). x: ``[.., in]`` -> ``[.., out]``."""

    adapter_layer_names = ("oft_R",)
    other_param_names = ("oft_config", "oft_n_blocks")

    def __init__(self, base_layer: nn.Linear, module_path: str = "") -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.oft_R = nn.ModuleDict()
        self.oft_config: dict[str, OFTConfig] = {}
        self.oft_n_blocks: dict[str, int] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: OFTConfig) -> None:
        n_blocks, block_size = oft_layout(config, self.in_features)
        field, asked, got = ("r", config.r, n_blocks) if config.r else ("oft_block_size", config.oft_block_size,
                                                                         block_size)
        if asked != got:
            warnings.warn(f"{self.module_path}: OFT {field}={asked} does not divide in_features={self.in_features}; "
                          f"using {n_blocks} blocks of size {block_size}, as PEFT does", stacklevel=2)
        rotation = OFTRotation(1 if config.block_share else n_blocks, block_size)
        if config.init_weights is False:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        weight = self.base_layer.weight
        self.oft_R[adapter_name] = rotation.to(weight.device, weight.dtype if weight.dtype.is_floating_point else None)
        self.oft_config[adapter_name] = config
        self.oft_n_blocks[adapter_name] = n_blocks

    # -- math ------------------------------------------------------------------------------
    def rotation_blocks(self, adapter_name: str) -> torch.Tensor:
        """``R [n_blocks, b, b]``. COFT clips the stored parameters in place first, outside
        autograd, as PEFT does (so the clip is a projection step, not part of the gradient)."""
        config, param = self.oft_config[adapter_name], self.oft_R[adapter_name].weight
        if config.coft:
            with torch.no_grad():
                param.copy_(coft_project(param, config.eps))
        return rotation_blocks(param, self.oft_n_blocks[adapter_name], neumann_terms(config))

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W R^T`` through :meth:`OFTMethod.merged_weight`, the one definition of the merge."""
        self.rotation_blocks(adapter_name)  # COFT's in-place clip, as in forward
        parts = {"oft_R.weight": self.oft_R[adapter_name].weight.detach()}
        merged, _ = method_for("OFT").merged_weight(self.oft_config[adapter_name], self.module_path,
                                                    weight.to(parts["oft_R.weight"].dtype), None, parts, {})
        return merged

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Undo ``W' = W R^T``: per block ``W_k^T = R_k^-1 W'_k^T`` (a solve: the Neumann series
        is only nearly orthogonal, so ``R^T`` would not be its inverse)."""
        blocks = self.rotation_blocks(adapter_name).detach().to(torch.float32)
        n, b, _ = blocks.shape
        columns = weight.to(torch.float32).T.reshape(n, b, self.out_features)      # [n, b, out]
        return torch.linalg.solve(blocks, columns).reshape(self.in_features, self.out_features).T

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W R^T - W``: the additive change merging makes (OFT itself is multiplicative)."""
        weight = self.base_layer.weight
        return self.merged_weight(adapter_name, weight) - weight

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x [.., in]``: each active adapter rotates it in turn, ``x <- x R``; then the Linear."""
        dtype = x.dtype
        for name in self.active_adapters:
            if name not in self.oft_R:
                continue
            blocks = self.rotation_blocks(name)                                   # [n, b, b]
            n, b, _ = blocks.shape
            x = x.to(blocks.dtype)
            x = (x.reshape(*x.shape[:-1], n, 1, b) @ blocks).reshape(*x.shape)    # [.., n, 1, b] @ [n, b, b]
        return self.base_layer(x.to(dtype), *args, **kwargs)

    def __repr__(self) -> str:
        return f"oft.{type(self).__name__}({self.base_layer!r})"


def make_oft_layer(module: nn.Module, adapter_name: str, config: OFTConfig, module_path: str) -> Linear:
    """Wrap ``module`` (an nn.Linear) in the OFT layer and create ``adapter_name`` on it."""
    linear_layout(module, module_path, "OFT", conv1d=False,
                  hint="Exclude it with exclude_modules or pick other target_modules")
    layer = Linear(module, module_path)
    add_oft_adapter(layer, adapter_name, config, module_path)
    return layer


def add_oft_adapter(layer: Linear, adapter_name: str, config: OFTConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = Linear
make_layer = make_oft_layer
add_adapter = add_oft_adapter
