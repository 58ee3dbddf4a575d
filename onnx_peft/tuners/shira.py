"""SHiRA layer for nn.Linear: a few trained entries of the weight at masked positions.

::

    x ──► base_layer (frozen W, b) ──────────────────────────────┐
    │                                                             (+) ──► y
    └──► x delta^T,  delta [out, in] = 0 except                ──┘
         delta[rows[k], cols[k]] = shira_weight[k],  k < n = r (in + out)

The positions (``shira_indices [2, n]``, int32) are a buffer saved with the adapter, as PEFT
saves them; a new adapter draws them like PEFT's ``random_mask`` (``torch.randperm`` seeded
with ``random_seed``, the first ``n`` in row-major order). Merging goes through
:class:`onnx_peft.methods.shira.ShiraMethod`, the math the ONNX passes use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterConfigError
from ..methods.base import method_for
from ..methods.shira import INDICES, WEIGHT, ShiraConfig
from .base import AdapterLayer, linear_layout


class IndexBuffers(nn.Module):
    """Per-adapter integer buffers (``shira_indices.<adapter>`` in the state dict): saved and
    moved with the model, never trained."""

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


def random_mask_indices(out_features: int, in_features: int, n: int, seed: int | None) -> torch.Tensor:
    """PEFT's ``random_mask`` as positions: the first ``n`` entries of ``randperm(out * in)``
    (a fresh generator keeps torch's default seed when ``seed`` is None, as PEFT's does),
    sorted into row-major order -> ``[2, n]`` int32 ``(rows; cols)``."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:n].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


class ShiraLayer(AdapterLayer):
    """SHiRA on ``nn.Linear``. x: ``[..., in]`` -> ``[..., out]``; ``shira_weight[name]``: ``[n]``,
    ``shira_indices[name]``: ``[2, n]``."""

    adapter_layer_names = (WEIGHT,)
    other_param_names = ("shira_config", INDICES)

    def __init__(self, base_layer: nn.Linear, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.out_features, self.in_features = base_layer.weight.shape
        self.shira_weight = nn.ParameterDict()
        self.shira_indices = IndexBuffers()
        self.shira_config: dict[str, ShiraConfig] = {}
        self._checked: set[str] = set()  # adapters whose positions were checked once

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: ShiraConfig) -> None:
        n = config.r * (self.in_features + self.out_features)
        if n > self.in_features * self.out_features:
            raise AdapterConfigError(
                f"ShiraConfig.r={config.r} gives {n} SHiRA weights on {self.module_path}, more than its "
                f"{self.out_features}x{self.in_features} weights; lower r")
        if config.mask_type == "random":
            indices = random_mask_indices(self.out_features, self.in_features, n, config.random_seed)
        else:  # positions come from the checkpoint; -1 marks them as not loaded yet
            indices = torch.full((2, n), -1, dtype=torch.int32)
        weight = self.base_layer.weight
        values = torch.zeros(n) if config.init_weights else torch.randn(n)
        dtype = weight.dtype if weight.dtype.is_floating_point else values.dtype
        self.shira_weight[adapter_name] = nn.Parameter(values.to(weight.device, dtype))
        self.shira_indices[adapter_name] = indices.to(weight.device)
        self.shira_config[adapter_name] = config
        self._checked.discard(adapter_name)

    # -- math ------------------------------------------------------------------------------
    def parts(self, adapter_name: str) -> dict[str, torch.Tensor]:
        indices = self.shira_indices[adapter_name]
        if adapter_name not in self._checked:
            if bool((indices < 0).any()):
                raise AdapterConfigError(
                    f"SHiRA adapter {adapter_name!r} on {self.module_path} has mask_type="
                    f"{self.shira_config[adapter_name].mask_type!r}, which onnx-peft cannot draw; load its "
                    "positions from a checkpoint (PeftModel.from_pretrained) or use mask_type='random'")
            self._checked.add(adapter_name)
        return {WEIGHT: self.shira_weight[adapter_name], INDICES: indices}

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``delta [out, in]``, differentiable in ``shira_weight``."""
        return method_for("SHIRA").delta_weight(self.shira_config[adapter_name], self.module_path,
                                                self.out_features, self.in_features, self.parts(adapter_name))

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + delta`` through the method's math."""
        parts = {k: v.detach() for k, v in self.parts(adapter_name).items()}
        merged, _ = method_for("SHIRA").merged_weight(self.shira_config[adapter_name], self.module_path,
                                                      weight, None, parts, {})
        return merged

    # -- forward ---------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + sum over active adapters of x delta^T``."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.shira_weight:
                delta = self.get_delta_weight(name)
                result = result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"shira.{type(self).__name__}({self.base_layer!r})"


def make_shira_layer(module: nn.Module, adapter_name: str, config: ShiraConfig, module_path: str) -> ShiraLayer:
    """Wrap ``module`` (an nn.Linear) in a SHiRA layer and create ``adapter_name`` on it."""
    linear_layout(module, module_path, "SHiRA", conv1d=False)
    layer = ShiraLayer(module, module_path)
    add_shira_adapter(layer, adapter_name, config, module_path)
    return layer


def add_shira_adapter(layer: ShiraLayer, adapter_name: str, config: ShiraConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = ShiraLayer
make_layer = make_shira_layer
add_adapter = add_shira_adapter
