"""saelab's own folders (`cfg.json` with `architecture` and `n_latents` + the architecture's weights file): every
architecture, read and written by `SparseAutoencoder.save` / `load_sae`."""

from __future__ import annotations

from pathlib import Path

from saelab.errors import CheckpointError, ConfigError
from saelab.saes.base import SparseAutoencoder, architecture_class, load_sae
from saelab.saes.formats.common import read_json

NAME = "saelab"
CFG = "cfg.json"
FILES = f"{CFG} (with architecture and n_latents) + the architecture's weights file"


def detect(folder: Path) -> bool:
    if not (folder / CFG).is_file():
        return False
    try:
        cfg = read_json(folder / CFG, "saelab")
        weights = architecture_class(cfg.get("architecture")).weights_file
    except (CheckpointError, ConfigError):
        return False
    return "n_latents" in cfg and (folder / weights).is_file()


def read(folder: Path) -> SparseAutoencoder:
    return load_sae(folder)


def check(sae: SparseAutoencoder) -> None:
    """Every architecture has a saelab folder (a sharded SAE is refused by `formats.check_writable`)."""


def write(sae: SparseAutoencoder, folder: Path) -> None:
    sae.save(folder)
