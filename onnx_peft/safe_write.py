"""Writing outputs without losing data: no input overwritten, all files or none, the umask kept.

Why this module exists: every writer (save_model, adapter files, PEFT dirs, convert-adapters)
faces the same four hazards, so they share one answer each:

* **An output that is an input.** ``-o adapter_model.safetensors`` on the adapter being read, or
  ``-o model.onnx.data`` on the weights being streamed, would destroy the input while it is read.
  :func:`refuse_overwriting_inputs` compares resolved paths (symlinks followed) and inodes (hard
  links).
* **Half an output.** Files are written into a temporary file or folder beside the output and
  renamed into place when complete; :func:`install_files` renames several files as one step
  (old files moved aside first, put back if any rename fails), so ``model.onnx`` never appears
  without its ``model.onnx.data``.
* **Temporaries left by a killed run.** Their names say whose they are,
  ``.NAME.onnx-peft-<host>-<pid>-<random>.tmp``; :func:`make_temp_dir` / :func:`open_temp_file`
  first delete those of this host whose process is gone (:func:`clean_stale_temps`).
* **Private outputs.** ``mkstemp``/``mkdtemp`` create 0600 files and 0700 folders, which a
  serving account cannot read; :func:`honour_umask` gives the outputs ``0o666 & ~umask``
  (folders ``0o777 & ~umask``), as ``open()``/``mkdir`` would have.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import OutputError, UnsafePathError

TEMP_TAG = "onnx-peft"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
# .<output name>.onnx-peft-<host>-<pid>-<random>.<tmp|old>
_TEMP_NAME = re.compile(rf"^\..+\.{TEMP_TAG}-([0-9a-f]{{6}})-(\d+)-[0-9a-f]+\.(tmp|old)$")
_UMASK_LOCK = threading.Lock()


# -- the umask -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def process_umask() -> int:
    """The process umask, read once.

    Linux reports it in ``/proc/self/status``; elsewhere ``os.umask`` is the only way, and it
    must set a value to read one: it sets 0o077 for that instant, so a file another thread
    creates meanwhile comes out more private, never less.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions a plain
    ``open()``/``mkdir`` would have: files ``0o666 & ~umask``, folders ``0o777 & ~umask``.
    Symlinks are left alone, and so is a file system that refuses chmod (the write stands)."""
    path = Path(path)
    umask = process_umask()

    def chmod(item: str | Path, mode: int) -> None:
        try:
            os.chmod(item, mode & ~umask)
        except OSError:
            pass

    if path.is_symlink():
        return
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                if not os.path.islink(os.path.join(root, name)):
                    chmod(os.path.join(root, name), 0o666)
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):
                    chmod(os.path.join(root, name), 0o777)
        chmod(path, 0o777)
    elif path.exists():
        chmod(path, 0o666)


# -- temporaries ---------------------------------------------------------------------------
def temp_name(name: str, kind: str = "tmp") -> str:
    """``.NAME.onnx-peft-<host>-<pid>-<random>.<kind>``: a hidden sibling name that says which
    process made it, so a later run can tell a dead run's leftovers from a live run's work."""
    return f".{name}.{TEMP_TAG}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries (:func:`temp_name`) in ``folder`` left by onnx-peft processes of
    this host that no longer run (killed mid-write). Returns what was deleted; never raises."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match.group(1) != _HOST or _alive(int(match.group(2))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass  # another run cleaned it, or no permission: not ours to insist on
    return removed


def _make_parent(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from exc


def make_temp_dir(parent: str | os.PathLike, name: str, kind: str = "tmp") -> Path:
    """A new empty private folder ``parent/.NAME.onnx-peft-...tmp`` (created with ``parent``),
    after removing dead runs' temporaries from ``parent``. Same file system as the output, so
    installing is a rename."""
    parent = Path(parent)
    _make_parent(parent)
    clean_stale_temps(parent)
    path = parent / temp_name(name, kind)
    try:
        path.mkdir(mode=0o700)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot write here ({exc.strerror or exc}); choose another output path") from exc
    return path


def open_temp_file(path: str | os.PathLike) -> tuple[int, Path]:
    """``(fd, temp path)``: a new private file beside ``path`` (dead runs' temporaries removed)."""
    path = Path(path)
    _make_parent(path.parent)
    clean_stale_temps(path.parent)
    tmp = path.parent / temp_name(path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror or exc}); choose another output path") from exc
    return fd, tmp


# -- the checks ----------------------------------------------------------------------------
def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def refuse_overwriting_inputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None]
                              ) -> None:
    """UnsafePathError when an output is one of the inputs: the same path once resolved (so a
    symlink to an input), or the same file under another name (a hard link: same inode).

    ``inputs``: the files the command reads (None entries are skipped); a folder stands for
    itself only, so list the files of an adapter dir that are read.
    """
    by_path: dict[Path, Path] = {}
    by_inode: dict[tuple[int, int], Path] = {}
    for path in (Path(item) for item in inputs if item is not None):
        by_path.setdefault(path.resolve(), path)
        identity = _identity(path)
        if identity is not None:
            by_inode.setdefault(identity, path)
    for output in outputs:
        output = Path(output)
        source = by_path.get(output.resolve())
        if source is None:
            identity = _identity(output)
            source = by_inode.get(identity) if identity is not None else None
        if source is not None:
            raise UnsafePathError(f"{output}: writing it would overwrite the input {source}, which this "
                                  "command reads; choose another output path")


def refuse_folders_in_the_way(outputs: Iterable[str | os.PathLike]) -> None:
    """UnsafePathError when an output file's path is an existing folder (it would be left
    half-replaced: some files renamed in, then the folder refusing the rest)."""
    for output in outputs:
        output = Path(output)
        if output.is_dir() and not output.is_symlink():
            raise UnsafePathError(f"{output} is a folder; the output is a file, choose a file path "
                                  "(or remove the folder)")


# -- installing ----------------------------------------------------------------------------
def install_files(moves: Sequence[tuple[Path | None, Path]], aside: Path) -> None:
    """Rename each ``(new file, destination)`` into place as one step; ``new file`` None means
    "delete the destination" (a stale ``.data`` of an earlier save).

    Every existing destination is first moved into ``aside`` (a temporary folder on the same file
    system), then the new files are renamed in; if any rename fails, the new files are taken
    out and the old ones put back, so the destinations hold all old files or all new ones. The
    caller deletes ``aside`` (and with it the old files) afterwards. Installed files get the
    umask's permissions.
    """
    moved_aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for index, (_, destination) in enumerate(moves):
            if os.path.lexists(destination):
                kept = aside / f"old-{index}"
                os.replace(destination, kept)
                moved_aside.append((kept, destination))
        for new, destination in moves:
            if new is None:
                continue
            os.replace(new, destination)
            placed.append(destination)
            honour_umask(destination)
    except BaseException:
        for destination in placed:
            try:
                os.unlink(destination)
            except OSError:
                pass
        for kept, destination in moved_aside:
            try:
                os.replace(kept, destination)
            except OSError:
                pass
        raise
