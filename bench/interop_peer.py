"""The peers' half of `bench/interop.py`, run inside `bench/.peers-venv`: load an SAE folder with SAELens or
sparsify, compute its latents and reconstructions of the given inputs, and save the SAE again with that library's
own writer (for the trip back into saelab).

Usage: python bench/interop_peer.py saelens|sparsify FOLDER IO_FILE RESAVE_FOLDER
  IO_FILE: safetensors with `x`; the peer adds `latents` and `x_hat` to it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def run_saelens(folder: Path, x: torch.Tensor, resave: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder))
    sae.save_model(resave)
    with torch.no_grad():
        latents = sae.encode(x)
        return latents, sae.decode(latents)


def run_sparsify(folder: Path, x: torch.Tensor, resave: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(folder)
    sae.save_to_disk(resave)
    with torch.no_grad():
        top = sae.encode(x)
        latents = torch.zeros(x.shape[0], sae.num_latents).scatter(-1, top.top_indices, top.top_acts)
        return latents, sae(x).sae_out


def main() -> None:
    library, folder, io_file, resave = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    x = load_file(io_file)["x"]
    latents, x_hat = {"saelens": run_saelens, "sparsify": run_sparsify}[library](folder, x, resave)
    save_file({"x": x, "latents": latents.contiguous(), "x_hat": x_hat.contiguous()}, io_file)


if __name__ == "__main__":
    main()
