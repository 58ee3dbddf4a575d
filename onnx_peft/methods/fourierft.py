"""FourierFT: the config and the math, torch-free.

FourierFT learns ``n`` spectral coefficients per layer at fixed random frequencies and adds
their inverse 2-D Fourier transform to the weight ``W [out, in]``::

    S = zeros(out, in);  S[rows, cols] = spectrum          spectrum: [n], stored by PEFT
    delta_weight = Re(ifft2(S)) * scaling                  [out, in]
    y = x W^T + b + x delta_weight^T

``(rows, cols)`` are the first ``n`` entries of ``torch.randperm(out * in)`` seeded with
``random_loc_seed``; PEFT does not store them, so :func:`frequency_indices` replays that
permutation bit for bit in numpy. Unmerged in ONNX, the delta is a ``dense`` branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from ..config import AdapterConfig, check_scale, register_config
from ..errors import AdapterConfigError, IncompatibleAdapterError
from ..targets import pattern_value
from .base import Method, as_float32, register_method

_BIAS_CHOICES = ("none", "all", "fourier_only")
# torch.randperm on CPU shuffles in place with 32-bit draws below this size (Fisher-Yates,
# replayed here); above it, it uses another algorithm that needs all out * in draws.
_RANDPERM_SMALL = (2**32 - 1) // 20


@register_config
@dataclass
class FourierFTConfig(AdapterConfig):
    """PEFT's FourierFTConfig: same field names, same defaults."""

    peft_type = "FOURIERFT"

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int | None = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False

    def validate(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (set, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        self.n_frequency_pattern = dict(self.n_frequency_pattern or {})
        for where, n in [("n_frequency", self.n_frequency), *(
                (f"n_frequency_pattern[{k!r}]", v) for k, v in self.n_frequency_pattern.items())]:
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise AdapterConfigError(f"FourierFTConfig.{where} must be a positive integer, got {n!r}")
        check_scale(self.scaling, "FourierFTConfig.scaling")
        seed = self.random_loc_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise AdapterConfigError(
                f"FourierFTConfig.random_loc_seed must be a non-negative integer (it places the frequencies), "
                f"got {seed!r}")
        if self.bias not in _BIAS_CHOICES:
            raise AdapterConfigError(f"FourierFTConfig.bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise AdapterConfigError(
                "FourierFTConfig.layers_to_transform cannot be used when target_modules is a regex string")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise AdapterConfigError(
                "FourierFTConfig.layers_pattern cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise AdapterConfigError("FourierFTConfig.layers_pattern needs layers_to_transform")

    def n_frequency_for(self, module_path: str) -> int:
        return int(pattern_value(self.n_frequency_pattern, module_path, self.n_frequency))


@lru_cache(maxsize=256)
def frequency_indices(out_features: int, in_features: int, n_frequency: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)``, each ``[n]``: where the spectrum sits in the ``[out, in]`` grid.

    The first ``n`` entries of ``torch.randperm(out * in, generator=manual_seed(seed))``:
    torch's CPU generator is the standard MT19937 (numpy's legacy seeding gives the same
    stream) and its Fisher-Yates step ``i`` swaps ``perm[i]`` with ``perm[i + draw_i % (size - i)]``,
    so the first ``n`` steps fix the first ``n`` entries; a dict holds the few touched slots.
    """
    size = out_features * in_features
    if not 0 < n_frequency <= size:
        raise AdapterConfigError(
            f"FourierFT n_frequency={n_frequency} must be in [1, out * in = {size}] for a {out_features}x{in_features} layer")
    if size >= _RANDPERM_SMALL:
        raise IncompatibleAdapterError(
            f"FourierFT on a {out_features}x{in_features} layer ({size} weights) is not supported: torch places "
            f"frequencies there with an algorithm onnx-peft does not replay (limit {_RANDPERM_SMALL} weights)")
    draws = np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2**32, size=min(n_frequency, size - 1), dtype=np.uint64)
    swapped: dict[int, int] = {}
    flat = np.empty(n_frequency, np.int64)
    for i in range(n_frequency):
        if i < size - 1:
            j = i + int(draws[i]) % (size - i)
            swapped[i], swapped[j] = swapped.get(j, j), swapped.get(i, i)
        flat[i] = swapped.get(i, i)
    rows, cols = flat // in_features, flat % in_features
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def fourier_delta_weight(spectrum: Any, out_features: int, in_features: int, scaling: float, seed: int) -> Any:
    """``Re(ifft2(S)) * scaling`` ``[out, in]`` for ``spectrum [n]``; numpy (float32 result) or a
    torch tensor (result in its dtype and device).

    numpy (convert, insert, merge) runs the FFT itself, ``O(out in log)``. torch (the tuner, on
    any device, with autograd) uses that ``S`` is non-zero at ``n`` points only, so the inverse DFT
    is two rank-``n`` products (equal to the FFT to ~1e-9)::

        Re(ifft2(S))[p, q] = 1/(out in) sum_k s_k cos(2 pi (p r_k / out + q c_k / in))
                           = (Cr diag(s) Cc^T - Sr diag(s) Sc^T)[p, q] / (out in)

    with ``Cr[p, k] = cos(2 pi p r_k / out)`` ``[out, n]``, ``Sr`` its sine, ``Cc``/``Sc`` ``[in, n]``.
    """
    rows, cols = frequency_indices(out_features, in_features, int(spectrum.shape[0]), seed)
    if isinstance(spectrum, np.ndarray):
        dense = np.zeros((out_features, in_features), np.complex128)
        dense[rows, cols] = spectrum.astype(np.float64)
        return as_float32(np.fft.ifft2(dense).real * scaling)
    # integer phases modulo the period keep the angles small and exact
    row_phase = 2 * np.pi * ((np.arange(out_features)[:, None] * rows[None, :]) % out_features) / out_features
    col_phase = 2 * np.pi * ((np.arange(in_features)[:, None] * cols[None, :]) % in_features) / in_features
    norm = scaling / (out_features * in_features)
    bases = (np.cos(row_phase) * norm, np.sin(row_phase) * norm, np.cos(col_phase), np.sin(col_phase))
    cos_r, sin_r, cos_c, sin_c = (spectrum.new_tensor(b) for b in bases)  # torch: same dtype and device
    return (cos_r * spectrum) @ cos_c.T - (sin_r * spectrum) @ sin_c.T


@register_method
class FourierFTMethod(Method):
    """FourierFT on Linear and Conv1D: the dense delta as a ``dense`` slot ``D = delta^T [in, out]``."""

    peft_type = "FOURIERFT"
    config_class = FourierFTConfig
    tuner_module = "onnx_peft.tuners.fourierft"
    tensor_names = ("fourierft_spectrum",)
    required_tensors = ("fourierft_spectrum",)
    layer_attrs = ("fourierft_spectrum",)

    def spectrum(self, config: FourierFTConfig, module: str, parts: Mapping[str, Any]) -> Any:
        """``module``'s spectrum ``[n]``, checked against the config's n_frequency."""
        spectrum = parts["fourierft_spectrum"]
        n = config.n_frequency_for(module)
        if tuple(spectrum.shape) != (n,):
            raise IncompatibleAdapterError(
                f"module {module} has fourierft_spectrum of shape {list(spectrum.shape)} but the config says "
                f"n_frequency={n}; the adapter_config.json does not belong to these weights")
        return spectrum

    def delta_weight(self, config: FourierFTConfig, module: str, out_features: int, in_features: int,
                     parts: Mapping[str, Any]) -> Any:
        """``delta_weight [out, in]`` of ``module`` (numpy or torch, like its spectrum)."""
        return fourier_delta_weight(self.spectrum(config, module, parts), out_features, in_features,
                                    float(config.scaling), int(config.random_loc_seed))

    def merged_weight(self, config, module, weight, bias, parts, shared):
        out_features, in_features = weight.shape
        return weight + self.delta_weight(config, module, out_features, in_features, parts), bias

    def slot_tensors(self, config, module, parts, shared, base_weight):
        out_features, in_features = base_weight().shape
        delta = self.delta_weight(config, module, out_features, in_features,
                                  {"fourierft_spectrum": as_float32(parts["fourierft_spectrum"])})
        return {"dense": {"delta.weight": np.ascontiguousarray(delta.T)}}
