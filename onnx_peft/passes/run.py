"""Running one pass from a file-level entry point, with our own errors on top."""

from __future__ import annotations

import os
from typing import Any

import onnx_ir as ir

from ..errors import OnnxPeftError


def run_pass(graph_pass: Any, model: ir.Model, source: str | os.PathLike) -> Any:
    """``graph_pass(model)``; a ``requires()`` refusal surfaces as our own error naming ``source``,
    not as onnx_ir's PreconditionError wrapper."""
    try:
        return graph_pass(model)
    except ir.passes.PreconditionError as exc:
        if isinstance(exc.__cause__, OnnxPeftError):
            raise type(exc.__cause__)(f"{source}: {exc.__cause__}") from exc.__cause__
        raise
