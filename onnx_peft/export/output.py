"""The export output folder: its file names, the checks before writing, and the atomic install.

Why: an export is written to a temporary folder beside ``output_dir`` and swapped in whole
(:mod:`onnx_peft.output_folder`), so the output appears only when complete and an earlier
export's files (data files, adapters) never linger next to a new ``model.onnx``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..formats import suffix_for
from ..output_folder import check_output_folder, install_folder, staging_folder  # noqa: F401 (re-exported)

MODEL_FILE = "model.onnx"
INFO_FILE = "export_info.json"
ADAPTER_DIR = "adapters"
ADAPTER_SUFFIX = suffix_for("onnx_adapter")
# Weights above this size go to model.onnx.data (protobuf refuses files over 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30


def _check_output_dir(output_dir: Path, inputs: Sequence[str | os.PathLike], overwrite: bool = False) -> None:
    """Refuse an output folder that is an input, holds one, or is not empty (unless ``overwrite``)."""
    check_output_folder(output_dir, inputs, overwrite)


def _install(tmp: Path, output_dir: Path) -> None:
    """Make the finished ``tmp`` folder become ``output_dir``, replacing it whole (two renames)."""
    install_folder(tmp, output_dir)


def _model_files(folder: Path) -> list[Path]:
    """``model.onnx`` and its data files (``model.onnx.data``, ``model.onnx.adapter.data``...)."""
    return [p for p in folder.glob(MODEL_FILE + "*") if p.name == MODEL_FILE or p.name.startswith(MODEL_FILE + ".")]
