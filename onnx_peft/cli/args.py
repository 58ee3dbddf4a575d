"""Argument helpers shared by subcommands."""

from __future__ import annotations

from pathlib import Path

from ..errors import OnnxPeftError
from ..formats import ADAPTER_FILE_SUFFIXES


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
