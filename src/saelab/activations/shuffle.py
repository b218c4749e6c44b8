"""Shuffled batches from a store whose memory use does not grow with the store's size.

Tokens of one shard come from consecutive contexts and are strongly correlated, so batches must mix shards. A full
shuffle would need the whole store in memory; instead each epoch visits the shards in a random order and keeps a
sliding pool of at most `buffer_shards` shards' worth of rows: after a shard is added, batches of rows drawn at
random from the whole pool are handed out until there is room for the next shard. The trade-off: a batch mixes
tokens of about `buffer_shards` shards (more is closer to a full shuffle and costs memory, not time), a token is
most likely to leave the pool soon after its shard arrives, and the last shards of an epoch mix less. Every
token passing the position filter is yielded exactly once per epoch (with `drop_last`, fewer than `batch_size` of
them are dropped at the end of each epoch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from saelab.activations.layout import STORAGE_DTYPES
from saelab.errors import ConfigError, DataError

if TYPE_CHECKING:
    from saelab.activations.store import ActivationStore


class BatchStream:
    """Iterator over `[batch_size, features]` batches (or `(batch, global token index)` pairs with `return_index`).

    The pool is one array of `capacity_tokens` rows (fewer for a small store), allocated once; `resident_tokens` /
    `max_resident_tokens` report how many of its rows are in use. Each batch is a fresh tensor.
    """

    def __init__(
        self,
        store: ActivationStore,
        hookpoints: Sequence[str],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        normalize: bool,
        device: torch.device,
        dtype: torch.dtype,
        position_filter: int,
        epochs: int | None,
        buffer_shards: int,
        return_index: bool,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if buffer_shards < 1:
            raise ConfigError(f"buffer_shards must be at least 1, got {buffer_shards}")
        if epochs is not None and epochs < 1:
            raise ConfigError(f"epochs must be at least 1 (or None for endless), got {epochs}")
        if position_filter < 0:
            raise ConfigError(f"position_filter must be >= 0, got {position_filter}")
        self._store = store
        self._hookpoints = list(hookpoints)
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._seed = seed
        self._drop_last = drop_last
        self._device = device
        self._dtype = dtype
        self._position_filter = position_filter
        self._epochs = epochs
        self._return_index = return_index
        self._storage_dtype = STORAGE_DTYPES[store.manifest["dtype"]]
        self._scale = store.scale_vector(self._hookpoints).to(device, dtype) if normalize else None
        self._max_shard_rows = int(np.diff(store.shard_offsets).max(initial=0))
        self._keep_rows = (buffer_shards - 1) * self._max_shard_rows if shuffle else 0
        self.capacity_tokens = self._keep_rows + self._max_shard_rows + batch_size - 1
        self.resident_tokens = 0
        self.max_resident_tokens = 0
        self._part = (0, 1)
        self._batches = self._generate()

    def shard(self, rank: int, world_size: int) -> BatchStream:
        """From now on yield only rows [r·B/N, (r+1)·B/N) of each batch (data-parallel rank r of N): the batches
        and their order are unchanged, but only this rank's rows are copied out of the pool. Returns self."""
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, {world_size})")
        self._part = (rank, world_size)
        return self

    def __iter__(self) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> Tensor | tuple[Tensor, Tensor]:
        return next(self._batches)

    def _generate(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        width = sum(self._store.dims[hp] for hp in self._hookpoints)
        rows = min(self.capacity_tokens, self._store.n_tokens)
        pool = np.empty((rows, width), dtype=self._storage_dtype)  # allocated once, reused for every shard
        pool_index = np.empty(rows, dtype=np.int64)
        epoch = 0
        while self._epochs is None or epoch < self._epochs:
            rng = np.random.default_rng([self._seed, epoch])
            n_shards = self._store.n_shards
            order = rng.permutation(n_shards) if self._shuffle else np.arange(n_shards)
            size = emitted = 0
            for shard in order:
                size += self._read_shard(int(shard), pool[size:], pool_index[size:])
                self._set_resident(size)
                surplus = max(size - self._keep_rows, 0)
                n_out = min(-(-surplus // self._batch_size), size // self._batch_size) * self._batch_size
                yield from self._take(pool, pool_index, size, n_out, rng)
                emitted += n_out
                size -= n_out
                self._set_resident(size)
            n_out = size if not self._drop_last else size // self._batch_size * self._batch_size
            yield from self._take(pool, pool_index, size, n_out, rng)
            emitted += n_out
            self._set_resident(0)
            if emitted == 0:
                raise DataError(
                    f"store {self._store.path} yields no batch of {self._batch_size} tokens (it keeps "
                    f"{size} tokens at positions >= {self._position_filter}); lower batch_size or "
                    "position_filter, or pass drop_last=False"
                )
            epoch += 1

    def _read_shard(self, shard: int, out: np.ndarray, out_index: np.ndarray) -> int:
        """Append one shard's kept rows to the pool (`out` is the pool's free tail); returns the row count."""
        first = int(self._store.shard_offsets[shard])
        if self._position_filter:
            keep = self._store.read_token_field(shard, "positions") >= self._position_filter
            index = first + np.flatnonzero(keep)
        else:
            keep = slice(None)
            index = first + np.arange(int(np.diff(self._store.shard_offsets)[shard]), dtype=np.int64)
        self._store.read_rows(shard, self._hookpoints, keep, out=out[: len(index)])
        out_index[: len(index)] = index
        return len(index)

    def _take(
        self, pool: np.ndarray, pool_index: np.ndarray, size: int, n_out: int, rng: np.random.Generator
    ) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """Yield `n_out` of the pool's first `size` rows (random ones when shuffling), then move the rows that stay
        into the freed places so they are again the pool's first `size - n_out` rows: only about `n_out` rows are
        copied, never the whole pool."""
        order = rng.permutation(size) if self._shuffle else np.arange(size)
        chosen, staying = order[:n_out], order[n_out:]
        for start in range(0, n_out, self._batch_size):
            rows = chosen[start : start + self._batch_size]
            if self._part[1] > 1:
                rank, world = self._part
                rows = rows[rank * len(rows) // world : (rank + 1) * len(rows) // world]
            batch = torch.from_numpy(pool[rows]).to(device=self._device, dtype=self._dtype)
            if self._scale is not None:
                batch.mul_(self._scale)
            yield (batch, torch.from_numpy(pool_index[rows])) if self._return_index else batch
        remaining = size - n_out
        moving, freed = staying[staying >= remaining], chosen[chosen < remaining]
        pool[freed], pool_index[freed] = pool[moving], pool_index[moving]

    def _set_resident(self, rows: int) -> None:
        self.resident_tokens = rows
        self.max_resident_tokens = max(self.max_resident_tokens, rows)
