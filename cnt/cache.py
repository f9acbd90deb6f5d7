"""Where the kit keeps what it builds: ``~/.cache/cnt``, or ``$CNT_CACHE`` when set."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("CNT_CACHE") or Path.home() / ".cache" / "cnt").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
