"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import OnnxPeftError
from ..formats import ADAPTER_FILE_SUFFIXES


def add_overwrite(parser: argparse.ArgumentParser, what: str = "output folder") -> None:
    """``--overwrite``: the one way to write into a non-empty output folder (replaced whole)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing {what} whole (default: refuse a non-empty one)")


def session_options(args: argparse.Namespace):
    """ONNX Runtime session options for a CLI session: ORT logs its own copy of an error before
    raising it (and we print the error once), so its log is kept to fatal errors unless --debug."""
    from ..errors import require_onnxruntime

    options = require_onnxruntime().SessionOptions()
    options.log_severity_level = 2 if getattr(args, "debug", False) else 4
    return options


def parse_named_paths(values: list[str]) -> dict[str, str]:
    """``["a=dir1", "x/dir2", "f.onnx_adapter"]`` -> ``{"a": "dir1", "dir2": "x/dir2", "f": ...}``.

    Without ``NAME=`` the name is the folder name (or the adapter file's stem); a ``=`` inside
    a path is not taken for a name. Two entries with one name are refused."""
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or "/" in name or "\\" in name:
            path = value
            plain = Path(value.rstrip("/\\"))
            name = plain.stem if plain.suffix in ADAPTER_FILE_SUFFIXES else plain.name
        if not name or not path:
            raise OnnxPeftError(f"--adapter {value!r}: expected [NAME=]PATH")
        if name in named:
            raise OnnxPeftError(f"--adapter {value!r}: adapter name {name!r} is used twice; write NAME=PATH")
        named[name] = path
    return named
