"""OSF (orthogonal subspace fine-tuning): the config and the math, torch-free.

OSF splits a Linear's weight ``W [out, in]`` by its SVD at ``k = effective_rank``::

    W = U_high S_high V_high  +  U_low_init S_low_init V_low_init      (top k | the other r = min(out, in) - k)

The high part stays frozen (what the model already knows); the low part's factors train, their
gradients projected orthogonally to the high subspace (tuners/osf.py), so the layer becomes::

    W' = U_high S_high V_high + U_low S_low V_low
       = W + delta,   delta = U_low S_low V_low - U_low_init S_low_init V_low_init   [out, in]

A checkpoint holds only ``U_low [out, r]``, ``S_low [r]`` and ``V_low [r, in]`` (PEFT keeps the
initial factors in non-persistent buffers): the initial part is the base weight's own low SVD
part again. ``delta`` is a difference of two rank-r products, ``delta = A B`` with
``A = [U_low S_low, -U_low_init S_low_init] [out, 2r]`` and ``B = [V_low; V_low_init] [2r, in]``
(PEFT's own unmerged forward), so the unmerged ONNX branch is the cheaper exact one of:

    lora   A_slot = B^T [in, 2r], B_slot = A^T [2r, out]   2r (in + out) a token; per-row banks
    dense  D = delta^T [in, out]                            in out a token; no per-row form

``lora`` wins when ``2r (in + out) <= in out``: a high ``effective_rank`` (``r`` below about a
quarter of a square layer); PEFT's default (half the rank) gives ``dense``.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, register_method

PARAMS = "osf_svd_params"
U_LOW, S_LOW, V_LOW = f"{PARAMS}.U_low", f"{PARAMS}.S_low", f"{PARAMS}.V_low"
# the frozen initial factors, in ``parts`` only where the torch layer passes its buffers
U_INIT, S_INIT, V_INIT = "U_low_init", "S_low_init", "V_low_init"


def _check_rank(value: Any, where: str) -> None:
    """An effective rank: a positive int, or a float (in (0, 1]: a fraction of min(out, in))."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise AdapterConfigError(
            f"{where} must be a positive int or a fraction in (0, 1] of the layer's smaller dimension, "
            f"got {value!r}")


@register_config
@dataclass
class OSFConfig(AdapterConfig):
    """PEFT's OSFConfig: same field names, same defaults.

    ``effective_rank`` is the FROZEN rank ``k`` (not LoRA's trainable ``r``): the layer trains
    ``r = min(out, in) - k`` singular directions. None is half of ``min(out, in)``; a float in
    (0, 1] is that fraction of it; ``rank_pattern`` overrides it per module (first regex that
    ``re.search`` finds in the module path). ``target_svd_config`` is accepted and ignored, as
    in PEFT.
    """

    peft_type = "OSF"

    effective_rank: int | float | None = None
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int | float] | None = None
    init_weights: bool | None = True
    modules_to_save: list[str] | None = None
    target_svd_config: dict[str, int] | None = None

    def validate(self) -> None:
        if self.effective_rank is not None:
            _check_rank(self.effective_rank, "OSFConfig.effective_rank")
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise AdapterConfigError(f"OSFConfig.rank_pattern must be a dict of regex -> rank, got {self.rank_pattern!r}")
        for pattern, value in (self.rank_pattern or {}).items():
            _check_rank(value, f"OSFConfig.rank_pattern[{pattern!r}]")

    def effective_rank_for(self, module: str, min_dim: int) -> int:
        """PEFT's frozen rank ``k`` of ``module`` (a layer with ``min(out, in) = min_dim``),
        clipped to ``[0, min_dim]``."""
        value = self.effective_rank
        for pattern, rank in (self.rank_pattern or {}).items():
            if re.search(pattern, module):
                value = rank
                break
        if value is None:
            return min_dim // 2
        rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
        return max(min(min_dim, rank), 0)


def svd_split(weight: Any, effective_rank: int) -> dict[str, Any]:
    """The SVD of ``W [out, in]`` split after the top ``k = effective_rank`` singular values:
    ``{"U_high" [out, k], "S_high" [k], "V_high" [k, in], "U_low" [out, r], "S_low" [r],
    "V_low" [r, in]}``. torch: float32 ``torch.linalg.svd`` in the weight's dtype, as PEFT
    computes it; numpy: float64 LAPACK, returned as float32."""
    if isinstance(weight, np.ndarray):
        u, s, vt = (x.astype(np.float32) for x in np.linalg.svd(weight.astype(np.float64), full_matrices=False))
    else:
        import torch

        u, s, vt = (x.to(weight.dtype).contiguous()
                    for x in torch.linalg.svd(weight.to(torch.float32), full_matrices=False))
    k = min(effective_rank, s.shape[0])
    return {"U_high": u[:, :k], "S_high": s[:k], "V_high": vt[:k, :],
            "U_low": u[:, k:], "S_low": s[k:], "V_low": vt[k:, :]}


def _cat(tensors: list[Any], axis: int) -> Any:
    if isinstance(tensors[0], np.ndarray):
        return np.concatenate(tensors, axis=axis)
    import torch

    return torch.cat(tensors, dim=axis)


def low_rank_factors(parts: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(A [out, 2r], B [2r, in])`` with ``delta = A B`` (``parts`` holding the trained factors
    and the initial ones, see :meth:`OSFMethod.with_init`)."""
    a = _cat([parts[U_LOW] * parts[S_LOW][None, :], -(parts[U_INIT] * parts[S_INIT][None, :])], axis=1)
    b = _cat([parts[V_LOW], parts[V_INIT]], axis=0)
    return a, b


def delta_weight(parts: Mapping[str, Any]) -> Any:
    """``delta [out, in] = U_low S_low V_low - U_low_init S_low_init V_low_init``."""
    current = (parts[U_LOW] * parts[S_LOW][None, :]) @ parts[V_LOW]
    initial = (parts[U_INIT] * parts[S_INIT][None, :]) @ parts[V_INIT]
    return current - initial


@register_method
class OSFMethod(Method):
    """OSF on nn.Linear: ``lora`` slots of rank 2r where that is cheaper than ``dense``, else a
    ``dense`` slot ``D = delta^T [in, out]`` (see the module docstring)."""

    peft_type = "OSF"
    config_class = OSFConfig
    tuner_module = "onnx_peft.tuners.osf"
    tensor_names = (U_LOW, S_LOW, V_LOW)
    layer_attrs = (PARAMS,)

    def features(self, config, module, parts):
        u, v = parts[U_LOW], parts[V_LOW]
        return (int(v.shape[1]), int(u.shape[0])) if u.ndim == 2 and v.ndim == 2 else None

    def with_init(self, config: OSFConfig, module: str, weight: Any, parts: Mapping[str, Any]) -> dict[str, Any]:
        """``parts`` checked against the layer ``W [out, in]`` and the config, plus the initial
        low factors: the torch layer's frozen buffers where it passes them, else the low SVD part
        of ``weight`` (a checkpoint: the base weight is the one the adapter was trained on)."""
        out_features, in_features = (int(d) for d in weight.shape)
        min_dim = min(out_features, in_features)
        rank = min_dim - config.effective_rank_for(module, min_dim)
        u, s, v = parts[U_LOW], parts[S_LOW], parts[V_LOW]
        expected = ((out_features, rank), (rank,), (rank, in_features))
        if (tuple(u.shape), tuple(s.shape), tuple(v.shape)) != expected:
            raise IncompatibleAdapterError(
                f"module {module}: U_low {list(u.shape)}, S_low {list(s.shape)}, V_low {list(v.shape)} do not fit "
                f"a {out_features}x{in_features} layer with effective_rank {min_dim - rank} (expected "
                f"{[list(e) for e in expected]}); the adapter_config.json does not belong to these weights, or the "
                "base model differs")
        if U_INIT in parts:
            return dict(parts)
        init = svd_split(weight, min_dim - rank)
        return {**parts, U_INIT: init["U_low"], S_INIT: init["S_low"], V_INIT: init["V_low"]}

    def merged_weight(self, config, module, weight, bias, parts, shared):
        delta = delta_weight(self.with_init(config, module, weight, parts))
        return weight + (delta if isinstance(weight, np.ndarray) else delta.to(weight.dtype)), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        weight = np.asarray(base_weight(), np.float32)
        full = self.with_init(config, module, weight, {k: np.asarray(v, np.float32) for k, v in parts.items()})
        out_features, in_features = weight.shape
        rank = full[S_LOW].shape[0]
        if 2 * rank * (in_features + out_features) <= in_features * out_features:
            a, b = low_rank_factors(full)
            return {"lora": {"lora_A.weight": np.ascontiguousarray(b.T, np.float32),
                             "lora_B.weight": np.ascontiguousarray(a.T, np.float32)}}
        return {"dense": {"delta.weight": np.ascontiguousarray(delta_weight(full).T, np.float32)}}
