"""Read ``.npz`` adapter files without trusting them.

An npz is a zip of ``.npy`` members, and a zip member may be deflated: 4 MB on disk can claim a
4 GiB tensor, and ``numpy.load`` decompresses it whole before anyone sees its shape. So we read
the zip directory and every member's ``.npy`` header first (a few hundred bytes each) and refuse,
before any tensor data is inflated:

* more than ``MAX_MEMBERS`` members, or a zip directory over ``MAX_DIRECTORY_BYTES``;
* members that are not ``.npy`` arrays, pickles/object, string (except the fingerprint entry),
  structured or complex dtypes;
* a ``.npy`` header whose shape x itemsize disagrees with the member's size in the zip directory;
* a deflated member that expands more than ``MAX_INFLATE_RATIO`` times (and past ``INFLATE_FLOOR``):
  real weights hardly compress, so only a bomb (or an all-zero adapter) does that;
* (when given) what a ``check(header)`` callback refuses, e.g. the model's contract.

Big-endian arrays are converted to native byte order: ONNX Runtime reads raw bytes.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .errors import CheckpointError, OnnxPeftError

MAX_MEMBERS = 100_000
MAX_DIRECTORY_BYTES = 64 * 2**20
MAX_INFLATE_RATIO = 100
INFLATE_FLOOR = 64 * 2**20
_TENSOR_KINDS = "fiub"  # float, signed/unsigned int, bool

Header = dict[str, tuple[tuple[int, ...], str]]


def read_npz(path: str | os.PathLike, string_keys: tuple[str, ...] = (),
             check: Callable[[Header], None] | None = None) -> dict[str, np.ndarray]:
    """Every member of an npz as a native-byte-order array, checked as the module docstring says.

    ``string_keys``: members allowed to hold a small string (the fingerprint). ``check`` sees
    ``{name: (shape, dtype name)}`` of the tensors before any data is read and may raise.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            _check_directory(path, handle)
            with zipfile.ZipFile(handle) as archive:
                infos = _members(path, archive)
                headers = {name: _npy_header(path, archive, info, name in string_keys)
                           for name, info in infos.items()}
                if check is not None:
                    check({n: (shape, dtype.name) for n, (shape, dtype) in headers.items() if n not in string_keys})
                return {name: _read_member(path, archive, info) for name, info in infos.items()}
    except OnnxPeftError:  # ours, or what ``check`` raised
        raise
    except Exception as exc:  # zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError
        raise CheckpointError(f"{path}: not a readable .npz adapter file ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from exc


def _check_directory(path: Path, handle) -> None:
    """Cap the zip's member count and directory size before zipfile parses the directory."""
    find_end = getattr(zipfile, "_EndRecData", None)  # stdlib's (private, stable since Python 2) zip64-aware reader
    if find_end is None:  # pragma: no cover - a future Python without it: zipfile's own limits only
        return
    end = find_end(handle)  # the end-of-directory record, or None
    if end is None:
        raise CheckpointError(f"{path}: not a zip file, so not an .npz adapter file")
    count, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if count > MAX_MEMBERS or size > MAX_DIRECTORY_BYTES:
        raise CheckpointError(f"{path}: npz lists {count} members in a {size}-byte directory (limits "
                              f"{MAX_MEMBERS}, {MAX_DIRECTORY_BYTES}); this is not an adapter file")
    handle.seek(0)


def _members(path: Path, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            raise CheckpointError(f"{path}: member {info.filename[:80]!r} is not a .npy array; an .npz adapter "
                                  "holds only arrays (numpy.savez)")
        name = info.filename[:-4]
        if name in members:
            raise CheckpointError(f"{path}: member {info.filename[:80]!r} appears twice")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(
                INFLATE_FLOOR, MAX_INFLATE_RATIO * info.compress_size):
            raise CheckpointError(
                f"{path}: member {name!r} inflates {info.compress_size} bytes to {info.file_size}; refused as a "
                "zip bomb (weights do not compress that well); save the adapter with numpy.savez, uncompressed")
        members[name] = info
    return members


def _npy_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                string_ok: bool) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a member's .npy header, checked against its size in the zip directory."""
    name = info.filename[:-4]
    with archive.open(info) as member:
        version = npy_format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(member)
        else:
            raise CheckpointError(f"{path}: member {name!r} uses .npy format {version}; save it with numpy.savez")
        header_bytes = member.tell()
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise CheckpointError(f"{path}: member {name!r} has dtype {dtype}; object, pickled and structured arrays "
                              "are refused")
    if dtype.kind not in _TENSOR_KINDS and not (string_ok and dtype.kind in "US" and dtype.itemsize <= 4096):
        raise CheckpointError(f"{path}: member {name!r} has dtype {dtype}; adapter tensors are float, int or bool")
    numel = 1
    for dim in shape:
        numel *= dim
    if header_bytes + numel * dtype.itemsize != info.file_size:
        raise CheckpointError(f"{path}: member {name!r} claims shape {list(shape)} {dtype} "
                              f"({numel * dtype.itemsize} bytes) but holds {info.file_size - header_bytes}; "
                              "the file is corrupt")
    return tuple(int(d) for d in shape), dtype


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as member:
        array = npy_format.read_array(member, allow_pickle=False)
    if array.dtype.byteorder not in ("=", "|"):  # big-endian from another machine (or a fuzzer)
        array = array.astype(array.dtype.newbyteorder("="))
    return array
