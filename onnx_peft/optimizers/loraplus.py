"""LoRA+: train B with a larger learning rate than A (Hayou et al., 2024, arXiv:2402.12354).

LoRA's update ``s * B A`` learns features faster when B, which starts at zero, moves faster
than A. LoRA+ splits the trainable parameters into four groups, as PEFT's
``create_loraplus_optimizer`` does, so checkpoints and schedules behave the same::

    group        members                                     lr                     weight decay
    A            lora_A and every other >= 2-D parameter     lr                     loraplus_weight_decay
    embedding    lora_embedding_A/B of an Embedding layer    loraplus_lr_embedding  loraplus_weight_decay
    B            lora_B and 1-D parameters (magnitudes,      lr * ratio             loraplus_weight_decay
                 norms), except biases and LayerNorm params
    B_no_decay   the biases and LayerNorm params of B        lr * ratio             0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AdapterConfigError


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Parameters that take no weight decay: biases and anything inside an ``nn.LayerNorm``
    (transformers' rule, which PEFT uses through ``get_parameter_names``)."""
    ids = {id(p) for name, p in model.named_parameters() if "bias" in name}
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            ids.update(id(p) for p in module.parameters())
    return ids


def _embedding_lora_ids(model: nn.Module) -> set[int]:
    from ..tuners.lora import Embedding

    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, Embedding):
            ids.update(id(p) for p in module.lora_embedding_A.parameters())
            ids.update(id(p) for p in module.lora_embedding_B.parameters())
    return ids


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float,
                          loraplus_weight_decay: float = 0.0,
                          loraplus_lr_embedding: float = 1e-6) -> list[dict[str, Any]]:
    """The four LoRA+ parameter groups (table in the module docstring), in PEFT's order
    A, embedding, B, B_no_decay; each dict has ``params``, ``names``, ``lr``, ``weight_decay``."""
    no_decay, embedding = _no_decay_ids(model), _embedding_lora_ids(model)
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            key = "embedding"
        elif "lora_B" in name or param.ndim == 1:
            key = "B_no_decay" if id(param) in no_decay else "B"
        else:
            key = "A"
        groups[key].append((name, param))
    settings = {"A": (lr, loraplus_weight_decay), "embedding": (loraplus_lr_embedding, loraplus_weight_decay),
                "B": (lr * loraplus_lr_ratio, loraplus_weight_decay), "B_no_decay": (lr * loraplus_lr_ratio, 0.0)}
    return [{"params": [p for _, p in members], "names": [n for n, _ in members],
             "lr": settings[key][0], "weight_decay": settings[key][1]} for key, members in groups.items()]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, loraplus_weight_decay: float = 0.0,
                              loraplus_lr_embedding: float = 1e-6, **kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_cls`` over the LoRA+ groups of ``model`` (a PeftModel with LoRA adapters).

    ``loraplus_lr_ratio`` is ``lr_B / lr_A`` (the paper suggests 2 to 16; >= 1). ``kwargs`` go to
    ``optimizer_cls`` (betas, eps, ...). Parameter names are kept in each group's ``names``.
    """
    if not loraplus_lr_ratio > 0:
        raise AdapterConfigError(f"create_loraplus_optimizer: loraplus_lr_ratio must be > 0, got {loraplus_lr_ratio!r}")
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_weight_decay, loraplus_lr_embedding)
    if not any(g["params"] for g in groups):
        raise AdapterConfigError("create_loraplus_optimizer: the model has no trainable parameter; "
                                 "add a LoRA adapter (onnx_peft.get_peft_model) first")
    for group in groups:  # torch's own key for parameter names (kept in state_dict())
        group["param_names"] = group.pop("names")
    return optimizer_cls(groups, lr=lr, **kwargs)
