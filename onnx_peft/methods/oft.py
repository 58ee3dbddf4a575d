"""OFT (orthogonal finetuning): the config and the math, torch-free.

OFT rotates a Linear's input with a block-diagonal orthogonal matrix ``R`` and leaves ``W``
frozen::

    y = (x R) W^T + bias            R = diag(R_1, ..., R_n),  R_k [b, b],  n * b = in
    W' = W R^T                      (the merged layer; the bias is unchanged)

Each block comes from ``b (b - 1) / 2`` trained numbers (PEFT's ``oft_R.weight [n, b(b-1)/2]``,
one row per block, or one shared row with ``block_share``): they fill the strict upper triangle
of a skew-symmetric ``Q`` (``Q^T = -Q``) and the Cayley transform turns ``Q`` into a rotation::

    R_k = (I + Q)^-1 (I - Q)                          exact (use_cayley_neumann=False)
    R_k = I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^(t-1)     PEFT's t-term Neumann series (default)

COFT (``coft``) first clips each row's skew matrix to Frobenius norm ``eps / sqrt(n_rows)``.
The helpers accept numpy arrays and torch tensors alike: the torch layer, MergeAdapters and
convert-adapters all call them. BOFT (methods/boft.py) reuses the Cayley transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import AdapterConfig, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from .base import Method, register_method


@register_config
@dataclass
class OFTConfig(AdapterConfig):
    """PEFT's OFTConfig: same field names, same defaults. Give ``r`` (blocks per layer) or
    ``oft_block_size``, not both; the other is ``in_features`` divided by it."""

    peft_type = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0   # PEFT 0.21 builds its dropout layer but never applies it; nor do we
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False  # nn.Linear only: PEFT resets it to False there
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        for name in ("r", "oft_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise AdapterConfigError(f"OFTConfig.{name} must be a non-negative integer, got {value!r}")
        if (self.r != 0) == (self.oft_block_size != 0):
            raise AdapterConfigError(
                f"OFTConfig: set exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) to a "
                "non-zero value (r x oft_block_size = in_features); e.g. r=0, oft_block_size=32")
        if self.bias not in ("none", "all", "oft_only"):
            raise AdapterConfigError(f"OFTConfig.bias must be 'none', 'all' or 'oft_only', got {self.bias!r}")
        if not 0.0 <= float(self.module_dropout) < 1.0:
            raise AdapterConfigError(f"OFTConfig.module_dropout must be in [0, 1), got {self.module_dropout!r}")
        if not float(self.eps) > 0.0:
            raise AdapterConfigError(f"OFTConfig.eps must be positive, got {self.eps!r}")
        terms = self.num_cayley_neumann_terms
        if not isinstance(terms, int) or isinstance(terms, bool) or terms < 1:
            raise AdapterConfigError(f"OFTConfig.num_cayley_neumann_terms must be an integer >= 1, got {terms!r}")
        if self.init_weights not in (True, False):
            raise AdapterConfigError(f"OFTConfig.init_weights must be True or False, got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("OFTConfig.layers_pattern needs layers_to_transform")


# -- shapes ------------------------------------------------------------------------------------
def nearest_divisor(in_features: int, value: int) -> int:
    """PEFT's fix for an ``r``/``oft_block_size`` that does not divide ``in_features``: the
    closest divisor (the lower one on a tie), or ``in_features`` when ``value`` exceeds it."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def oft_layout(config: OFTConfig, in_features: int) -> tuple[int, int]:
    """``(n_blocks, block_size)`` of a layer with ``in_features`` inputs under ``config``
    (a non-dividing setting is moved to the nearest divisor, as PEFT does)."""
    if config.r == 0:
        block = config.oft_block_size
        if in_features % block != 0 or block > in_features:
            block = nearest_divisor(in_features, block)
        return in_features // block, block
    r = config.r
    if in_features % r != 0 or r > in_features:
        r = nearest_divisor(in_features, r)
    return r, in_features // r


def block_size_of(n_elements: int) -> int:
    """Block size ``b`` with ``b (b - 1) / 2 = n_elements`` (the width of ``oft_R.weight``)."""
    b = int(round((1 + math.sqrt(1 + 8 * n_elements)) / 2))
    if b * (b - 1) // 2 != n_elements:
        raise IncompatibleAdapterError(
            f"OFT tensor of width {n_elements} is not b(b-1)/2 for any block size b; not an OFT weight")
    return b


# -- array helpers (numpy or torch) ------------------------------------------------------------
def is_numpy(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def eye_like(x: Any, n: int) -> Any:
    """``I [n, n]`` with ``x``'s array type, dtype and device."""
    if is_numpy(x):
        return np.eye(n, dtype=x.dtype)
    import torch

    return torch.eye(n, dtype=x.dtype, device=x.device)


def _solve(a: Any, b: Any) -> Any:
    if is_numpy(a):
        return np.linalg.solve(a, b)
    import torch

    return torch.linalg.solve(a, b)


def skew_symmetric(vec: Any, block_size: int) -> Any:
    """``vec [n, b(b-1)/2]`` -> ``Q [n, b, b]``: vec fills the strict upper triangle row by
    row (PEFT's order), the lower triangle is its negative."""
    rows, cols = np.triu_indices(block_size, 1)
    n = vec.shape[0]
    if is_numpy(vec):
        upper = np.zeros((n, block_size, block_size), dtype=vec.dtype)
    else:
        upper = vec.new_zeros((n, block_size, block_size))
    upper[:, rows, cols] = vec
    return upper - upper.swapaxes(-1, -2)


def cayley(skew: Any, neumann_terms: int | None = None) -> Any:
    """Rotations from skew-symmetric ``Q [n, b, b]``: ``(I + Q)^-1 (I - Q)`` exactly, or PEFT's
    Neumann series with ``neumann_terms`` terms (``I + 2Q + 2Q^2 + ... + Q^last``; one term is
    ``I``, two are ``I + 2Q``, three and four both end with ``Q^3``, as PEFT computes them)."""
    eye = eye_like(skew, skew.shape[-1])
    if neumann_terms is None:
        return _solve(eye + skew, eye - skew)  # I + Q and I - Q commute
    result = eye + 0 * skew
    if neumann_terms > 1:
        result = result + 2 * skew
    if neumann_terms > 2:
        power = skew @ skew
        result = result + 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ skew
            result = result + 2 * power
        result = result + power @ skew
    return result


def coft_project(vec: Any, eps: float) -> Any:
    """COFT: scale each row so its skew matrix has Frobenius norm at most
    ``eps / sqrt(n_rows)`` (``||Q||_F = sqrt(2) ||row||``). ``vec [n, m]`` -> ``[n, m]``."""
    limit = eps / math.sqrt(vec.shape[0])
    norm = (2 * (vec * vec).sum(-1)) ** 0.5                                  # [n]
    return vec * (limit / norm.clip(min=limit))[:, None]


def neumann_terms(config: OFTConfig) -> int | None:
    """The series length :func:`cayley` uses under ``config`` (None: the exact transform)."""
    return config.num_cayley_neumann_terms if config.use_cayley_neumann else None


def rotation_blocks(vec: Any, n_blocks: int, terms: int | None) -> Any:
    """``vec [rows, b(b-1)/2]`` -> rotations ``R [n_blocks, b, b]`` (one shared row is
    repeated ``n_blocks`` times). No COFT clipping: see :func:`oft_blocks`."""
    blocks = cayley(skew_symmetric(vec, block_size_of(vec.shape[-1])), terms)
    if blocks.shape[0] == n_blocks:
        return blocks
    if blocks.shape[0] != 1:
        raise IncompatibleAdapterError(f"OFT weight has {blocks.shape[0]} blocks, the layer needs {n_blocks}")
    return blocks[[0] * n_blocks]


def oft_blocks(config: OFTConfig, vec: Any, n_blocks: int) -> Any:
    """PEFT's ``oft_R.weight [rows, b(b-1)/2]`` -> ``R [n_blocks, b, b]`` under ``config``
    (COFT-clipped first when ``config.coft``)."""
    if config.coft:
        vec = coft_project(vec, config.eps)
    return rotation_blocks(vec, n_blocks, neumann_terms(config))


def rotate_weight(weight: Any, blocks: Any) -> Any:
    """``W R^T`` for ``W [out, in]`` and block-diagonal ``R`` given as ``blocks [n, b, b]``:
    the Linear that computes ``(x R) W^T``."""
    out_features, in_features = weight.shape
    n, b, _ = blocks.shape
    per_block = weight.reshape(out_features, n, b).swapaxes(0, 1)          # [n, out, b]
    return (per_block @ blocks.swapaxes(-1, -2)).swapaxes(0, 1).reshape(out_features, in_features)


# -- the method seam ---------------------------------------------------------------------------
@register_method
class OFTMethod(Method):
    """OFT on nn.Linear: ``rotate_in`` slots ``R [n_blocks, b, b]``, the solved rotation blocks."""

    peft_type = "OFT"
    config_class = OFTConfig
    tuner_module = "onnx_peft.tuners.oft"
    tensor_names = ("oft_R.weight",)
    layer_attrs = ("oft_R",)

    @staticmethod
    def _vec(module: str, parts: Any) -> Any:
        vec = parts["oft_R.weight"]
        if len(vec.shape) != 2:
            raise IncompatibleAdapterError(
                f"module {module}: oft_R.weight has shape {list(vec.shape)}, expected [blocks, b(b-1)/2]; "
                "adapters from PEFT < 0.14 use another layout (retrain them with a current PEFT)")
        return vec

    def _n_blocks(self, config: OFTConfig, module: str, vec: Any, in_features: int) -> int:
        b = block_size_of(vec.shape[-1])
        if in_features % b != 0 or (not config.block_share and vec.shape[0] * b != in_features):
            raise IncompatibleAdapterError(
                f"module {module}: OFT weight {list(vec.shape)} (block size {b}) does not fit a layer with "
                f"{in_features} inputs; the adapter belongs to another base model")
        return in_features // b

    def merged_weight(self, config, module, weight, bias, parts, shared):
        vec = self._vec(module, parts)
        vec = vec.astype(weight.dtype) if is_numpy(vec) else vec.to(weight.dtype)
        blocks = oft_blocks(config, vec, self._n_blocks(config, module, vec, weight.shape[1]))
        return rotate_weight(weight, blocks), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        vec = np.asarray(self._vec(module, parts), np.float64)
        b = block_size_of(vec.shape[-1])
        in_features = int(base_weight().shape[1]) if config.block_share else vec.shape[0] * b
        blocks = oft_blocks(config, vec, self._n_blocks(config, module, vec, in_features))
        return {"rotate_in": {"rotation.weight": np.ascontiguousarray(blocks, np.float32)}}
