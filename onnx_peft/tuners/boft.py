"""BOFT layer for nn.Linear: rotate the input by a butterfly of orthogonal blocks, scale the output.

::

    x [.., in] ──► @ B [in, in] ──► base_layer (frozen W, bias) ──► (y - bias) * s + bias ──► y
                   B = M_{m-1} ... M_0,  M_i = P_i diag(cayley(boft_R[i])) P_i^T

Merged, ``W' = s * (W B^T)``. All rotation math comes from :mod:`onnx_peft.methods.boft`
(shared with the ONNX passes); this file holds the parameters and the training-time dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from ..methods.base import method_for
from ..methods.boft import BOFTConfig, boft_blocks, boft_layout, butterfly_matrix
from .base import AdapterLayer, linear_layout


def block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's multiplicative dropout on rotations ``[m, D, b, b]``: in one random factor,
    ``int(p * D)`` random blocks become the identity (training only)."""
    m, d, b, _ = blocks.shape
    dropped = torch.zeros(m, d, 1, 1, device=blocks.device, dtype=blocks.dtype)
    chosen = torch.randperm(d, device=blocks.device)[: int(p * d)]
    dropped[int(torch.randint(0, m, (1,)))][chosen] = 1
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return (1 - dropped) * blocks + dropped * eye


class Linear(AdapterLayer):
    """BOFT on ``nn.Linear`` (weight ``[out, in]``). x: ``[.., in]`` -> ``[.., out]``.

    Per adapter: ``boft_R [m, D, b, b]`` (zeros: the identity rotation) and ``boft_s [out, 1]``
    (ones), PEFT's names and shapes.
    """

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_config",)

    def __init__(self, base_layer: nn.Linear, module_path: str = "") -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_config: dict[str, BOFTConfig] = {}

    def update_layer(self, adapter_name: str, config: BOFTConfig) -> None:
        block_num, block_size = boft_layout(config, self.in_features, self.module_path)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        R = torch.zeros(config.boft_n_butterfly_factor, block_num, block_size, block_size, device=weight.device,
                        dtype=dtype)
        s = torch.ones(self.out_features, 1, device=weight.device, dtype=dtype)
        if config.init_weights is False:
            nn.init.normal_(R, mean=0.0, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(R)
        self.boft_s[adapter_name] = nn.Parameter(s)
        self.boft_config[adapter_name] = config

    # -- math ------------------------------------------------------------------------------
    def butterfly(self, adapter_name: str) -> torch.Tensor:
        """``B [in, in]``; in training, with boft_dropout, some blocks are the identity."""
        blocks = boft_blocks(self.boft_R[adapter_name])                      # [m, D, b, b]
        p = float(self.boft_config[adapter_name].boft_dropout)
        if self.training and p > 0:
            blocks = block_dropout(blocks, p)
        return butterfly_matrix(blocks)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``s * (W B^T)`` through :meth:`BOFTMethod.merged_weight`, the one definition of the merge."""
        parts = {"boft_R": self.boft_R[adapter_name].detach(), "boft_s": self.boft_s[adapter_name].detach()}
        merged, _ = method_for("BOFT").merged_weight(self.boft_config[adapter_name], self.module_path,
                                                     weight.to(parts["boft_R"].dtype), None, parts, {})
        return merged

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Undo ``W' = s * (W B^T)``: ``W = (W' / s) B`` (B is orthogonal: an exact Cayley product)."""
        with torch.no_grad():
            butterfly = butterfly_matrix(boft_blocks(self.boft_R[adapter_name]))
            return (weight.to(butterfly.dtype) / self.boft_s[adapter_name]) @ butterfly

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * (W B^T) - W``: the additive change merging makes (BOFT itself is multiplicative)."""
        weight = self.base_layer.weight
        return self.merged_weight(adapter_name, weight) - weight

    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = (Linear(x B) - bias) * s + bias``; several active adapters compose their
        rotations (``B = B_2 B_1``) and multiply their scales, as in PEFT."""
        names = [n for n in self.active_adapters if n in self.boft_R]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        dtype = x.dtype
        rotation, scale = None, None
        for name in names:
            butterfly, s = self.butterfly(name), self.boft_s[name].reshape(-1)
            rotation = butterfly if rotation is None else butterfly @ rotation
            scale = s if scale is None else s * scale
        result = self.base_layer((x.to(rotation.dtype) @ rotation).to(dtype), *args, **kwargs)
        bias = self.base_layer.bias
        if bias is None:
            return (result * scale).to(dtype)
        return ((result - bias) * scale + bias).to(dtype)

    def __repr__(self) -> str:
        return f"boft.{type(self).__name__}({self.base_layer!r})"


def make_boft_layer(module: nn.Module, adapter_name: str, config: BOFTConfig, module_path: str) -> Linear:
    """Wrap ``module`` (an nn.Linear) in the BOFT layer and create ``adapter_name`` on it."""
    linear_layout(module, module_path, "BOFT", conv1d=False,
                  hint="Exclude it with exclude_modules or pick other target_modules")
    layer = Linear(module, module_path)
    add_boft_adapter(layer, adapter_name, config, module_path)
    return layer


def add_boft_adapter(layer: Linear, adapter_name: str, config: BOFTConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = Linear
make_layer = make_boft_layer
add_adapter = add_boft_adapter
