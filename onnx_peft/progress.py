"""tqdm progress bars that appear on a TTY and vanish with ``--quiet`` (ONNX_PEFT_QUIET=1)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("ONNX_PEFT_QUIET", "") not in ("", "0")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs: Any) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar unless quiet or not on a TTY."""
    from tqdm.auto import tqdm

    disable = quiet() or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, **kwargs)


@contextlib.contextmanager
def quieted(flag: bool = True) -> Iterator[None]:
    """Inside, :func:`quiet` is true when ``flag`` is (restored afterwards)."""
    if not flag or quiet():
        yield
        return
    os.environ["ONNX_PEFT_QUIET"] = "1"
    try:
        yield
    finally:
        os.environ.pop("ONNX_PEFT_QUIET", None)


F = TypeVar("F", bound=Callable[..., Any])


def honours_quiet(fn: F) -> F:
    """Decorate a public function with a ``quiet`` argument: ``quiet=True`` also quiets the bars and
    reports of everything it calls (transformers' load report and weight-loading bar included)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with quieted(bool(signature.bind_partial(*args, **kwargs).arguments.get("quiet", False))):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def transformers_quiet(report: bool = True) -> Iterator[None]:
    """Around ``from_pretrained``: no "Loading weights" bar when quiet, and no load report when quiet
    or ``report`` is False (a head the caller expects to be new is not news)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if quiet() or not report:
        hf_logging.set_verbosity_error()
    if quiet():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
