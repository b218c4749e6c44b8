"""Build `bench/.peers-venv`: the peers pinned, beside the project's torch, apart from the project's own venv.

Why a separate venv: the peers pull transformer-lens, nnsight and friends whose pins would fight ours. Why a
constraints file: any of them asking for another torch would silently swap the build we measure.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
VENV = BENCH / ".peers-venv"
TORCH_PIN = "torch==2.13.0"
PEER_PINS = {
    "sparsify": "eai-sparsify==1.3.3",  # `sparsify` on PyPI is Neural Magic's, not EleutherAI's
    "saelens": "sae-lens==6.54.12",
    "dictionary_learning": "dictionary-learning==0.1.0",
}


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _pip(*args: str) -> None:
    subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", *args], check=True)


def install(peers: list[str]) -> Path:
    """Create the venv (once) and install torch, the chosen peers and saelab; returns the venv's python."""
    if not venv_python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    constraints = VENV / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    _pip(TORCH_PIN)
    for peer in peers:
        _pip("-c", str(constraints), PEER_PINS[peer])
        if peer == "dictionary_learning":  # it pulls a CUDA torchvision that breaks `transformers` imports on CPU
            subprocess.run([str(venv_python()), "-m", "pip", "uninstall", "-q", "-y", "torchvision"], check=True)
    _pip("-c", str(constraints), "--no-deps", "-e", str(REPO))
    return venv_python()


if __name__ == "__main__":
    print(install(sys.argv[1:] or list(PEER_PINS)))
