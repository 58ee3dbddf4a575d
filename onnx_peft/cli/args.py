"""Argument helpers shared by subcommands."""

from __future__ import annotations

from pathlib import Path

from ..errors import OnnxPeftError


def parse_named_paths(values: list[str]) -> dict[str, str]:
    """``["a=dir1", "dir2"]`` -> ``{"a": "dir1", "dir2": "dir2"}``; a name without ``NAME=`` is
    the folder or file stem. Two entries with one name are refused."""
    named: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            path, name = value, Path(value.rstrip("/")).stem
        if not name or not path:
            raise OnnxPeftError(f"--adapter {value!r}: expected [NAME=]PATH")
        if name in named:
            raise OnnxPeftError(f"--adapter {value!r}: adapter name {name!r} is used twice; write NAME=PATH")
        named[name] = path
    return named
