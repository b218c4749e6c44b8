"""What produced a result: package versions, git commit, machine. Attached to every results file."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

_PACKAGES = ("saelab", "torch", "transformers", "numpy", "safetensors")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(cwd: Path | None = None) -> str | None:
    """The source tree's commit (with `-dirty` if modified), or None outside a git checkout."""
    folder = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=folder, capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance() -> dict[str, object]:
    import torch

    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
