"""Gemma Scope's raw release files: one `params.npz` per SAE with W_enc [d, n], W_dec [n, d], b_enc [n], b_dec [d]
and threshold [n]: a JumpReLU SAE that encodes x itself (no b_dec subtraction). Read only, with numpy's
`allow_pickle=False`. The file names no hookpoint (the repository path does), so none is recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from saelab.errors import CheckpointError
from saelab.saes.formats.common import refuse_leftovers, take
from saelab.saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig

NAME = "gemma_scope"
WEIGHTS = "params.npz"
FILES = WEIGHTS


def detect(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file()


def read(folder: Path) -> JumpReLUSAE:
    path = folder / WEIGHTS
    try:
        with np.load(path, allow_pickle=False) as npz:
            tensors = {name: torch.from_numpy(np.array(npz[name])) for name in npz.files}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read as an .npz of arrays ({exc})") from None
    if "W_enc" not in tensors or tensors["W_enc"].ndim != 2:
        raise CheckpointError(f"{path} lacks a 2-d W_enc (it holds {sorted(tensors)})")
    d, n = tensors["W_enc"].shape
    state = {"W_enc": take(tensors, "W_enc", (d, n), path).T.contiguous(),
             "b_enc": take(tensors, "b_enc", (n,), path),
             "W_dec": take(tensors, "W_dec", (n, d), path),
             "b_dec": take(tensors, "b_dec", (d,), path),
             "threshold": take(tensors, "threshold", (n,), path)}
    refuse_leftovers(tensors, path, "Gemma Scope JumpReLU SAE")
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, n_latents=n, apply_b_dec_to_input=False))
    sae.load_state_dict(state)
    return sae
