"""Which code measured a result: the kit's version and a digest of its Python sources, recorded in every results file
so that runs made by different code are told apart (a seed measured before a change is not averaged with one after it
without saying so, and a grid run is not skipped as finished when the code that made it has changed since)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def sources_digest(root: str | Path = PACKAGE) -> str:
    """SHA-256 over every ``*.py`` file under ``root``: each file's path relative to ``root`` and its bytes, in path
    order — the same on every checkout of the same sources, whatever the folder or the file times."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in rel:
            continue
        data = path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_record() -> dict:
    """``{"version": …, "sources_sha256": …}`` of the ``cnt`` package this process imported (the version as
    installed; None when it runs from a folder that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("cnt")
    except PackageNotFoundError:
        installed = None
    return {"version": installed, "sources_sha256": sources_digest()}


def same_code(records: list[dict | None]) -> bool | None:
    """Whether every record names the same sources (True / False); None when any run recorded none (results written
    before the kit recorded its code)."""
    digests = [(r or {}).get("sources_sha256") for r in records]
    if not digests or any(d is None for d in digests):
        return None
    return len(set(digests)) == 1
