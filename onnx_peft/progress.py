"""tqdm progress bars that appear on a TTY and vanish with ``--quiet`` (ONNX_PEFT_QUIET=1)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("ONNX_PEFT_QUIET", "") not in ("", "0")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar unless quiet or not on a TTY."""
    from tqdm.auto import tqdm

    disable = quiet() or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, **kwargs)
