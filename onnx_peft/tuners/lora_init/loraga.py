"""LoRA-GA: initialize LoRA so that its first step follows the full fine-tuning gradient
(Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation", arXiv:2407.05000).

``preprocess_loraga(model, config, train_step)`` runs the user's ``train_step`` (forward and
backward over a few batches) with gradients on the target weights only, and keeps per target
Linear the mean gradient ``G [out, in]`` (summed gradient / number of backward calls). Then
``init_lora_weights="lora_ga"`` takes a randomized SVD of G (``torch.svd_lowrank``, q = 4r,
niter 4, as in PEFT; the same torch seed gives the same bases)::

    U [out, 2r], S [2r], Vh [2r, in]
    ArB2r: A = Vh[:r]          B = U[:, r:2r] diag(S[r:2r])   (A2rBr, ArBr, random: other splits)
    stable: B *= out^0.25 / sqrt(gamma);  weight_svd: B *= sigma_1(W) / S_B[0];  gd_scale: A, B /= s
    W_residual = W - s * B @ A

A Linear without a gradient (an adapter being loaded) gets the default LoRA init, as in PEFT.
The gradient cache file is PEFT's (``torch.save`` of ``{name}._peft_loraga_grad``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...errors import AdapterConfigError, DataError
from .corda import _targets

_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
GRAD_ATTR = "_peft_loraga_grad"  # PEFT's attribute name on the base Linear


@dataclasses.dataclass
class LoraGAConfig:
    """PEFT's LoraGAConfig: ``direction`` (how the gradient's singular vectors split between A
    and B), ``scale`` (how B is scaled), ``stable_gamma`` (gamma of the "stable" scale)."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16

    def __post_init__(self) -> None:
        if self.direction not in _DIRECTIONS:
            raise AdapterConfigError(f"LoraGAConfig.direction must be one of {_DIRECTIONS}, got {self.direction!r}")
        if self.scale not in _SCALES:
            raise AdapterConfigError(f"LoraGAConfig.scale must be one of {_SCALES}, got {self.scale!r}")


def _loraga_config(ga: Any) -> LoraGAConfig:
    """``LoraConfig.lora_ga_config`` (a dict or a LoraGAConfig) as a LoraGAConfig."""
    if ga is None:
        raise AdapterConfigError("LoRA-GA needs LoraConfig(init_lora_weights='lora_ga', lora_ga_config=LoraGAConfig(...))")
    return LoraGAConfig(**ga) if isinstance(ga, dict) else ga


@torch.no_grad()
def preprocess_loraga(model: nn.Module, lora_config: Any, train_step: Callable[[], None],
                      cache_file: str | None = None) -> None:
    """Attach the mean gradient ``[weight's shape]`` to every target Linear/Conv1D of ``model``
    (the base model, before get_peft_model); ``train_step()`` runs forward and backward passes."""
    from ...quant.layers import is_quantized_linear

    _loraga_config(getattr(lora_config, "lora_ga_config", None))
    if lora_config.target_modules is None:
        raise AdapterConfigError("preprocess_loraga needs LoraConfig.target_modules (the module names to adapt)")
    for name, module in model.named_modules():
        if name and is_quantized_linear(module):
            from ...targets import is_target

            if is_target(name, lora_config):
                raise AdapterConfigError(f"LoRA-GA needs full-precision gradients; module {name} is quantized: "
                                         "initialize on the float model")
    targets = dict(_targets(model, lora_config))
    if not targets:
        raise AdapterConfigError(
            f"preprocess_loraga found no nn.Linear/Conv1D module matching target_modules={lora_config.target_modules!r}")
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=next(model.parameters()).device, weights_only=True)
        for name, module in targets.items():
            if f"{name}.{GRAD_ATTR}" not in cache:
                raise DataError(f"LoRA-GA cache {cache_file} has no gradient for module {name}; delete it to rebuild")
            setattr(module, GRAD_ATTR, cache[f"{name}.{GRAD_ATTR}"])
        return
    _estimate_gradients(model, targets, train_step)
    if cache_file is not None:
        os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
        torch.save({f"{name}.{GRAD_ATTR}": getattr(module, GRAD_ATTR) for name, module in targets.items()
                    if hasattr(module, GRAD_ATTR)}, cache_file)


def _estimate_gradients(model: nn.Module, targets: dict[str, nn.Module], train_step: Callable[[], None]) -> None:
    """Run ``train_step`` in train mode with gradients on the target weights only; each target
    keeps its accumulated gradient divided by its number of backward calls."""
    training = model.training
    model.train()
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    counts = dict.fromkeys(targets, 0)
    for param in model.parameters():
        param.requires_grad = False
    handles = []
    for name, module in targets.items():
        module.weight.requires_grad = True
        module.weight.grad = None

        def count(module: nn.Module, grad_input: Any, grad_output: Any, name: str = name) -> None:
            counts[name] += 1

        handles.append(module.register_full_backward_hook(count))
    try:
        with torch.enable_grad():
            train_step()
    finally:
        for handle in handles:
            handle.remove()
        for name, param in model.named_parameters():
            param.requires_grad = requires_grad.get(name, param.requires_grad)
        model.train(training)
    for name, module in targets.items():
        if counts[name] > 0 and module.weight.grad is not None:
            setattr(module, GRAD_ATTR, module.weight.grad.detach() / counts[name])
        module.weight.grad = None


@torch.no_grad()
def loraga_init(layer: nn.Module, adapter_name: str, lora_ga_config: Any) -> None:
    """Set ``layer``'s (a LoRA Linear) A, B from its base's gradient; the base keeps the residual
    and the gradient is consumed (deleted), as in PEFT."""
    ga = _loraga_config(lora_ga_config)
    base = layer.base_layer
    weight = base.weight
    dtype = weight.dtype
    grad = getattr(base, GRAD_ATTR).to(torch.float32)
    grad = grad.T if layer.fan_in_fan_out else grad  # [out, in]
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if 2 * r > min(grad.shape):
        raise AdapterConfigError(f"LoRA-GA needs 2 * r <= min(out, in); rank {r} is too large for a "
                                 f"{type(base).__name__} [out {layer.out_features}, in {layer.in_features}]")
    U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    Vh = V.t()
    U, S, Vh = U[:, : 2 * r], S[: 2 * r], Vh[: 2 * r, :]
    if ga.direction == "ArBr":  # A: odd components, B: even ones
        lora_A, B_index = Vh[1 : 2 * r : 2, :], slice(0, 2 * r, 2)
    elif ga.direction == "A2rBr":
        lora_A, B_index = Vh[r : 2 * r, :], slice(0, r)
    elif ga.direction == "ArB2r":
        lora_A, B_index = Vh[:r, :], slice(r, 2 * r)
    else:  # random: one draw of r of the 2r components, shared by A and B
        B_index = torch.randperm(2 * r)[:r]
        lora_A = Vh[B_index, :]
    S_B = S[B_index]
    lora_B = U[:, B_index] @ torch.diag(S_B)
    if ga.scale == "stable":
        # PEFT scales by weight.shape[0] of the stored weight: ``out`` for Linear, ``in`` for Conv1D
        lora_B = lora_B * ((weight.shape[0] ** 0.25) / (ga.stable_gamma ** 0.5))
    elif ga.scale == "weight_svd":
        stored = weight.detach().to(torch.float32)
        _, weight_S, _ = torch.svd_lowrank(stored.T if layer.fan_in_fan_out else stored, q=r, niter=4)
        if S_B[0] > 0:
            lora_B = lora_B * (weight_S[0] / S_B[0])
    elif ga.scale == "gd_scale":
        lora_A, lora_B = lora_A / scaling, lora_B / scaling
    lora_A, lora_B = lora_A.to(dtype), lora_B.to(dtype)
    layer.lora_A[adapter_name].weight.data = lora_A.contiguous()
    layer.lora_B[adapter_name].weight.data = lora_B.contiguous()
    stored = weight.detach().to(torch.float32)
    residual = (stored.T if layer.fan_in_fan_out else stored) - scaling * (lora_B.float() @ lora_A.float())
    residual = residual.to(dtype)
    layer.set_base_weight(residual.T if layer.fan_in_fan_out else residual)
    delattr(base, GRAD_ATTR)
