"""The latent record: one pass of an SAE over a store, keeping every nonzero activation, so nothing re-runs it.

Everything downstream (firing counts, top and quantile examples, density histograms, feature pages, autointerp)
reads the record instead of encoding again. A record is a folder:

    record.json          identity (SAE fingerprint, store, hookpoint, token count), shards, complete flag
    shard_00000.safetensors   offsets [n_latents + 1] int64, tokens [m] int64, values [m] float32

Each shard covers a fixed range of global token indices and holds its nonzero activations sorted by latent, then by
token (CSR by latent): latent i's entries are `tokens/values[offsets[i]:offsets[i+1]]`, so reading one latent is one
contiguous slice per shard. Memory is bounded by one shard; shards are written atomically and published in the
manifest only afterwards, so an interrupted pass resumes after its last published shard. The covered tokens end on
a context boundary, so every context the record touches is recorded whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from saelab.activations.store import ActivationStore
from saelab.errors import StoreError
from saelab.io import atomic_write_json, atomic_write_with, sha256_file
from saelab.saes.base import SparseAutoencoder, SparseLatents

FORMAT = "saelab.latent_record"
FORMAT_VERSION = 1
MANIFEST_NAME = "record.json"


def sae_fingerprint(sae: SparseAutoencoder) -> str:
    """sha256 over the SAE's config and weights: a record is valid only for the exact SAE that wrote it."""
    described = json.dumps({"architecture": sae.architecture, **sae.cfg.to_dict()}, sort_keys=True)
    digest = hashlib.sha256(described.encode())
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def covered_tokens(store: ActivationStore, max_tokens: int | None) -> int:
    """How many leading tokens a record of at most `max_tokens` covers: cut back to the start of a context."""
    if max_tokens is None or max_tokens >= store.n_tokens:
        return store.n_tokens
    if max_tokens < 1:
        raise StoreError(f"max_tokens={max_tokens} must be at least 1")
    contexts = store.context_index(0, max_tokens + 1).numpy()
    cut = int(np.searchsorted(contexts, contexts[-1], side="left"))
    if cut == 0:
        raise StoreError(
            f"max_tokens={max_tokens} is shorter than the first context's {len(contexts) - 1}+ stored tokens; "
            "record at least one whole context"
        )
    return cut


def record_latents(
    sae: SparseAutoencoder,
    store: ActivationStore,
    folder: str | Path,
    hookpoint: str | Sequence[str],
    max_tokens: int | None = None,
    chunk_tokens: int = 65_536,
    batch_size: int = 4096,
    show_progress: bool = True,
) -> LatentRecord:
    """Encode the store's first `max_tokens` tokens (whole contexts) with `sae` into a record at `folder`.

    Several hookpoints are read concatenated in the order given (a multi-layer SAE's input); the record names them
    joined by commas. Re-running on a complete record returns it; on a partial one it continues after the last
    published shard.
    A record written by a different SAE or from a different store is an error (choose another folder).
    """
    if chunk_tokens < 1 or batch_size < 1:
        raise StoreError(f"chunk_tokens ({chunk_tokens}) and batch_size ({batch_size}) must be at least 1")
    folder = Path(folder)
    n_tokens = covered_tokens(store, max_tokens)
    identity = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sae": sae_fingerprint(sae),
        "store": {"source": store.manifest["source"], "n_tokens": store.n_tokens, "model": store.model_name},
        "hookpoint": hookpoint if isinstance(hookpoint, str) else ",".join(hookpoint),
        "n_tokens": n_tokens,
        "n_latents": sae.n_latents,
        "chunk_tokens": chunk_tokens,
    }
    manifest = _resume_manifest(folder, identity)
    done = manifest["shards"][-1]["stop"] if manifest["shards"] else 0
    progress = tqdm(total=n_tokens - done, unit="tok", unit_scale=True, desc="latent record", disable=not show_progress)
    with progress as bar:
        for start in range(done, n_tokens, chunk_tokens):
            stop = min(start + chunk_tokens, n_tokens)
            name = f"shard_{len(manifest['shards']):05d}.safetensors"
            arrays = _encode_chunk(sae, store, hookpoint, start, stop, batch_size)
            atomic_write_with(folder / name, lambda tmp, arrays=arrays: save_file(arrays, str(tmp)))
            manifest["shards"].append({
                "file": name, "start": start, "stop": stop, "n_entries": int(arrays["values"].shape[0]),
                "bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name),
            })
            atomic_write_json(folder / MANIFEST_NAME, manifest)
            bar.update(stop - start)
    manifest["complete"] = True
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return LatentRecord(folder)


def _resume_manifest(folder: Path, identity: dict[str, Any]) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.exists():
        if folder.exists() and any(not p.name.startswith(".") for p in folder.iterdir()):
            raise StoreError(f"{folder} is not empty and holds no {MANIFEST_NAME}; choose an empty or new folder")
        manifest = {**identity, "shards": [], "complete": False}
        atomic_write_json(path, manifest)
        return manifest
    manifest = _read_manifest(folder)
    changed = sorted(key for key in identity if manifest.get(key) != identity[key])
    if changed:
        raise StoreError(
            f"{folder} holds a latent record of a different SAE or store (differs in {', '.join(changed)}); "
            "choose another folder, or delete this one to record again"
        )
    for shard in manifest["shards"]:
        problem = _shard_problem(folder, shard, check_hash=True)
        if problem is not None:
            raise StoreError(f"cannot resume the latent record {folder}: {problem}; delete the folder to record again")
    return manifest


@torch.no_grad()
def _encode_chunk(
    sae: SparseAutoencoder, store: ActivationStore, hookpoint: str | Sequence[str], start: int, stop: int,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """CSR-by-latent arrays of the nonzero activations of tokens [start, stop)."""
    dtype = next(sae.parameters()).dtype
    latents, tokens, values = [], [], []
    for lo in range(start, stop, batch_size):
        x = store.load(hookpoint, lo, min(lo + batch_size, stop)).to(sae.device, dtype)
        encoded = sae.encode(sae.normalize(x)[0])
        if isinstance(encoded, SparseLatents):
            rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(encoded.indices)
            keep = encoded.values > 0
            row, latent, value = rows[keep], encoded.indices[keep], encoded.values[keep]
        else:
            row, latent = encoded.nonzero(as_tuple=True)
            value = encoded[row, latent]
            keep = value > 0
            row, latent, value = row[keep], latent[keep], value[keep]
        latents.append(latent.cpu().numpy().astype(np.int64))
        tokens.append(row.cpu().numpy().astype(np.int64) + lo)
        values.append(value.float().cpu().numpy())
    latent, token, value = np.concatenate(latents), np.concatenate(tokens), np.concatenate(values)
    order = np.lexsort((token, latent))
    offsets = np.zeros(sae.n_latents + 1, dtype=np.int64)
    np.cumsum(np.bincount(latent, minlength=sae.n_latents), out=offsets[1:])
    return {"offsets": offsets, "tokens": token[order], "values": value[order].astype(np.float32)}


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise StoreError(f"{folder} is not a latent record (no {MANIFEST_NAME}); write one with record_latents")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}); delete the record folder and record again") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path} is not a version-{FORMAT_VERSION} latent record; record again with this saelab")
    return manifest


def _shard_problem(folder: Path, shard: dict[str, Any], check_hash: bool) -> str | None:
    file = folder / shard["file"]
    if not file.is_file():
        return f"{shard['file']} is missing"
    if file.stat().st_size != shard["bytes"]:
        return f"{shard['file']} has {file.stat().st_size} bytes, the manifest says {shard['bytes']} (truncated)"
    if check_hash and sha256_file(file) != shard["sha256"]:
        return f"{shard['file']} does not match its sha256 checksum (corrupted)"
    return None


class LatentRecord:
    """Read access to a complete record: per-latent firing counts and every nonzero activation of one latent."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._manifest = _read_manifest(self.folder)
        if not self._manifest["complete"]:
            raise StoreError(
                f"the latent record {self.folder} is incomplete (interrupted); rerun the same command to finish it"
            )
        for shard in self._manifest["shards"]:
            problem = _shard_problem(self.folder, shard, check_hash=False)
            if problem is not None:
                raise StoreError(f"latent record {self.folder}: {problem}; delete the folder and record again")
        self._counts: np.ndarray | None = None
        self._maxima: np.ndarray | None = None
        self._last: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self._manifest["n_tokens"])

    @property
    def n_latents(self) -> int:
        return int(self._manifest["n_latents"])

    @property
    def hookpoint(self) -> str:
        return str(self._manifest["hookpoint"])

    @property
    def counts(self) -> np.ndarray:
        """Tokens on which each latent is nonzero, `[n_latents]` int64."""
        if self._counts is None:
            counts = np.zeros(self.n_latents, dtype=np.int64)
            for shard in self._manifest["shards"]:
                with safe_open(str(self.folder / shard["file"]), framework="np") as handle:
                    counts += np.diff(handle.get_tensor("offsets"))
            self._counts = counts
        return self._counts.copy()

    @property
    def maxima(self) -> np.ndarray:
        """Each latent's largest recorded activation, `[n_latents]` float32 (0 for a latent that never fires)."""
        if self._maxima is None:
            maxima = np.zeros(self.n_latents, dtype=np.float32)
            for shard in self._manifest["shards"]:
                with safe_open(str(self.folder / shard["file"]), framework="np") as handle:
                    offsets, values = handle.get_tensor("offsets"), handle.get_tensor("values")
                fired = np.flatnonzero(np.diff(offsets) > 0)
                if len(fired):  # empty latents between two that fired add nothing to the segments between them
                    np.maximum.at(maxima, fired, np.maximum.reduceat(values, offsets[fired]))
            self._maxima = maxima
        return self._maxima.copy()

    @property
    def frequency(self) -> np.ndarray:
        """Fraction of recorded tokens on which each latent fires."""
        return self.counts / max(self.n_tokens, 1)

    def activations(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(global token indices ascending int64, activation values float32) of every token where `latent` fires."""
        if not 0 <= latent < self.n_latents:
            raise IndexError(f"latent {latent} is out of range for a record of {self.n_latents} latents")
        if self._last is None or self._last[0] != latent:  # readers often ask for one latent several times
            self._last = (latent, *self._read_activations(latent))
        return self._last[1].copy(), self._last[2].copy()

    def _read_activations(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, values = [], []
        for shard in self._manifest["shards"]:
            with safe_open(str(self.folder / shard["file"]), framework="np") as handle:
                lo, hi = (int(v) for v in handle.get_slice("offsets")[latent : latent + 2])
                if hi > lo:  # safetensors refuses an empty slice at the end of a tensor
                    tokens.append(handle.get_slice("tokens")[lo:hi])
                    values.append(handle.get_slice("values")[lo:hi])
        if not tokens:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(tokens).astype(np.int64), np.concatenate(values).astype(np.float32)
