"""Atomic writes: a result, a patch, a converted model or a zoo artifact appears whole, or not at all.

* A **file** is written to a temporary file beside it, flushed and fsynced, then moved over the old one with one
  ``os.replace`` (:func:`write_file`, :func:`write_bytes`, :func:`write_text`, :func:`write_json`).
* A **folder** (a patch: ``patch.safetensors`` + ``patch.json``; a model) is built in a temporary folder beside it,
  fsynced, then swapped in with one ``renameat2(RENAME_EXCHANGE)`` (Linux): the old folder stays whole until the instant
  the new one takes its place, and is removed after (:func:`folder`). Where the exchange is not available the old
  folder is first renamed aside; a crash between the two renames is repaired by :func:`sweep` on the next write.

Temporaries are named ``.NAME.cnt-tmp-PID-RANDOM``. A process killed mid-write leaves one behind; the next write of
the same path (or :func:`sweep` of its folder) removes those whose process is gone.

:func:`check_output` validates an output path before any compute: a file where a file is expected, a folder (empty,
new, or one the kit wrote: it holds ``marker``) where a folder is, and a writable parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path

TMP_MARK = ".cnt-tmp-"
OLD_MARK = ".cnt-old-"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.cnt-(?P<what>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")
_LEGACY = re.compile(r"^(?P<name>.+)\.(?P<what>tmp)(?P<pid>\d+)$")  # what earlier versions of the kit left
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputPathError(ValueError):
    """An output path cannot be written as asked; the message names it and the fix. Nothing was written."""


def _temp_path(path: Path, mark: str = TMP_MARK) -> Path:
    return path.with_name(f".{path.name}{mark}{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove what interrupted writes left in ``directory`` (only ``name``'s, if given): temporaries of processes that
    are gone; an old folder set aside by a swap that did not finish is put back when its path is empty. Returns what
    was removed or restored."""
    d = Path(directory)
    done = []
    if not d.is_dir():
        return done
    for p in d.iterdir():
        m = _LEFTOVER.match(p.name) or _LEGACY.match(p.name)
        if not m or (name is not None and m["name"] != name) or _alive(int(m["pid"])):
            continue
        target = d / m["name"]
        if m["what"] == "old" and not target.exists():
            os.rename(p, target)  # the swap stopped between its two renames: the old version is the good one
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _umask_mode(mode: int = 0o666) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def write_file(path: str | Path, mode: str = "wb"):
    """``with write_file(p) as f: f.write(...)``: ``p`` is replaced only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path.parent, path.name)
    tmp = _temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # as an ordinary write would leave it (temp files are created private elsewhere)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with write_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with write_file(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj, **kwargs) -> Path:
    return write_text(path, json.dumps(obj, indent=1, **kwargs) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call (Linux renameat2); False where the call is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # no such call, flag or filesystem: two renames
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def folder(path: str | Path):
    """``with folder(d) as tmp: write files into tmp``: ``d`` is replaced by ``tmp`` as a whole when the block finishes
    without error; on an error (or a kill) the previous ``d`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path.parent, path.name)
    tmp = _temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        _fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # tmp now holds the previous version
        else:
            old = _temp_path(path, OLD_MARK)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(path: str | Path, kind: str, *, what: str, marker: str | None = None) -> Path:
    """Refuse, before any compute, an output path that cannot be written as ``kind`` (``"file"`` or ``"folder"``).

    ``what`` names the argument in the message (e.g. ``"--out"``). A folder that exists must be empty or hold
    ``marker`` (a folder the kit wrote before, which is then replaced as a whole); anything else is not overwritten."""
    p = Path(path).expanduser()
    if kind == "file":
        if p.is_dir():
            raise OutputPathError(f"{what} {str(path)!r} is a folder; a file is written there: pass a file path")
    elif kind == "folder":
        if p.exists() and not p.is_dir():
            raise OutputPathError(f"{what} {str(path)!r} is an existing file; a folder is written there: pass a new "
                                  "folder path")
        if p.is_dir() and marker is not None and any(p.iterdir()) and not (p / marker).exists():
            raise OutputPathError(f"{what} {str(path)!r} is a folder with other files (no {marker}); it is replaced "
                                  "as a whole, so it is not used: pass a new or empty folder")
    else:
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{what} {str(path)!r}: {parent} is a file, not a folder: pass a path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputPathError(f"{what} {str(path)!r} is not writable ({parent} does not allow it): pass a path you "
                              "can write to")
    return p
