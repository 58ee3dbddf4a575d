"""OSF layer for nn.Linear: train the low singular part of W, orthogonally to the high part.

::

    W [out, in] = U_high S_high V_high  +  U_low_init S_low_init V_low_init     (SVD, split at k)
                  (frozen buffers)          (trainable copies: U_low, S_low, V_low)

    x ──► base_layer (W, b) ─────────────────────────────────────────┐
    │                                                                 (+) ──► y
    └──► (x B^T) A^T = x delta^T                                   ──┘
         A = [U_low S_low, -U_low_init S_low_init]  [out, 2r]
         B = [V_low; V_low_init]                    [2r, in]

so ``y = x (U_high S_high V_high + U_low S_low V_low)^T + b``. Backward, the gradients of
``U_low`` / ``V_low`` are projected away from the frozen subspace (PEFT's hooks)::

    dU <- dU - U_high (U_high^T dU)     (out > in; else the same as U_init (U_init^T dU))
    dV <- dV - (dV V_high^T) V_high     (in > out; else the same as (dV V_init^T) V_init)

The initial factors (and whichever high factor the projection needs) are non-persistent
buffers, as in PEFT: a checkpoint holds ``U_low``, ``S_low``, ``V_low`` only and the rest is
the base weight's SVD again. Merging goes through :class:`onnx_peft.methods.osf.OSFMethod`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import AdapterConfigError
from ..methods.base import method_for
from ..methods.osf import (
    PARAMS,
    S_INIT,
    S_LOW,
    U_INIT,
    U_LOW,
    V_INIT,
    V_LOW,
    OSFConfig,
    delta_weight,
    low_rank_factors,
    svd_split,
)
from .base import AdapterLayer, linear_layout

# PEFT's default targets when target_modules is None (else all linear layers)
_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: _PROJECTIONS for t in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2",
                                 "qwen3", "phi")},
    **{t: ["c_attn", "c_proj"] for t in ("gpt2", "gpt_bigcode")},
    **{t: ["query_key_value", "dense_4h_to_h"] for t in ("bloom", "gpt_neox", "falcon")},
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
}


class FrozenBuffers(nn.Module):
    """Per-adapter non-persistent buffers (``<name>.<adapter>``): moved with the model, never
    saved (PEFT's ``BufferDict(persistent=False)``), never trained."""

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def keys(self):
        return self._buffers.keys()


def _projected(param: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``param`` as a view whose gradient passes through ``project`` on its way back to it."""
    if not (torch.is_grad_enabled() and param.requires_grad):
        return param
    view = param.view_as(param)
    view.register_hook(project)
    return view


class OSFLayer(AdapterLayer):
    """OSF on ``nn.Linear``. x: ``[..., in]`` -> ``[..., out]``; per adapter ``osf_svd_params[name]``
    holds ``U_low [out, r]``, ``S_low [r]``, ``V_low [r, in]`` (``r = min(out, in) - k``)."""

    adapter_layer_names = (PARAMS,)
    other_param_names = ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high",
                         "effective_rank", "osf_config")

    def __init__(self, base_layer: nn.Linear, module_path: str) -> None:
        super().__init__(base_layer)
        self.module_path = module_path
        self.out_features, self.in_features = base_layer.weight.shape
        self.osf_svd_params = nn.ModuleDict()
        self._osf_U_low_init, self._osf_S_low_init, self._osf_V_low_init = (FrozenBuffers() for _ in range(3))
        self._osf_U_high, self._osf_V_high = FrozenBuffers(), FrozenBuffers()
        self.effective_rank: dict[str, int] = {}
        self.osf_config: dict[str, OSFConfig] = {}

    # -- creation --------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: OSFConfig) -> None:
        min_dim = min(self.out_features, self.in_features)
        k = config.effective_rank_for(self.module_path, min_dim)
        if k <= 0:
            raise AdapterConfigError(
                f"OSFConfig.effective_rank gives a frozen rank of {k} on {self.module_path} ({self.out_features}x"
                f"{self.in_features}); it must keep at least one singular direction: raise effective_rank")
        svd = svd_split(self.base_weight().data, k)
        self._osf_U_low_init[adapter_name] = svd["U_low"].clone()
        self._osf_S_low_init[adapter_name] = svd["S_low"].clone()
        self._osf_V_low_init[adapter_name] = svd["V_low"].clone()
        # a square U (out <= in) or V (out >= in) has its complement in the init factors
        if self.out_features > self.in_features:
            self._osf_U_high[adapter_name] = svd["U_high"].clone()
        if self.out_features < self.in_features:
            self._osf_V_high[adapter_name] = svd["V_high"].clone()
        factors = {"U_low": svd["U_low"], "S_low": svd["S_low"], "V_low": svd["V_low"]}
        if config.init_weights is False:  # not a no-op (tests): random factors, SVD init kept
            factors = {name: torch.randn_like(value) for name, value in factors.items()}
        self.osf_svd_params[adapter_name] = nn.ParameterDict(
            {name: nn.Parameter(value.clone()) for name, value in factors.items()})
        self.effective_rank[adapter_name] = k
        self.osf_config[adapter_name] = config

    # -- gradient projection ---------------------------------------------------------------
    def _project_u(self, adapter_name: str, grad: torch.Tensor) -> torch.Tensor:
        """``dU [out, r]`` orthogonal to ``U_high``."""
        if adapter_name in self._osf_U_high:
            high = self._osf_U_high[adapter_name]
            return grad - high @ (high.transpose(0, 1) @ grad)
        init = self._osf_U_low_init[adapter_name]
        return init @ (init.transpose(0, 1) @ grad)

    def _project_v(self, adapter_name: str, grad: torch.Tensor) -> torch.Tensor:
        """``dV [r, in]`` orthogonal to ``V_high``."""
        if adapter_name in self._osf_V_high:
            high = self._osf_V_high[adapter_name]
            return grad - (grad @ high.transpose(0, 1)) @ high
        init = self._osf_V_low_init[adapter_name]
        return (grad @ init.transpose(0, 1)) @ init

    # -- math ------------------------------------------------------------------------------
    def parts(self, adapter_name: str, project: bool = False) -> dict[str, torch.Tensor]:
        """The method's ``parts`` of ``adapter_name``: trained factors (their gradients projected
        with ``project``) and the frozen initial ones."""
        params = self.osf_svd_params[adapter_name]
        u, s, v = params["U_low"], params["S_low"], params["V_low"]
        if project:
            u = _projected(u, lambda g: self._project_u(adapter_name, g))
            v = _projected(v, lambda g: self._project_v(adapter_name, g))
        return {U_LOW: u, S_LOW: s, V_LOW: v, U_INIT: self._osf_U_low_init[adapter_name],
                S_INIT: self._osf_S_low_init[adapter_name], V_INIT: self._osf_V_low_init[adapter_name]}

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``delta [out, in] = U_low S_low V_low - U_low_init S_low_init V_low_init``."""
        return delta_weight(self.parts(adapter_name))

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W + delta`` through the method's math (the frozen initial factors of the weight the
        adapter was created on, so it merges onto any weight, as PEFT's)."""
        parts = {k: v.detach() for k, v in self.parts(adapter_name).items()}
        merged, _ = method_for("OSF").merged_weight(self.osf_config[adapter_name], self.module_path,
                                                    weight, None, parts, {})
        return merged

    # -- forward ---------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + (x B^T) A^T`` for every active adapter (PEFT's factored delta)."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.osf_svd_params:
                a, b = low_rank_factors(self.parts(name, project=True))
                low = x.to(a.dtype) @ b.transpose(0, 1)                   # [..., 2r]
                result = result + (low @ a.transpose(0, 1)).to(result.dtype)  # [..., out]
        return result

    def __repr__(self) -> str:
        return f"osf.{type(self).__name__}({self.base_layer!r})"


def default_targets(model: nn.Module, config: OSFConfig) -> list[str] | str:
    """PEFT's defaults: the model type's projections, else every linear layer."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return list(DEFAULT_TARGETS.get(model_type, ())) or "all-linear"


def make_osf_layer(module: nn.Module, adapter_name: str, config: OSFConfig, module_path: str) -> OSFLayer:
    """Wrap ``module`` (an nn.Linear) in an OSF layer and create ``adapter_name`` on it."""
    linear_layout(module, module_path, "OSF", conv1d=False)
    layer = OSFLayer(module, module_path)
    add_osf_adapter(layer, adapter_name, config, module_path)
    return layer


def add_osf_adapter(layer: OSFLayer, adapter_name: str, config: OSFConfig, module_path: str) -> None:
    layer.update_layer(adapter_name, config)


# The tuner seam (see onnx_peft.methods.base): what PeftModel asks every method's torch module.
Layer = OSFLayer
make_layer = make_osf_layer
add_adapter = add_osf_adapter
