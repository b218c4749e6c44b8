"""Every SAE file format saelab reads and writes: `detect_format`, `load_any` and `write`.

Readers: saelab, saelens, sparsify, dictionary_learning, gemma_scope. Writers: saelab, saelens, sparsify. Each
reader returns the saelab SAE computing the same function (or refuses, naming what it cannot represent), with
the hook and model names the files give, as found. Each writer refuses an SAE its format cannot hold before
writing anything, writes into a temporary folder, reads it back with its own reader and checks that it computes
what the SAE computes, and only then renames it into place: a failed write leaves no half folder.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from saelab.errors import CheckpointError, ConfigError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.formats import dictionary_learning, gemma_scope, saelens, sparsify
from saelab.saes.formats import saelab as saelab_format
from saelab.saes.formats.common import folder_in_progress
from saelab.saes.latents import to_dense

# Detection order: saelab before SAELens (both write cfg.json + sae_weights.safetensors; the cfg keys differ).
FORMATS: dict[str, ModuleType] = {module.NAME: module for module in
                                  (saelab_format, saelens, sparsify, dictionary_learning, gemma_scope)}
WRITABLE = ("saelens", "sparsify", "saelab")
PROBE_TOKENS = 256


def detect_format(folder: str | Path) -> str:
    """The name of the format `folder` is in; a CheckpointError listing what it holds when none matches."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; point at the folder that holds the SAE's files")
    for name, module in FORMATS.items():
        if module.detect(folder):
            return name
    hookpoints = sparsify.hookpoint_folders(folder)
    if hookpoints:
        raise CheckpointError(f"{folder} is a sparsify run with one SAE per hookpoint {hookpoints}; point at one "
                              f"of them, e.g. {folder / hookpoints[0]}")
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()) or ["nothing"]
    found = found if len(found) <= 20 else [*found[:20], f"... {len(found) - 20} more"]
    known = "; ".join(f"{name}: {module.FILES}" for name, module in FORMATS.items())
    raise CheckpointError(f"{folder} is in no SAE format saelab knows: it holds {found}. Known formats: {known}")


def load_any(folder: str | Path, device: str | torch.device = "cpu",
             norm_scaling_factor: float | None = None) -> SparseAutoencoder:
    """Load the SAE in `folder`, whatever its format. `norm_scaling_factor`: see `saelens.read`."""
    folder = Path(folder)
    name = detect_format(folder)
    if name == saelens.NAME:
        sae = saelens.read(folder, norm_scaling_factor)
    elif norm_scaling_factor is not None:
        raise ConfigError(f"{folder} is a {name} folder; norm_scaling_factor applies to SAELens folders only")
    else:
        sae = FORMATS[name].read(folder)
    return sae.to(device)


def check_writable(sae: SparseAutoencoder, to: str) -> None:
    """Raise ConfigError when format `to` cannot hold `sae` (before anything is written)."""
    if to not in WRITABLE:
        raise ConfigError(f"cannot write the {to!r} format; choose one of {list(WRITABLE)}")
    if sae.sharded:
        raise ConfigError(f"{type(sae).__name__} holds one shard of an SAE per process; write the gathered SAE "
                          "its training run saved instead of one process's part")
    FORMATS[to].check(sae)


def write(sae: SparseAutoencoder, folder: str | Path, to: str = "saelab", overwrite: bool = False) -> Path:
    """Write `sae` as a `to` folder at `folder`, atomically and verified (see the module docstring)."""
    check_writable(sae, to)
    folder = Path(folder)
    with folder_in_progress(folder, overwrite) as tmp:
        FORMATS[to].write(sae, tmp)
        if to != saelab_format.NAME:  # saelab's own writes the state dict as it is
            reference = saelens.as_written(sae) if to == saelens.NAME else sae
            _verify(reference, FORMATS[to].read(tmp), to)
    return folder


@torch.no_grad()
def _verify(sae: SparseAutoencoder, written: SparseAutoencoder, to: str) -> None:
    """The written folder (read back on the CPU) must compute what `sae` computes, wherever it lives, up to float32
    rounding: latents and reconstructions of a fixed random probe."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_TOKENS, sae.d_in, generator=g) / max(float(sae.cfg.input_scale), 1e-12)
    ours = (to_dense(sae.encode(sae.normalize(x.to(sae.device))[0])).cpu(), sae.reconstruct(x).cpu())
    theirs = (to_dense(written.encode(written.normalize(x)[0])), written.reconstruct(x))
    for what, a, b in zip(("latents", "reconstructions"), ours, theirs, strict=True):
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        if diff > 1e-4 * max(1.0, float(a.abs().max())):
            raise CheckpointError(f"the {to} files would not reproduce the SAE's {what} (max abs diff {diff:.3g}); "
                                  "nothing was written")


__all__ = ["FORMATS", "WRITABLE", "check_writable", "detect_format", "load_any", "write"]
