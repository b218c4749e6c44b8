"""Synthetic latent records with known activations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from saelab.activations.store import ActivationStore
from saelab.activations.writer import StoreWriter
from saelab.interp.record import LatentRecord, record_latents
from saelab.saes import SparseAutoencoder, create_sae

HOOKPOINT = "resid_post.0"


def identity_sae(n: int) -> SparseAutoencoder:
    """A ReLU SAE whose latents are ReLU(x): a store's activations are then exactly its latent activations."""
    sae = create_sae("relu", d_in=n, n_latents=n, hookpoint=HOOKPOINT)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(n))
        sae.W_dec.copy_(torch.eye(n))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@dataclasses.dataclass
class Synthetic:
    store: ActivationStore
    record: LatentRecord
    sae: SparseAutoencoder
    latents: torch.Tensor  # [C, T, n] latent activations, 0 at positions not stored
    contexts: torch.Tensor  # [C, T] token ids
    record_dir: Path


def write_store(folder: Path, latents: torch.Tensor, contexts: torch.Tensor, keep: torch.Tensor) -> ActivationStore:
    """Store `latents[c][keep[c]]` context by context (the harvest's layout: context-major, positions ascending)."""
    n_contexts, length, _ = latents.shape
    writer = StoreWriter(folder, model="synthetic", hookpoints=[HOOKPOINT], dtype="float32", context_length=length,
                         shard_tokens=10, contexts=contexts)
    positions = torch.arange(length)
    for c in range(n_contexts):
        rows = keep[c]
        writer.append({HOOKPOINT: latents[c][rows]}, contexts[c][rows], positions[rows],
                      torch.full((int(rows.sum()),), c), n_contexts=1)
    return writer.finish()


@pytest.fixture
def make_record(tmp_path: Path) -> Callable[..., Synthetic]:
    def make(latents: torch.Tensor, contexts: torch.Tensor | None = None, keep: torch.Tensor | None = None,
             name: str = "run", **record_kw: Any) -> Synthetic:
        n_contexts, length, n = latents.shape
        contexts = contexts if contexts is not None else torch.randint(4, 100, (n_contexts, length))
        keep = keep if keep is not None else torch.ones(n_contexts, length, dtype=torch.bool)
        store = write_store(tmp_path / name / "store", latents, contexts, keep)
        sae = identity_sae(n)
        kw = {"chunk_tokens": 7, "batch_size": 5, "show_progress": False, **record_kw}
        record = record_latents(sae, store, tmp_path / name / "record", HOOKPOINT, **kw)
        return Synthetic(store, record, sae, latents * keep[..., None], contexts, tmp_path / name / "record")

    return make
