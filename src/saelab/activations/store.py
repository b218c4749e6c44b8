"""Reading an activation store: memory-mapped shards, checksums, concatenated hookpoints, shuffled batches.

Several hookpoints read together are concatenated along features in the order given (the multi-layer SAE's input);
`layer_slices` says which features belong to which hookpoint. Normalisation (NormStats, estimated on the first
shard at harvest time) is applied only when asked for, per hookpoint, so a concatenation is normalised per layer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.activations.layout import (
    SHARD_FIX,
    STORAGE_DTYPES,
    file_problem,
    read_manifest,
    shard_problem,
)
from saelab.activations.normalize import NormStats
from saelab.activations.shuffle import BatchStream
from saelab.errors import StoreError

Hookpoints = str | Sequence[str]


class ActivationStore:
    """A harvested store at `path`.

    With `verify`, every file's size is checked at open (catches truncation at once) and each shard's sha256 on
    its first read (catches corruption without hashing the whole store up front). `require_complete=False`
    opens a store whose harvest was interrupted, e.g. to inspect it.
    """

    def __init__(self, path: str | Path, verify: bool = True, require_complete: bool = True) -> None:
        self.path = Path(path)
        self._manifest = read_manifest(self.path)
        if require_complete and not self._manifest["complete"]:
            raise StoreError(
                f"activation store {self.path} is incomplete (its harvest stopped after "
                f"{self._manifest['n_contexts']} contexts); finish it by re-running harvest with --resume"
            )
        self._shards: list[dict[str, Any]] = self._manifest["shards"]
        self._offsets = np.concatenate([[0], np.cumsum([s["n_tokens"] for s in self._shards])]).astype(np.int64)
        self._verify = verify
        self._verified: set[int] = set()
        self._contexts_verified = False
        if verify:
            for shard in self._shards:
                self._raise_if_bad(shard, check_hash=False)
            self._raise_if_bad_contexts(check_hash=False)

    def __repr__(self) -> str:
        dims = ", ".join(f"{hp}: {d}" for hp, d in self.dims.items())
        return f"ActivationStore({str(self.path)!r}, {self.n_tokens} tokens, {self._manifest['dtype']}, {{{dims}}})"

    # ---------------------------------------------------------------- description

    @property
    def manifest(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest)

    @property
    def n_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def hookpoints(self) -> list[str]:
        return list(self._manifest["hookpoints"])

    @property
    def dims(self) -> dict[str, int]:
        return dict(self._manifest["dims"])

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype (reads return float32 unless asked otherwise)."""
        return getattr(torch, self._manifest["dtype"])

    @property
    def model_name(self) -> str:
        return str(self._manifest["model"])

    @property
    def context_length(self) -> int:
        return int(self._manifest["context_length"])

    @property
    def shard_offsets(self) -> np.ndarray:
        """Global index of each shard's first token, plus the total: shard i holds tokens [o[i], o[i+1])."""
        return self._offsets.copy()

    def norm_stats(self, hookpoint: str) -> NormStats:
        self._resolve(hookpoint)
        if self._manifest["normalization"] is None:
            raise StoreError(f"store {self.path} has no shards yet, so no normalisation; finish the harvest first")
        return NormStats.from_dict(self._manifest["normalization"][hookpoint])

    def layer_slices(self, hookpoints: Sequence[str]) -> list[slice]:
        """Where each hookpoint's features sit in the concatenation `load(hookpoints)` returns."""
        slices, start = [], 0
        for hookpoint in self._resolve(hookpoints):
            slices.append(slice(start, start + self._manifest["dims"][hookpoint]))
            start += self._manifest["dims"][hookpoint]
        return slices

    def scale_vector(self, hookpoints: Hookpoints) -> Tensor:
        """Per-feature normalisation scale of the concatenation (each hookpoint's scalar over its slice)."""
        names = self._resolve(hookpoints)
        return torch.cat([torch.full((self._manifest["dims"][hp],), self.norm_stats(hp).scale) for hp in names])

    # ---------------------------------------------------------------- reads

    def load(
        self, hookpoints: Hookpoints, start: int | None = None, stop: int | None = None, normalize: bool = False
    ) -> Tensor:
        """Tokens [start, stop) as float32 `[n, sum of dims]`, hookpoints concatenated in the order given."""
        names = self._resolve(hookpoints)
        start, stop, _ = slice(start, stop).indices(self.n_tokens)
        stop = max(start, stop)
        parts = [self.read_rows(i, names, slice(lo, hi)) for i, lo, hi in self._pieces(start, stop)]
        width = sum(self._manifest["dims"][hp] for hp in names)
        out = torch.from_numpy(np.concatenate(parts) if parts else np.zeros((0, width), np.float32)).float()
        return out.mul_(self.scale_vector(names)) if normalize else out

    def token_ids(self, start: int | None = None, stop: int | None = None) -> Tensor:
        return self._token_field("token_ids", start, stop)

    def positions(self, start: int | None = None, stop: int | None = None) -> Tensor:
        return self._token_field("positions", start, stop)

    def context_index(self, start: int | None = None, stop: int | None = None) -> Tensor:
        return self._token_field("context_index", start, stop)

    def contexts(self) -> Tensor:
        """The harvested token ids `[n_contexts, context_length]`, every position (also those not stored)."""
        entry = self._manifest["contexts"]
        if entry is None:
            raise StoreError(
                f"store {self.path} was written without its contexts; rebuild them with "
                "build_contexts(HarvestConfig.from_dict(store.manifest['config']).data, tokenizer)"
            )
        if self._verify and not self._contexts_verified:
            self._raise_if_bad_contexts(check_hash=True)
            self._contexts_verified = True
        return torch.from_numpy(np.load(self.path / entry["file"], allow_pickle=False).astype(np.int64))

    def batches(
        self,
        hookpoints: Hookpoints,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        normalize: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        position_filter: int = 0,
        epochs: int | None = 1,
        buffer_shards: int = 4,
        return_index: bool = False,
    ) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
        """Stream `[batch_size, sum of dims]` batches; see `BatchStream` for the shuffling and its memory bound.

        `position_filter` drops tokens at positions below it; `epochs=None` repeats forever; `return_index` also
        yields each row's global token index (for `token_ids()`, `positions()`, `context_index()`).
        """
        return BatchStream(
            self,
            self._resolve(hookpoints),
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            normalize=normalize,
            device=torch.device(device),
            dtype=dtype,
            position_filter=position_filter,
            epochs=epochs,
            buffer_shards=buffer_shards,
            return_index=return_index,
        )

    def verify_all(self) -> None:
        """Hash every shard now (e.g. after copying a store) instead of on first read."""
        for index, shard in enumerate(self._shards):
            self._raise_if_bad(shard, check_hash=True)
            self._verified.add(index)

    # ---------------------------------------------------------------- shard access (used by BatchStream)

    def read_rows(
        self, shard: int, hookpoints: Sequence[str], rows: slice | np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows of one shard in the storage dtype, hookpoints concatenated; `rows` is a slice or a boolean mask.
        Written into `out` (e.g. a reused buffer) when given."""
        arrays = [self._array(shard, self._shards[shard]["activations"][hp]["file"]) for hp in hookpoints]
        n = len(range(*rows.indices(arrays[0].shape[0]))) if isinstance(rows, slice) else int(rows.sum())
        if out is None:
            out = np.empty((n, sum(a.shape[1] for a in arrays)), dtype=STORAGE_DTYPES[self._manifest["dtype"]])
        column = 0
        for array in arrays:
            out[:, column : column + array.shape[1]] = array[rows]
            column += array.shape[1]
        return out

    def read_token_field(self, shard: int, field: str) -> np.ndarray:
        """One shard's `token_ids`, `positions` or `context_index`, memory-mapped."""
        return self._array(shard, self._shards[shard]["tokens"][field]["file"])

    # ---------------------------------------------------------------- internals

    def _resolve(self, hookpoints: Hookpoints) -> list[str]:
        names = [hookpoints] if isinstance(hookpoints, str) else list(hookpoints)
        if not names:
            raise StoreError(f"no hookpoints given; name one or more of {self._manifest['hookpoints']}")
        unknown = [hp for hp in names if hp not in self._manifest["hookpoints"]]
        if unknown:
            raise StoreError(
                f"hookpoint(s) {unknown} are not in store {self.path}; it holds "
                f"{self._manifest['hookpoints']}. Use one of those or harvest the missing hookpoints"
            )
        if len(set(names)) != len(names):
            raise StoreError(f"hookpoints {names} contain duplicates; list each hookpoint once")
        return names

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, local start, local stop) covering global tokens [start, stop)."""
        if start >= stop:
            return
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for shard in range(first, self.n_shards):
            lo, hi = int(self._offsets[shard]), int(self._offsets[shard + 1])
            if lo >= stop:
                break
            yield shard, max(start, lo) - lo, min(stop, hi) - lo

    def _token_field(self, field: str, start: int | None, stop: int | None) -> Tensor:
        start, stop, _ = slice(start, stop).indices(self.n_tokens)
        parts = [self.read_token_field(i, field)[lo:hi] for i, lo, hi in self._pieces(start, max(start, stop))]
        return torch.from_numpy(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64))

    def _array(self, shard: int, relative: str) -> np.ndarray:
        if self._verify and shard not in self._verified:
            self._raise_if_bad(self._shards[shard], check_hash=True)
            self._verified.add(shard)
        try:
            return np.load(self.path / relative, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"shard {self._shards[shard]['name']} of store {self.path}: cannot read {relative} ({exc}). "
                f"Fix: {SHARD_FIX}"
            ) from None

    def _raise_if_bad_contexts(self, check_hash: bool) -> None:
        entry = self._manifest["contexts"]
        problem = None if entry is None else file_problem(self.path, entry, check_hash)
        if problem is not None:
            raise StoreError(f"store {self.path}: {problem}. Fix: re-run harvest with --resume, which rewrites it")

    def _raise_if_bad(self, shard: dict[str, Any], check_hash: bool) -> None:
        problem = shard_problem(self.path, shard, check_hash)
        if problem is not None:
            raise StoreError(f"shard {shard['name']} of store {self.path}: {problem}. Fix: {SHARD_FIX}")
