"""LoKr (low-rank Kronecker product): the config and the math, torch-free.

LoKr factors ``out = a * b`` and ``in = c * d`` (:func:`factorization`) and learns the update as
a Kronecker product of a small ``[a, c]`` matrix and a larger ``[b, d]`` one::

    dW = s * kron(w1, w2)            w1: [a, c]  (or w1_a [a, r] @ w1_b [r, c] with decompose_both)
                                     w2: [b, d]  (or w2_a [b, r] @ w2_b [r, d] when r < max(b, d) / 2)
    s = alpha / r                    dW: [a * b, c * d] = [out, in]

Convolutions carry the kernel in ``w2`` (``[b, d, *k]``, or ``w2_b [r, d * k1 * k2]``, or a CP
core ``t2 [r, r, k1, k2]`` with ``use_effective_conv2d``). The update is dense, so the unmerged
ONNX form is ``dense`` (``D = dW^T [in, out]``). The shared LyCORIS parts (config fields,
merging, the dense slot) live in :mod:`onnx_peft.methods.loha`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import register_config
from ..errors import AdapterConfigError, CheckpointError
from .base import register_method
from .loha import LycorisConfig, LycorisMethod, cp_weight


@register_config
@dataclass
class LoKrConfig(LycorisConfig):
    """PEFT's LoKrConfig: same field names, same defaults."""

    peft_type = "LOKR"
    init_choices: ClassVar[tuple[str, ...]] = ("lycoris",)

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.decompose_factor, int) or isinstance(self.decompose_factor, bool):
            raise AdapterConfigError(f"LoKrConfig.decompose_factor must be an integer (-1: near the square root), "
                                     f"got {self.decompose_factor!r}")

    @property
    def rescales_rank_dropout(self) -> bool:
        return bool(self.rank_dropout_scale)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``dimension = m * n`` with ``m <= n``: ``m = factor`` when it divides ``dimension``,
    else the divisor pair nearest the square root with ``m <= factor`` (-1: no bound).

    ``factorization(256) == (16, 16)``, ``factorization(128) == (8, 16)``,
    ``factorization(127) == (1, 127)``, ``factorization(128, 4) == (4, 32)`` (as LyCORIS).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:  # walk the divisors up to the square root (or the bound)
        new_m = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        if new_m > bound:
            break
        m, n = new_m, dimension // new_m
    return min(m, n), max(m, n)


def kron(a: Any, b: Any) -> Any:
    """Kronecker product of numpy arrays or torch tensors, ``torch.kron``'s semantics: the
    tensor with fewer dims gets leading 1s; ``out[i * B + j] = a[i] * b[j]`` on every axis."""
    ndim = max(a.ndim, b.ndim)
    a_shape = (1,) * (ndim - a.ndim) + tuple(a.shape)
    b_shape = (1,) * (ndim - b.ndim) + tuple(b.shape)
    a_spread = a.reshape(tuple(d for size in a_shape for d in (size, 1)))   # [a0, 1, a1, 1, ..]
    b_spread = b.reshape(tuple(d for size in b_shape for d in (1, size)))   # [1, b0, 1, b1, ..]
    return (a_spread * b_spread).reshape(tuple(x * y for x, y in zip(a_shape, b_shape)))


def lokr_delta_weight(parts: Mapping[str, Any], scale: float) -> Any:
    """``s * kron(w1, w2)``, each factor full or a product of two rank-r matrices.

    Linear: ``[out, in]``. Conv: w2 ``[b, d, k1, k2]`` or CP gives ``[out, in, k1, k2]`` (w1 gets
    two trailing unit dims); a flattened w2 ``[b, d * k1 * k2]`` gives ``[out, in * k1 * k2]``.
    """
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"]
    elif "lokr_t2" in parts:
        w2 = cp_weight(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:
        w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return kron(w1, w2) * scale


@register_method
class LoKrMethod(LycorisMethod):
    """LoKr on Linear and Conv1d/2d; ``dense`` slots for Linear."""

    peft_type = "LOKR"
    config_class = LoKrConfig
    tuner_module = "onnx_peft.tuners.lokr"
    tensor_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    required_tensors = ()  # w1 or (w1_a, w1_b), w2 or (w2_a, w2_b): checked by _factors
    layer_attrs = tensor_names

    def _factors(self, module: str, parts: Mapping[str, Any]) -> None:
        """Each Kronecker factor must be there, whole or as its two halves."""
        for whole, halves in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))):
            if whole not in parts and not all(h in parts for h in halves):
                raise CheckpointError(f"module {module} has neither {whole} nor {' and '.join(halves)}; "
                                      "the checkpoint is incomplete")

    def features(self, config, module, parts):
        self._factors(module, parts)
        rows_cols = []
        for whole, left, right in (("lokr_w1", "lokr_w1_a", "lokr_w1_b"), ("lokr_w2", "lokr_w2_a", "lokr_w2_b")):
            if whole in parts:
                shape = tuple(parts[whole].shape)
            else:
                shape = (parts[left].shape[0], *parts[right].shape[1:])
            if len(shape) != 2 or "lokr_t2" in parts:
                return None
            rows_cols.append(shape)
        (a, c), (b, d) = rows_cols
        return int(c * d), int(a * b)

    def delta_weight(self, config, module, parts):
        self._factors(module, parts)
        if "lokr_t2" in parts:
            self._require(module, parts, "lokr_w2_a", "lokr_w2_b")
        self._check_rank(config, module, parts, ("lokr_w1_b", "lokr_w2_b"))  # both [r, ..] in every layout
        return lokr_delta_weight(parts, config.scaling_for(module))
