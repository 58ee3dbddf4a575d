"""BOFT (butterfly orthogonal finetuning): the config and the math, torch-free.

BOFT rotates a Linear's input with a product of ``m`` permuted block-diagonal rotations (a
butterfly) and scales each output channel::

    y = s * ((x B) W^T) + bias      B = M_{m-1} ... M_1 M_0    [in, in]
    M_i = P_i diag(R_i1, ..., R_iD) P_i^T                       R_ij [b, b],  D * b = in
    W' = s * (W B^T)                (the merged layer; the bias is unchanged)

PEFT stores ``boft_R [m, D, b, b]`` (any square matrices: ``R = cayley((A - A^T) / 2)`` makes
them rotations) and ``boft_s [out, 1]``. ``P_i`` is PEFT's block butterfly permutation: with
``m = 1`` it is the identity and BOFT is OFT with a scale. ONNX gets ``B`` solved once in
numpy as a single ``rotate_in`` block ``[1, in, in]`` and ``s`` as a ``dora`` factor (it
scales the output without the bias).

Note: PEFT 0.21 builds butterflies with ``m > 1`` only where its CUDA extension compiles;
elsewhere it silently uses ``m = 1`` (and saves ``boft_R [1, D, b, b]``). We always use the
configured ``m``, so such adapters (trained on GPU) load here as PEFT trained them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, register_method
from .oft import cayley, eye_like, is_numpy


@register_config
@dataclass
class BOFTConfig(AdapterConfig):
    """PEFT's BOFTConfig: same field names, same defaults. Give ``boft_block_size`` or
    ``boft_block_num``, not both; the other is ``in_features`` divided by it."""

    peft_type = "BOFT"

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False  # nn.Linear only: PEFT resets it to False there
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def validate(self) -> None:
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise AdapterConfigError(f"BOFTConfig.{name} must be a non-negative integer, got {value!r}")
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise AdapterConfigError(
                f"BOFTConfig: set exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                f"({self.boft_block_num}) to a non-zero value (their product is in_features)")
        factor = self.boft_n_butterfly_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise AdapterConfigError(f"BOFTConfig.boft_n_butterfly_factor must be an integer >= 1, got {factor!r}")
        if self.bias not in ("none", "all", "boft_only"):
            raise AdapterConfigError(f"BOFTConfig.bias must be 'none', 'all' or 'boft_only', got {self.bias!r}")
        if not 0.0 <= float(self.boft_dropout) < 1.0:
            raise AdapterConfigError(f"BOFTConfig.boft_dropout must be in [0, 1), got {self.boft_dropout!r}")
        if self.init_weights not in (True, False):
            raise AdapterConfigError(f"BOFTConfig.init_weights must be True or False, got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("BOFTConfig.layers_pattern needs layers_to_transform")


def boft_layout(config: BOFTConfig, in_features: int, module: str) -> tuple[int, int]:
    """``(block_num, block_size)`` of a layer with ``in_features`` inputs, checked as PEFT checks
    it; a misfit raises naming ``module`` and the fields to change."""
    extra = config.boft_n_butterfly_factor - 1          # the paper's m - 1
    size, num = config.boft_block_size, config.boft_block_num

    def bad(why: str) -> AdapterConfigError:
        return AdapterConfigError(
            f"module {module} (in_features={in_features}): {why}; change boft_block_size/boft_block_num/"
            "boft_n_butterfly_factor or exclude the module")

    if num:
        if in_features % num:
            raise bad(f"boft_block_num={num} does not divide in_features")
        if extra and (extra > int(math.log2(num)) or num % 2**extra):
            raise bad(f"boft_block_num={num} must be a multiple of 2^{extra} for boft_n_butterfly_factor={extra + 1}")
        size = in_features // num
    else:
        if in_features % size:
            raise bad(f"boft_block_size={size} does not divide in_features")
        if extra and in_features % (size * 2**extra):
            raise bad(f"boft_block_size={size} x 2^{extra} must divide in_features "
                      f"for boft_n_butterfly_factor={extra + 1}")
        num = in_features // size
    if extra and (num % 2 or size % 2):
        raise bad(f"a butterfly needs an even block count and size, got {num} blocks of {size}")
    return num, size


def butterfly_permutations(in_features: int, block_num: int, block_size: int, n_factors: int) -> list[np.ndarray]:
    """PEFT's block butterfly permutations, one index array ``perm [in]`` per factor
    (``P[k, perm[k]] = 1``). Factor ``i`` works in groups of ``b 2^i`` inputs cut into half
    blocks; each group lists its even half blocks first, then its odd ones."""
    if n_factors == 1:
        return [np.arange(in_features)]
    half = block_size // 2
    perms = []
    for i in range(n_factors):
        group = in_features // (block_num // 2**i)
        order = [*range(0, group // half, 2), *range(1, group // half, 2)]
        within = np.concatenate([np.arange(c * half, (c + 1) * half) for c in order])
        perms.append((np.arange(0, in_features, group)[:, None] + within[None, :]).reshape(-1))
    return perms


def block_diagonal(blocks: Any) -> Any:
    """``[n, b, b]`` -> the dense block-diagonal ``[n b, n b]`` (numpy or torch)."""
    n, b, _ = blocks.shape
    eye = eye_like(blocks, n)
    return (eye[:, None, :, None] * blocks[:, :, None, :]).reshape(n * b, n * b)


def boft_blocks(boft_R: Any) -> Any:
    """``boft_R [m, D, b, b]`` -> rotations ``cayley((A - A^T) / 2)`` of the same shape."""
    m, d, b, _ = boft_R.shape
    flat = boft_R.reshape(m * d, b, b)
    return cayley(0.5 * (flat - flat.swapaxes(-1, -2))).reshape(m, d, b, b)


def butterfly_matrix(blocks: Any) -> Any:
    """Rotations ``[m, D, b, b]`` -> ``B = M_{m-1} ... M_0 [in, in]``, ``M_i = P_i diag(R_i) P_i^T``."""
    m, d, b, _ = blocks.shape
    result = None
    for i, perm in enumerate(butterfly_permutations(d * b, d, b, m)):
        factor = block_diagonal(blocks[i])[perm][:, perm]          # (P A P^T)[k, l] = A[perm[k], perm[l]]
        result = factor if result is None else factor @ result
    return result


# -- the method seam ---------------------------------------------------------------------------
def diagonal_blocks(matrix: np.ndarray, smallest: int) -> np.ndarray:
    """``matrix [in, in]`` as its diagonal blocks ``[n, b, b]`` with the smallest ``b`` (a multiple of
    ``smallest`` dividing ``in``) whose off-diagonal blocks are exactly zero: one butterfly factor
    is block-diagonal, so the branch costs ``in * b`` instead of ``in^2`` per token; products of
    several factors usually come out as one dense block."""
    size = matrix.shape[0]
    for b in range(smallest, size + 1, smallest):
        if size % b:
            continue
        n = size // b
        tiles = matrix.reshape(n, b, n, b)
        off = tiles.copy()
        off[np.arange(n), :, np.arange(n), :] = 0
        if not off.any():
            return np.ascontiguousarray(tiles[np.arange(n), :, np.arange(n), :])
    return matrix[None]


@register_method
class BOFTMethod(Method):
    """BOFT on nn.Linear: one dense ``rotate_in`` block ``B [1, in, in]`` plus ``dora`` ``f = boft_s``."""

    peft_type = "BOFT"
    config_class = BOFTConfig
    tuner_module = "onnx_peft.tuners.boft"
    tensor_names = ("boft_R", "boft_s")
    layer_attrs = ("boft_R", "boft_s")

    def features(self, config, module, parts):
        rot, scale = self._checked(module, parts)
        return int(rot.shape[1] * rot.shape[2]), int(scale.shape[0])

    @staticmethod
    def _checked(module: str, parts: Any) -> tuple[Any, Any]:
        rot, scale = parts["boft_R"], parts["boft_s"]
        if len(rot.shape) != 4 or rot.shape[2] != rot.shape[3] or len(scale.shape) != 2 or scale.shape[1] != 1:
            raise IncompatibleAdapterError(
                f"module {module}: BOFT tensors boft_R {list(rot.shape)} and boft_s {list(scale.shape)} are not "
                "[m, D, b, b] and [out, 1]; only linear layers can be inserted or converted")
        return rot, scale

    def merged_weight(self, config, module, weight, bias, parts, shared):
        rot, scale = self._checked(module, parts)
        if rot.shape[1] * rot.shape[2] != weight.shape[1] or scale.shape[0] != weight.shape[0]:
            raise IncompatibleAdapterError(
                f"module {module}: BOFT tensors {list(rot.shape)}/{list(scale.shape)} do not fit a weight of shape "
                f"{list(weight.shape)}; the adapter belongs to another base model")
        rot, scale = (t.astype(weight.dtype) if is_numpy(t) else t.to(weight.dtype) for t in (rot, scale))
        return (weight @ butterfly_matrix(boft_blocks(rot)).swapaxes(0, 1)) * scale, bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        rot, scale = (np.asarray(t, np.float64) for t in self._checked(module, parts))
        butterfly = butterfly_matrix(boft_blocks(rot))
        blocks = diagonal_blocks(butterfly, int(rot.shape[-1]))
        return {"rotate_in": {"rotation.weight": np.ascontiguousarray(blocks, np.float32)},
                "dora": {"dora_factor": np.ascontiguousarray(scale.reshape(-1), np.float32)}}
