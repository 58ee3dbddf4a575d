"""add_weighted_adapter: build a new LoRA (or IA3) adapter from a weighted combination of others.

IA3 (as PEFT): the new scaling vector is the weighted sum of the adapters' vectors.

combination_type (PEFT's names):
- "linear": same rank; A = sum(sqrt(w s) A_i), B = sum(sqrt(w s) B_i) (task arithmetic on factors)
- "cat": ranks add up; A = cat(w s A_i), B = cat(B_i), exact sum of the weighted deltas
- "svd" (and "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"): combine the
  delta weights, then truncate to ``svd_rank`` with an SVD
- "ties", "dare_linear", "dare_ties", "magnitude_prune": the TIES/DARE merges on A and B
The new adapter has ``lora_alpha == r`` (scale 1) since the scales are folded in.
"""

from __future__ import annotations

import dataclasses
import math
from functools import reduce
from typing import TYPE_CHECKING

import torch

from ..errors import AdapterConfigError
from .lora import Conv, Embedding, LoraLayer

if TYPE_CHECKING:
    from ..model import PeftModel

_SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


# -- task arithmetic on stacks of tensors -------------------------------------------------------
def _weighted_sum(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (tensors * weights.reshape((-1,) + (1,) * (tensors.dim() - 1))).sum(0)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest |value|."""
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), device=tensor.device, dtype=tensor.dtype)
    mask[torch.topk(tensor.abs().reshape(-1), k=k).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: drop entries with probability 1 - density and rescale the rest by 1 / density."""
    mask = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * mask / density


def _majority_sign_mask(tensors: torch.Tensor, method: str) -> torch.Tensor:
    sign = tensors.sign()
    votes = tensors.sum(0) if method == "total" else sign.sum(0)
    majority = torch.where(votes >= 0, 1.0, -1.0).to(tensors.dtype)
    return sign == majority


def _disjoint_merge(tensors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kept = (tensors * mask).sum(0)
    return kept / mask.sum(0).clamp(min=1.0)


def combine(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None,
            majority_sign_method: str) -> torch.Tensor:
    """Merge same-shaped task tensors with one of PEFT's task-arithmetic methods.

    ``method`` is a combination_type without its ``_svd`` suffix; arguments are checked by
    :func:`check_arguments` before any tensor is touched.
    """
    if method in ("linear", "svd"):
        return _weighted_sum(torch.stack(tensors), weights)
    if method == "magnitude_prune":
        return _weighted_sum(torch.stack([_magnitude_prune(t, density) for t in tensors]), weights)
    if method == "dare_linear":
        return _weighted_sum(torch.stack([_random_prune(t, density) for t in tensors]), weights)
    pruned = [(_magnitude_prune if method == "ties" else _random_prune)(t, density) for t in tensors]
    stacked = torch.stack(pruned)
    mask = _majority_sign_mask(stacked, majority_sign_method)
    weighted = stacked * weights.reshape((-1,) + (1,) * (stacked.dim() - 1))
    return _disjoint_merge(weighted, mask)


# -- the verb ---------------------------------------------------------------------------------
def check_arguments(combination_type: str, density: float | None, majority_sign_method: str) -> None:
    """Refuse bad arguments up front, so a failed call leaves the model as it was."""
    method = combination_type.removesuffix("_svd")
    if method not in ("linear", "svd", "cat") and (density is None or not 0.0 < density <= 1.0):
        raise AdapterConfigError(f"combination_type {combination_type!r} needs density in (0, 1], got {density!r}")
    if method in ("ties", "dare_ties") and majority_sign_method not in ("total", "frequency"):
        raise AdapterConfigError(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )


def _new_rank(model: PeftModel, adapters: list[str], combination_type: str, svd_rank: int | None) -> int:
    ranks = [max([c.r, *c.rank_pattern.values()]) for c in (model.peft_config[a] for a in adapters)]
    if combination_type in _SAME_RANK:
        if len(set(ranks)) != 1:
            raise AdapterConfigError(
                f"combination_type {combination_type!r} needs adapters of one rank, got {ranks}; use 'cat' or 'svd'"
            )
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type in _SVD:
        return svd_rank or max(ranks)
    raise AdapterConfigError(
        f"unknown combination_type {combination_type!r}; use one of: cat, {', '.join(_SAME_RANK + _SVD)}"
    )


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, Embedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def add_weighted_adapter(model: PeftModel, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         density: float | None = None, majority_sign_method: str = "total") -> None:
    for name in adapters:
        if name not in model.peft_config:
            raise AdapterConfigError(f"unknown adapter {name!r}; loaded: {sorted(model.peft_config)}")
    if len(adapters) != len(weights):
        raise AdapterConfigError(f"{len(adapters)} adapters but {len(weights)} weights")
    if adapter_name in model.peft_config:
        raise AdapterConfigError(f"adapter {adapter_name!r} already exists")
    configs = [model.peft_config[a] for a in adapters]
    if all(c.peft_type == "IA3" for c in configs):
        return add_weighted_ia3(model, adapters, weights, adapter_name)
    other = next((c for c in configs if c.peft_type != "LORA"), None)
    if other is not None:
        raise AdapterConfigError(f"add_weighted_adapter combines LoRA adapters or IA3 adapters; {other.peft_type} "
                                 "adapters cannot be combined (as in PEFT)")
    if any(c.use_dora for c in configs):
        raise AdapterConfigError("add_weighted_adapter cannot combine DoRA adapters (their magnitudes do not add)")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    new_rank = _new_rank(model, adapters, combination_type, svd_rank)
    check_arguments(combination_type, density, majority_sign_method)
    targets = [c.target_modules for c in configs]
    if len({type(t) for t in targets}) > 1:
        raise AdapterConfigError("cannot combine adapters whose target_modules mix regex strings and lists")
    if isinstance(targets[0], str):
        new_targets = "|".join(f"({t})" for t in targets)
    else:
        new_targets = sorted(reduce(lambda a, b: a | set(b), targets, set()))
    config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=new_targets,
                                 rank_pattern={}, alpha_pattern={}, init_lora_weights=True,
                                 layers_to_transform=None, layers_pattern=None)
    model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for _, layer in model._layers():
                if isinstance(layer, LoraLayer) and adapter_name in layer.r:
                    _fill(layer, adapter_name, adapters, weights, combination_type, new_rank, svd_clamp,
                          svd_full_matrices, density, majority_sign_method)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    model.set_adapter(model.active_adapters)


def _fill(layer: LoraLayer, target: str, adapters: list[str], weights: list[float], combination_type: str,
          new_rank: int, svd_clamp: float | None, full_matrices: bool, density: float | None,
          majority_sign_method: str) -> None:
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
    new_A, new_B = _factors(layer, target)
    new_A.zero_()
    new_B.zero_()
    if not present:
        return
    if combination_type == "cat":
        As = torch.cat([_factors(layer, a)[0] * w * layer.scaling[a] for a, w in present], 0)
        Bs = torch.cat([_factors(layer, a)[1] for a, _ in present], 1)
        new_A[: As.shape[0]] = As
        new_B[:, : Bs.shape[1]] = Bs
    elif combination_type in _SVD:
        deltas = [layer.get_delta_weight(a) for a, _ in present]
        method = combination_type.removesuffix("_svd")
        delta = combine(deltas, torch.tensor([w for _, w in present], dtype=deltas[0].dtype), method,
                        density, majority_sign_method)
        if isinstance(layer, Conv):
            delta = delta.flatten(1)
        if layer.fan_in_fan_out or isinstance(layer, Embedding):
            delta = delta.T
        U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices)
        U = U[:, :new_rank] @ torch.diag(S[:new_rank])
        Vh = Vh[:new_rank]
        if svd_clamp is not None:
            high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), svd_clamp)
            U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
        new_A.copy_(Vh.reshape(new_A.shape))
        new_B.copy_(U.reshape(new_B.shape))
    else:
        scaled = [w * layer.scaling[a] for a, w in present]
        weights_A = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled])
        weights_B = torch.tensor([math.sqrt(abs(s)) for s in scaled])
        As = [_factors(layer, a)[0] for a, _ in present]
        Bs = [_factors(layer, a)[1] for a, _ in present]
        new_A.copy_(combine(As, weights_A.to(As[0].dtype), combination_type, density, majority_sign_method))
        new_B.copy_(combine(Bs, weights_B.to(Bs[0].dtype), combination_type, density, majority_sign_method))


def _union(values: list) -> list[str] | str | None:
    """PEFT's union of module selections: regexes joined by ``|``, lists merged."""
    if all(v is None for v in values):
        return None
    if len({type(v) for v in values}) > 1:
        raise AdapterConfigError("cannot combine adapters whose module selections mix regex strings and lists")
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    return sorted(reduce(lambda a, b: a | set(b), values, set()))


def add_weighted_ia3(model: PeftModel, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """IA3, as PEFT: the new vector is ``sum_i w_i l_i`` over the adapters a module has (others add
    nothing); target and feedforward modules are the union of theirs."""
    from .ia3 import IA3Layer

    configs = [model.peft_config[a] for a in adapters]
    config = dataclasses.replace(configs[0], target_modules=_union([c.target_modules for c in configs]),
                                 feedforward_modules=_union([c.feedforward_modules for c in configs]))
    model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for _, layer in model._layers():
            if isinstance(layer, IA3Layer) and adapter_name in layer.ia3_l:
                target = layer.ia3_l[adapter_name]
                target.zero_()
                for adapter, weight in zip(adapters, weights):
                    if adapter in layer.ia3_l:
                        target.add_(layer.ia3_l[adapter] * weight)
