"""Where the kit keeps what it builds (``~/.cache/cnt``, or ``$CNT_CACHE`` when set), and how it knows that a folder
there is still what it wrote.

Every folder the kit writes into the cache (a converted model, a reconstructed zoo model) carries ``cnt_files.json``:
the size and sha256 of each of its files, recorded when written (:func:`record_files`). :func:`verify_files` checks the
sizes on every load and the hashes once per process per file (keyed on path, size and modification time): a flipped
byte or a truncated file is refused, with the command that rebuilds it, before anything reads the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import atomic

FILES_RECORD = "cnt_files.json"
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) hashed and found right in this process


class CacheIntegrityError(RuntimeError):
    """A cache folder does not match the record of what was written into it; the message says how to rebuild it."""


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("CNT_CACHE") or Path.home() / ".cache" / "cnt").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_files(paths, sink=None) -> str:
    """sha256 of the files' bytes, concatenated in order (copied to ``sink`` on the way, when given)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
                if sink is not None:
                    sink.write(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    return sha256_files([path])


def record_files(folder: str | Path) -> dict:
    """Write ``cnt_files.json`` into ``folder``: ``{relative path: {"bytes", "sha256"}}`` of every other file."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != FILES_RECORD:
            files[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            st = p.stat()
            _VERIFIED.add((str(p.resolve()), st.st_size, st.st_mtime_ns))
    atomic.write_json(folder / FILES_RECORD, files)
    return files


def has_record(folder: str | Path) -> bool:
    return (Path(folder) / FILES_RECORD).is_file()


def verify_files(folder: str | Path, rebuild: str, *, full: bool = False) -> None:
    """Refuse ``folder`` unless every recorded file is there with its size, and (once per process per file, or every
    time with ``full``) its sha256. ``rebuild``: the command that rebuilds the folder, named in the message."""
    folder = Path(folder)
    try:
        record = json.loads((folder / FILES_RECORD).read_text())
        if not isinstance(record, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        raise CacheIntegrityError(f"cache folder {folder} has no readable {FILES_RECORD} ({e}); rebuild it: "
                                  f"`{rebuild}`") from None
    for rel, want in record.items():
        p = folder / rel
        try:
            st = p.stat()
        except OSError:
            raise CacheIntegrityError(f"cache folder {folder}: {rel} is missing; rebuild it: `{rebuild}`") from None
        if st.st_size != want.get("bytes"):
            raise CacheIntegrityError(f"cache folder {folder}: {rel} has {st.st_size} bytes, {want.get('bytes')} were "
                                      f"written (truncated or replaced); rebuild it: `{rebuild}`")
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if full or key not in _VERIFIED:
            if sha256_file(p) != want.get("sha256"):
                raise CacheIntegrityError(f"cache folder {folder}: {rel} does not match the sha256 recorded when it "
                                          f"was written (the file changed on disk); rebuild it: `{rebuild}`")
            _VERIFIED.add(key)
