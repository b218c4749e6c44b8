"""Build `bench/.peers-venv`: the peers pinned, beside the project's torch, apart from the project's own venv.

Why a separate venv: the peers pull transformer-lens, nnsight and friends whose pins would fight ours. Why a
constraints file: any of them asking for another torch would silently swap the build we measure.

Steps (each a no-op when already satisfied, so re-running is cheap):
1. `python -m venv bench/.peers-venv`, then `torch==2.13.0` alone, exactly as the Makefile installs it (on these
   machines pip's configured find-links/index resolve it to the CPU wheel, 2.13.0+cpu).
2. The chosen peers in one resolver call, with `constraints.txt` holding the torch pin, so pip either keeps the
   installed torch or fails loudly.
3. dictionary-learning pulls a CUDA torchvision (via nnsight) that breaks `transformers` imports on CPU: removed.
4. saelab itself, editable and without dependencies (`pip install --no-deps -e .`): the workers import it for the
   shared harness (process tuning, activation store, FVU) and the `ours` worker trains with it; torch, numpy,
   safetensors, transformers and tqdm come from the peers' dependencies, and nothing the workers import needs the
   rest (gguf, matplotlib), so `pip check` listing those two as missing is expected.
5. `pip freeze` of the result written to `bench/.peers-venv/freeze.txt`.

Usage: python bench/peerbench/install.py [sparsify] [saelens] [dictionary_learning]   (default: all three)
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
VENV = BENCH / ".peers-venv"
TORCH_PIN = "torch==2.13.0"  # the Makefile's TORCH_PIN
PEER_PINS = {  # the only release of each on the index these machines use (`pip index versions`, 2026-11)
    "sparsify": "eai-sparsify==1.3.3",  # `sparsify` on PyPI is Neural Magic's, not EleutherAI's
    "saelens": "sae-lens==6.54.12",
    "dictionary_learning": "dictionary-learning==0.1.0",
}


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _pip(*args: str) -> None:
    subprocess.run([str(venv_python()), "-m", "pip", *args], check=True)


def install(peers: list[str]) -> Path:
    """Create the venv (once) and install torch, the chosen peers and saelab; returns the venv's python."""
    unknown = sorted(set(peers) - set(PEER_PINS))
    if unknown:
        raise SystemExit(f"no pin for {unknown}; choose from {sorted(PEER_PINS)}")
    if not venv_python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    constraints = VENV / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    _pip("install", "-q", TORCH_PIN)
    if peers:
        _pip("install", "-q", "-c", str(constraints), *(PEER_PINS[p] for p in peers))
    if "dictionary_learning" in peers:
        _pip("uninstall", "-q", "-y", "torchvision")  # no error when it is absent already
    _pip("install", "-q", "-c", str(constraints), "--no-deps", "-e", str(REPO))
    freeze = subprocess.run([str(venv_python()), "-m", "pip", "freeze", "--exclude-editable"], check=True,
                            capture_output=True, text=True).stdout
    (VENV / "freeze.txt").write_text(freeze)
    torch_line = next((line for line in freeze.splitlines() if line.startswith("torch==")), "torch missing")
    if torch_line.split("==")[-1].split("+")[0] != TORCH_PIN.split("==")[1]:
        raise SystemExit(f"{VENV}: expected {TORCH_PIN}, found {torch_line}")
    return venv_python()


if __name__ == "__main__":
    print(install(sys.argv[1:] or list(PEER_PINS)))
