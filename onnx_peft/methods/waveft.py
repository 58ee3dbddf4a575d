"""WaveFT (wavelet fine-tuning): the config and the math, torch-free.

WaveFT learns ``n`` wavelet coefficients per layer at fixed random positions and adds their
one-level inverse 2-D wavelet transform to the weight ``W [out, in]``::

    S [H, W'] = zeros, S[rows + t, cols + l] = spectrum     H, W' = out, in + the filter's reach
    (cA, cH, cV, cD) = the four [H/2, W'/2] quadrants of S  (even sizes; the layer centred)
    delta = crop_centre( idwt2(cA, (cH, cV, cD)) ) * scaling          [out, in]
    y = x W^T + b + x delta^T

``(rows, cols)`` are the first ``n`` of ``torch.randperm(out * in)`` seeded with
``random_loc_seed`` (FourierFT's positions, replayed by :func:`frequency_indices`). One level of
the inverse transform is separable: with ``U_f [2 H2 + L - 2, H2]``, ``U_f[y, a] = f[y - 2a]``
(a transposed strided convolution with the ``L``-tap reconstruction filter ``f``), cropped by
``L - 2`` on each side::

    idwt2 = U_lo cA U_lo^T + U_hi cH U_lo^T + U_lo cV U_hi^T + U_hi cD U_hi^T

With ``use_idwt=False`` the spectrum is the delta itself (a sparse update). The filters of
Daubechies ``db1`` (Haar) to ``db10`` are computed here by spectral factorization; PEFT's
symlets and coiflets are refused. Unmerged in ONNX the delta is a ``dense`` branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from math import comb, sqrt
from typing import Any

import numpy as np

from ..config import AdapterConfig, check_scale, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from ..targets import pattern_value
from .base import Method, as_float32, register_method
from .fourierft import frequency_indices

SPECTRUM = "waveft_spectrum"
_BIAS_CHOICES = ("none", "all", "waveft_only")
WAVELETS = tuple(f"db{n}" for n in range(1, 11))


@register_config
@dataclass
class WaveFTConfig(AdapterConfig):
    """PEFT's WaveFTConfig: same field names, same defaults."""

    peft_type = "WAVEFT"

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    def validate(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        self.n_frequency_pattern = dict(self.n_frequency_pattern or {})
        for where, n in [("n_frequency", self.n_frequency), *(
                (f"n_frequency_pattern[{k!r}]", v) for k, v in self.n_frequency_pattern.items())]:
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise AdapterConfigError(f"WaveFTConfig.{where} must be a positive integer, got {n!r}")
        check_scale(self.scaling, "WaveFTConfig.scaling")
        if self.wavelet_family not in WAVELETS:
            raise AdapterConfigError(
                f"WaveFTConfig.wavelet_family={self.wavelet_family!r} is not supported by onnx-peft (it has "
                f"{', '.join(WAVELETS)}); train with one of those, or merge the adapter with PEFT first")
        seed = self.random_loc_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise AdapterConfigError(
                f"WaveFTConfig.random_loc_seed must be a non-negative integer (it places the coefficients), got {seed!r}")
        if self.bias not in _BIAS_CHOICES:
            raise AdapterConfigError(f"WaveFTConfig.bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise AdapterConfigError("WaveFTConfig.layers_to_transform cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise AdapterConfigError("WaveFTConfig.layers_pattern cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("WaveFTConfig.layers_pattern needs layers_to_transform")

    def n_frequency_for(self, module_path: str) -> int:
        """``n`` of a module (``proportional_parameters`` is resolved by the tuner, which sees
        every target; the spectrum's own length says it in a checkpoint)."""
        return int(pattern_value(self.n_frequency_pattern, module_path, self.n_frequency))


@lru_cache(maxsize=16)
def daubechies_filters(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(rec_lo, rec_hi)`` ``[2N]`` float64 of Daubechies ``dbN`` (PyWavelets' convention):
    the minimum-phase spectral factor of ``(1 + z)^N P(z)``, summing to sqrt(2);
    ``rec_hi[i] = (-1)^i rec_lo[L - 1 - i]``."""
    order = int(name[2:])
    # roots y of P(y) = sum_k C(N-1+k, k) y^k; y = (2 - z - 1/z) / 4 gives z, keep |z| < 1
    ys = np.roots([comb(order - 1 + k, k) for k in range(order)][::-1]) if order > 1 else []
    zs = [min(np.roots([1.0, -(2.0 - 4.0 * y), 1.0]), key=abs) for y in ys]
    lo = np.real(np.poly(np.concatenate([np.asarray(zs, complex), -np.ones(order)])))
    lo = lo / lo.sum() * sqrt(2.0)
    hi = lo[::-1] * (-1.0) ** np.arange(lo.size)
    return lo, hi


def _synthesis(filt: np.ndarray, half: int, crop: int, keep: int) -> np.ndarray:
    """``U [keep, half]``: upsample by 2 and convolve with ``filt``, rows ``crop .. crop + keep``."""
    taps = filt.size
    full = np.zeros((2 * half + taps - 2, half))
    for a in range(half):
        full[2 * a: 2 * a + taps, a] = filt
    return full[crop: crop + keep]


@lru_cache(maxsize=64)
def idwt_bases(out_features: int, in_features: int, wavelet: str) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray,
                                                                            np.ndarray, np.ndarray]:
    """PEFT's padding and the four synthesis matrices of a layer.

    Returns ``((H, W, row_offset, col_offset), R_lo, R_hi, C_lo, C_hi)``: the padded coefficient
    grid ``[H, W]`` and where the layer sits in it; ``R_* [out, H/2]``, ``C_* [in, W/2]`` with the
    reconstruction's own trim and PEFT's centre crop folded in, so that
    ``idwt2 = R_lo cA C_lo^T + R_hi cH C_lo^T + R_lo cV C_hi^T + R_hi cD C_hi^T``."""
    lo, hi = daubechies_filters(wavelet)
    taps = lo.size
    reduction = taps - 2
    grid = [out_features + reduction, in_features + reduction]
    grid = [g + g % 2 for g in grid]
    height, width = grid
    trim = (2 * taps - 3) // 2
    rows_left, cols_left = height - reduction, width - reduction       # after the transform's trim
    row_start = trim + (rows_left - out_features) // 2
    col_start = trim + (cols_left - in_features) // 2
    r_lo, r_hi = (_synthesis(f, height // 2, row_start, out_features) for f in (lo, hi))
    c_lo, c_hi = (_synthesis(f, width // 2, col_start, in_features) for f in (lo, hi))
    offsets = (height, width, (height - out_features) // 2, (width - in_features) // 2)
    return offsets, r_lo, r_hi, c_lo, c_hi


def wavelet_delta(spectrum: Any, out_features: int, in_features: int, config: WaveFTConfig) -> Any:
    """``delta [out, in]`` for ``spectrum [n]``: numpy gives float32; torch keeps the spectrum's
    dtype and device and stays differentiable."""
    rows, cols = frequency_indices(out_features, in_features, int(spectrum.shape[0]), int(config.random_loc_seed))
    numpy = isinstance(spectrum, np.ndarray)
    if numpy:
        spectrum = spectrum.astype(np.float64)
        zeros, as_array = (lambda shape: np.zeros(shape)), (lambda a: a)
    else:
        import torch

        zeros = lambda shape: torch.zeros(shape, dtype=spectrum.dtype, device=spectrum.device)  # noqa: E731
        as_array = lambda a: torch.as_tensor(a, dtype=spectrum.dtype, device=spectrum.device)  # noqa: E731
        rows, cols = (torch.tensor(i, device=spectrum.device) for i in (rows, cols))
    if not config.use_idwt:
        dense = zeros((out_features, in_features))
        dense[rows, cols] = spectrum
        delta = dense * config.scaling
    else:
        (height, width, top, left), r_lo, r_hi, c_lo, c_hi = idwt_bases(out_features, in_features,
                                                                         config.wavelet_family)
        grid = zeros((height, width))
        grid[rows + top, cols + left] = spectrum
        h2, w2 = height // 2, width // 2
        r_lo, r_hi, c_lo, c_hi = (as_array(m) for m in (r_lo, r_hi, c_lo, c_hi))
        delta = (r_lo @ grid[:h2, :w2] @ c_lo.T + r_hi @ grid[:h2, w2:] @ c_lo.T
                 + r_lo @ grid[h2:, :w2] @ c_hi.T + r_hi @ grid[h2:, w2:] @ c_hi.T) * config.scaling
    return as_float32(delta) if numpy else delta


@register_method
class WaveFTMethod(Method):
    """WaveFT on Linear and Conv1D: the dense delta as a ``dense`` slot ``D = delta^T [in, out]``."""

    peft_type = "WAVEFT"
    config_class = WaveFTConfig
    tuner_module = "onnx_peft.tuners.waveft"
    tensor_names = (SPECTRUM,)
    required_tensors = (SPECTRUM,)
    layer_attrs = (SPECTRUM,)

    def delta_weight(self, config: WaveFTConfig, module: str, out_features: int, in_features: int,
                     parts: Mapping[str, Any]) -> Any:
        """``delta [out, in]`` of ``module`` (numpy or torch, like its spectrum)."""
        spectrum = parts[SPECTRUM]
        n = int(spectrum.shape[0]) if spectrum.ndim == 1 else -1
        expected = None if config.proportional_parameters else config.n_frequency_for(module)
        if n <= 0 or n > out_features * in_features or expected not in (None, n):
            raise IncompatibleAdapterError(
                f"module {module} has waveft_spectrum of shape {list(spectrum.shape)} but the config says "
                f"n_frequency={expected} (at most {out_features * in_features} on this layer); the "
                "adapter_config.json or the base model does not belong to these weights")
        return wavelet_delta(spectrum, out_features, in_features, config)

    def merged_weight(self, config, module, weight, bias, parts, shared):
        out_features, in_features = weight.shape
        delta = self.delta_weight(config, module, out_features, in_features, parts)
        return weight + (delta if isinstance(weight, np.ndarray) else delta.to(weight.dtype)), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        out_features, in_features = base_weight().shape
        delta = self.delta_weight(config, module, out_features, in_features, {SPECTRUM: as_float32(parts[SPECTRUM])})
        return {"dense": {"delta.weight": np.ascontiguousarray(delta.T)}}
