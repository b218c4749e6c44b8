"""saelab's per-user cache (converted models, built native kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$SAELAB_CACHE` if set, else `~/.cache/saelab`."""
    return Path(os.environ.get("SAELAB_CACHE") or Path.home() / ".cache" / "saelab")
