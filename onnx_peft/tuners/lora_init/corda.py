"""CorDA: initialize LoRA from the SVD of each weight multiplied by the covariance of its inputs
(Yang et al., 2024, "Context-oriented Decomposition Adaptation", arXiv:2406.05223).

For every target Linear ``W [out, in]`` the inputs ``x [tokens, in]`` seen while ``run_model``
runs (one sample per call) give a covariance ``C [in, in]`` (mean over calls of
``x^T x`` with ``x`` divided by ``|max(x)|``). With ``C' = C + damp * mean(diag C) * I``
(damp doubled from 0.01 until ``C' C'^-1`` is close to I)::

    U S Vh = svd(W C')          V = (Vh C'^-1)^T  [in, min]
    ipm: the r largest singular values, kpm: the r smallest
    A [r, in] = sqrt(S/s) V^T   B [out, r] = U sqrt(S/s)   W_residual = W - s * B @ A

so ``W_residual + s B A = W`` at initialization. Use, as in PEFT:
``preprocess_corda(model, LoraConfig(init_lora_weights="corda", corda_config=CordaConfig(...)),
run_model=...)`` on the base model, then ``get_peft_model(model, that config)``. The SVD cache
and covariance files are PEFT's (``torch.save`` of the same keys), so either library reads them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ...errors import AdapterConfigError, DataError
from ...targets import is_target

_METHODS = ("ipm", "kpm")
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class CordaConfig:
    """PEFT's CordaConfig: ``cache_file`` (SVD cache, reused when present), ``covariance_file``
    (covariances, reused when present), ``corda_method`` ("ipm": largest singular directions,
    "kpm": smallest), ``verbose``, ``use_float16_for_covariance``, ``prune_temporary_fields``."""

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str | None = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        if self.corda_method is not None and self.corda_method not in _METHODS:
            raise AdapterConfigError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}")


@dataclasses.dataclass
class CordaEigens:
    """Per layer, cropped to its rank: ``S_WC [r]``, ``U_WC [out, r]``, ``V_WC [in, r]``."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _corda_config(lora_config: Any) -> CordaConfig:
    corda = getattr(lora_config, "corda_config", None)
    if isinstance(corda, dict):
        return CordaConfig(**corda)
    return corda or CordaConfig()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _targets(model: nn.Module, config: Any) -> Iterator[tuple[str, nn.Module]]:
    """CorDA's targets: the nn.Linear / Conv1D modules ``config.target_modules`` selects."""
    for name, module in model.named_modules():
        if name and is_target(name, config) and _is_linear(module):
            yield name, module


def _out_in(module: nn.Module) -> torch.Tensor:
    """``W [out, in]`` in float32 (Conv1D stores ``[in, out]``)."""
    weight = module.weight.detach().float()
    return weight if isinstance(module, nn.Linear) else weight.T


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config: Any, run_model: Callable[[], None] | None = None,
                     hooked_model: nn.Module | None = None) -> None:
    """Give every target Linear of ``model`` (the base model, before get_peft_model) its
    ``eigens`` (CordaEigens), which ``init_lora_weights="corda"`` consumes.

    ``run_model()`` runs the model over the calibration samples, one sample (batch size 1) per
    forward; ``hooked_model``, if given, is run instead of ``model`` (same module names).
    """
    corda = _corda_config(lora_config)
    targets = dict(_targets(model, lora_config))
    if not targets:
        raise AdapterConfigError(
            f"preprocess_corda found no nn.Linear/Conv1D module matching target_modules={lora_config.target_modules!r}; "
            "list the module names (CorDA initializes Linear and Conv1D layers only)")
    cache_file = corda.cache_file
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=next(model.parameters()).device, weights_only=True)
        for name, module in targets.items():
            try:
                module.eigens = CordaEigens(*(cache[f"{name}.eigens.{k}"] for k in ("S_WC", "U_WC", "V_WC")))
            except KeyError as missing:
                raise DataError(f"CorDA cache {cache_file} has no {missing} for module {name}; it was built for "
                                "another model or target_modules: delete it to rebuild") from None
        return
    if corda.corda_method is None:
        raise AdapterConfigError("CordaConfig.corda_method is required ('ipm' or 'kpm') when there is no cache_file")
    covariances = _covariances(model, targets, lora_config, corda, run_model, hooked_model)
    for i, (name, module) in enumerate(targets.items()):
        if corda.verbose:
            _log.info("CorDA eigens %d/%d: %s", i + 1, len(targets), name)
        rank = lora_config.rank_for(name)
        module.eigens = _crop(_eigens(module, covariances[name], name), rank, corda.corda_method)
        if not corda.prune_temporary_fields:  # PEFT leaves these on the module when asked
            module.covariance_matrix, module.corda_method, module.rank = covariances[name], corda.corda_method, rank
    if cache_file is not None:
        cache = {f"{name}.eigens.{k}": getattr(module.eigens, k) for name, module in targets.items()
                 for k in ("S_WC", "U_WC", "V_WC")}
        os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
        torch.save(cache, cache_file)


def _covariances(model: nn.Module, targets: dict[str, nn.Module], lora_config: Any, corda: CordaConfig,
                 run_model: Callable[[], None] | None, hooked_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """Mean of ``x^T x / max(x)^2`` over the calls of each target: ``{name: [in, in]}``."""
    path = corda.covariance_file
    if path is not None and os.path.exists(path) and os.path.getsize(path) > 0:
        stored = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
        missing = sorted(set(targets) - set(stored))
        if missing:
            raise DataError(f"CorDA covariance file {path} has no matrix for {missing[:3]}; delete it to rebuild")
        return {name: stored[name] for name in targets}
    if run_model is None:
        raise DataError("preprocess_corda needs run_model (a callable running the model over calibration samples) "
                        "when neither CordaConfig.cache_file nor covariance_file exists yet")
    hooked = hooked_model if hooked_model is not None else model
    hooked.eval()
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            x = inputs[0].detach().squeeze(0)
            if x.ndim != 2:
                raise DataError(f"CorDA: module {name} got an input of shape {list(inputs[0].shape)}; run_model "
                                "must run one sample per forward (batch size 1), giving [1, tokens, in]")
            if not corda.use_float16_for_covariance:
                x = x.float()
            x = x / torch.max(x).abs()
            if torch.isnan(x).any() or torch.isinf(x).any():
                raise DataError(f"CorDA: module {name} got an input with nan/inf (or all zeros); check the samples")
            covariance = x.t().matmul(x)
            if torch.isnan(covariance).any() or torch.isinf(covariance).any():
                raise DataError(f"CorDA: the input covariance of module {name} overflows; do not set "
                                "use_float16_for_covariance")
            counts[name] += 1
            sums[name] = sums[name] + covariance

        return hook

    handles = []
    for name, module in _targets(hooked, lora_config):
        sums[name], counts[name] = 0, 0
        handles.append(module.register_forward_hook(make_hook(name)))
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    covariances = {}
    for name in targets:
        if not counts.get(name):
            raise DataError(f"CorDA: module {name} saw no input while run_model ran; run the model on calibration "
                            "samples in run_model (or leave the module out of target_modules)")
        covariances[name] = sums[name] / counts[name]
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(covariances, path)
    return covariances


def _eigens(module: nn.Module, covariance: torch.Tensor, name: str) -> CordaEigens:
    """Full SVD of ``W C'``: ``S [min]``, ``U [out, min]``, ``V = (Vh C'^-1)^T [in, min]``."""
    weight = _out_in(module)
    covariance = covariance.float()
    if covariance.shape != (weight.shape[1],) * 2:
        raise DataError(f"CorDA: covariance of module {name} is {list(covariance.shape)}, expected "
                        f"[{weight.shape[1]}, {weight.shape[1]}]; the covariance file belongs to another model")
    n = covariance.size(0)
    damp = 0.01
    while True:  # damp the covariance until it inverts well (PEFT's loop, same steps)
        compensate = torch.diag(torch.ones(n, device=covariance.device) * torch.mean(torch.diag(covariance)) * damp)
        fixed = covariance + compensate
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, torch.eye(n, device=covariance.device)).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    return CordaEigens(S_WC=S, U_WC=U, V_WC=(Vh @ inverse).transpose(0, 1))


def _crop(eigens: CordaEigens, rank: int, method: str) -> CordaEigens:
    """ipm keeps the first ``rank`` directions (largest), kpm the last ``rank`` (smallest)."""
    if rank > eigens.S_WC.size(0):
        raise AdapterConfigError(f"CorDA rank {rank} exceeds min(out, in) = {eigens.S_WC.size(0)} of a target layer")
    part = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return CordaEigens(S_WC=eigens.S_WC[part].clone(), U_WC=eigens.U_WC[:, part].clone(),
                       V_WC=eigens.V_WC[:, part].clone())


@torch.no_grad()
def corda_init(layer: nn.Module, adapter_name: str) -> None:
    """Set ``layer``'s (a LoRA Linear) A, B from its base's ``eigens`` and leave the residual in
    the base weight; the eigens are consumed (deleted) as in PEFT."""
    base = layer.base_layer
    if layer.quantized or base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise AdapterConfigError("CorDA initializes float32/float16/bfloat16 weights; initialize on the float "
                                 "model, then quantize the residual model")
    eigens = getattr(base, "eigens", None)
    out_dim, in_dim = layer.out_features, layer.in_features
    shape = f"{type(base).__name__} [out {out_dim}, in {in_dim}]"
    if eigens is None:
        raise AdapterConfigError(f"init_lora_weights='corda': layer {shape} has no CorDA eigens; call "
                                 "onnx_peft.preprocess_corda(model, lora_config, run_model) before get_peft_model")
    U, S, V = eigens.U_WC, eigens.S_WC, eigens.V_WC
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    for tensor, label in ((S, "S"), (U, "U"), (V, "V")):
        if torch.isnan(tensor).any() or torch.isinf(tensor).any():
            raise DataError(f"CorDA eigens {label} of layer {shape} hold nan/inf; rebuild them with other samples")
    if U.shape != (out_dim, r) or S.shape != (r,) or V.shape != (in_dim, r):
        raise AdapterConfigError(
            f"CorDA eigens of layer {shape} are U {list(U.shape)}, S {list(S.shape)}, V {list(V.shape)} but the "
            f"adapter has rank {r}; run preprocess_corda with the same model and LoraConfig (a cache_file built "
            "for another rank must be deleted)")
    S = S / scaling
    lora_A = V.t().mul(S.sqrt().view(-1, 1)).contiguous()
    lora_B = U.mul(S.sqrt()).contiguous()
    layer.lora_A[adapter_name].weight.data = lora_A
    layer.lora_B[adapter_name].weight.data = lora_B
    delta = scaling * lora_B @ lora_A
    residual = base.weight.detach().float() - (delta.T if layer.fan_in_fan_out else delta)
    layer.set_base_weight(residual)
    del base.eigens
