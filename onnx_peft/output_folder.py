"""Output folders: refuse to mix new files with old ones, and replace a folder whole.

Why: a deploy folder is read as one thing (``inspect`` lists every adapter file in it, the runtime
loads ``model.onnx`` with the data files beside it). Writing a new model into a folder that holds
an earlier run's files leaves adapters the new model cannot take. So every command that writes a
folder (export, extract, insert, multi-adapter, recipes) goes through :func:`writing_folder`:

* a non-empty output folder is refused unless ``overwrite=True`` (``--overwrite``);
* the new files are built in a temporary sibling (``safe_write.temp_name``) and swapped in with two
  renames when complete, so a failure leaves the old folder untouched and success leaves no
  stale file behind;
* an output folder that is, or holds, one of the inputs is refused (the swap would delete it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import UnsafePathError
from .safe_write import honour_umask, make_temp_dir, temp_name


def check_output_folder(folder: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                        overwrite: bool = False) -> Path:
    """Refuse ``folder`` as an output folder before any work starts; returns it as a Path.

    ``inputs``: files and folders the command reads; none may be ``folder`` or lie inside it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UnsafePathError(f"{folder} exists and is not a folder; choose another output folder")
    resolved = folder.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if source == resolved:
            raise UnsafePathError(f"output folder {folder} is also an input folder; choose another output folder")
        if resolved in source.parents:
            raise UnsafePathError(f"output folder {folder} holds the input {item}; choose another output folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UnsafePathError(f"output folder {folder} is not empty; choose a new folder, or pass "
                              "overwrite=True to replace it whole")
    return folder


def staging_folder(folder: Path) -> Path:
    """A new empty temporary sibling of ``folder`` (same file system, so the swap is a rename),
    named as :mod:`onnx_peft.safe_write` names temporaries so a killed run's is cleaned later."""
    return make_temp_dir(folder.parent, folder.name)


def install_folder(staged: Path, folder: Path) -> None:
    """Make ``staged`` become ``folder``, replacing whatever ``folder`` held.

    Two renames (old folder aside, new one in), then the old one is deleted: at no moment does
    ``folder`` mix old and new files. The new folder gets the permissions of a plain ``mkdir``.
    """
    honour_umask(staged)
    if not folder.exists():
        os.replace(staged, folder)
        return
    old = folder.parent / temp_name(folder.name, "old")
    os.replace(folder, old)
    try:
        os.replace(staged, folder)
    except OSError:
        os.replace(old, folder)  # put the old folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing_folder(folder: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                   overwrite: bool = False) -> Iterator[Path]:
    """``with writing_folder(out, inputs, overwrite) as tmp:`` write into ``tmp``; on success
    ``tmp`` replaces ``out`` whole, on an error nothing changes."""
    folder = check_output_folder(folder, inputs, overwrite)
    staged = staging_folder(folder)
    try:
        yield staged
        install_folder(staged, folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
