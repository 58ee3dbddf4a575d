"""Running torch.onnx: the dynamo exporter with a checked TorchScript fallback, kept quiet.

Why a module of its own: the exporter is the one step that talks to torch.onnx, and its
fallback must never write a model whose outputs differ from PyTorch (:func:`check_outputs`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ExportError, OnnxPeftError, require_torch
from .output import MODEL_FILE
from .spec import ExportSpec, _task_module_class

log = logging.getLogger(__package__)  # one logger for the export package: "onnx_peft.export"


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# Loggers that narrate every rewrite at INFO; our own log line says what matters.
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch._dynamo")


@contextlib.contextmanager
def _exporter_output() -> Iterator[None]:
    """Keep torch.onnx's step prints (stdout), warnings and INFO logs out of the user's way.

    The prints go to our debug log; loggers are restored afterwards.
    """
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with _quiet_warnings(), contextlib.redirect_stdout(buffer):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if buffer.getvalue():
            log.debug(buffer.getvalue().rstrip())


def weight_bytes(module: Any) -> int:
    """Bytes of all parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def run_exporter(model: Any, spec: ExportSpec, path: Path, opset: int | None = None,
                 external_data: bool = False) -> str:
    """Trace ``model`` with ``spec`` and write ``path``; returns "dynamo" or "torchscript"."""
    torch = require_torch()
    from ..graph.io import save_model

    module = _task_module_class()(model, spec.forward)
    common = dict(input_names=spec.input_names, output_names=spec.output_names, opset_version=opset)
    try:
        with _exporter_output(), torch.no_grad():
            program = torch.onnx.export(module, spec.args, dynamo=True, optimize=True, verbose=False,
                                        dynamic_shapes=spec.dynamic_shapes(), **common)
        save_model(program.model, path, external_data=external_data)
        return "dynamo"
    except OnnxPeftError:
        raise
    except Exception as exc:
        first = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log.warning("torch.onnx dynamo export failed (%s); falling back to the TorchScript exporter", first)
    try:
        import onnx_ir as ir

        with _exporter_output(), torch.no_grad(), tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            raw = Path(tmp) / MODEL_FILE
            torch.onnx.export(module, spec.args, str(raw), dynamo=False, dynamic_axes=spec.dynamic_axes(),
                              **common)
            save_model(ir.load(raw), path, external_data=external_data)
    except Exception as exc:
        raise ExportError(
            f"exporting {type(model).__name__} failed with both torch.onnx exporters "
            f"(dynamo: {first}; TorchScript: {type(exc).__name__}: {exc}); try another task or "
            "transformers version, or run with --debug for the traceback"
        ) from exc
    diff = check_outputs(module, spec, path)
    atol = _FALLBACK_CHECK_ATOL.get(str(next(model.parameters()).dtype), 1e-4)
    if diff is not None and not diff <= atol:
        raise ExportError(
            f"the TorchScript exporter (used because dynamo failed: {first}) wrote a model whose "
            f"outputs differ from PyTorch by {diff:.3g}; it cannot export {type(model).__name__} "
            "with this transformers version. Fix the dynamo failure (--debug shows it)"
        )
    return "torchscript"


# A gross-error gate for the TorchScript fallback (which silently mis-traces some transformers
# 5.x models), not a parity claim: tests hold dynamo exports to 1e-5.
_FALLBACK_CHECK_ATOL = {"torch.float32": 1e-4, "torch.float16": 1e-2, "torch.bfloat16": 1e-1}


def check_outputs(module: Any, spec: ExportSpec, path: Path) -> float | None:
    """Max abs difference between ONNX Runtime (CPU) and PyTorch on the traced example inputs.

    None when onnxruntime is not installed (the check is then skipped with a warning).
    """
    torch = require_torch()
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed; %s is not checked against PyTorch", path)
        return None
    import numpy as np

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no "initializer appears in graph inputs" warnings
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {n: a.numpy() for n, a in zip(spec.input_names, spec.args) if n in names}
    got = session.run(spec.output_names, feeds)
    with torch.no_grad():
        want = spec.forward(module._wrapped, *spec.args)
    return max(float(np.abs(g.astype(np.float32) - w.float().numpy()).max()) for g, w in zip(got, want))


def _io_info(model_path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)

    def describe(values: Any) -> list[dict]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            out.append({"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                        "shape": shape})
        return out

    initializers = {i.name for i in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    return describe(inputs), describe(proto.graph.output)

