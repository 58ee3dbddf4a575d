"""The runtime's small types: input specs, a loaded adapter, a banks snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..prompt_feeds import PromptAdapter

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}
_SLOT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _numpy_dtype(ort_type: str) -> np.dtype | None:
    if ort_type == "tensor(bfloat16)":
        try:
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        except ImportError:  # pragma: no cover
            return None
    found = _ORT_TO_NUMPY.get(ort_type)
    return np.dtype(found) if found is not None else None


@dataclass
class _InputSpec:
    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...]
    required: bool


@dataclass
class _Loaded:
    """One loaded adapter: host arrays (bank building) and device OrtValues (direct feeds)."""

    name: str
    source: str
    arrays: dict[str, np.ndarray]
    values: dict[str, Any]
    row: int = 0  # bank row on MultiAdapter models; stable while loaded
    in_use: int = 0
    unloading: bool = False
    prompt: PromptAdapter | None = None  # a prompt-learning adapter (prompt_feeds.py)


@dataclass(frozen=True)
class _Banks:
    """An immutable snapshot: adapter name -> row id, and one OrtValue per bank input."""

    ids: Mapping[str, int]
    values: Mapping[str, Any]
    size: int
