"""The export output folder: its file names, the checks before writing, and the atomic install.

Why: an export is written to a temporary folder beside ``output_dir`` and moved in with one
rename per file, so the output appears only when complete and an earlier export's data files
never linger next to a new ``model.onnx``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import UnsafePathError
from ..formats import suffix_for

MODEL_FILE = "model.onnx"
INFO_FILE = "export_info.json"
ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = suffix_for("onnx_adapter")
# Weights above this size go to model.onnx.data (protobuf refuses files over 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30


def _check_output_dir(output_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    resolved = output_dir.resolve()
    for item in inputs:
        if Path(item).resolve() == resolved:
            raise UnsafePathError(f"{output_dir} is also an input folder; choose another output folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise UnsafePathError(f"{output_dir} exists and is not a folder; choose another output folder")


def _install(tmp: Path, output_dir: Path) -> None:
    """Move the finished files of ``tmp`` into ``output_dir``, each with one rename."""
    if not output_dir.exists():
        os.replace(tmp, output_dir)
        return
    fresh = {p.name for p in _model_files(tmp)}
    for stale in _model_files(output_dir):  # data files of an earlier export would mislead
        if stale.name not in fresh:
            os.remove(stale)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MODEL_FILE):  # model.onnx last
        target = output_dir / entry.name
        if entry.is_dir():
            target.mkdir(exist_ok=True)
            for child in entry.iterdir():
                os.replace(child, target / child.name)
        else:
            os.replace(entry, target)
    shutil.rmtree(tmp, ignore_errors=True)


def _model_files(folder: Path) -> list[Path]:
    """``model.onnx`` and its data files (``model.onnx.data``, ``model.onnx.adapter.data``...)."""
    return [p for p in folder.glob(MODEL_FILE + "*") if p.name == MODEL_FILE or p.name.startswith(MODEL_FILE + ".")]


