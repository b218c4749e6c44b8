"""A model's activations streamed straight into trainers, through a bounded shuffle buffer, without a store.

Consecutive tokens of a context are strongly correlated, so batches must mix many contexts; a store gets that by
reading shuffled shards, a stream by a block shuffle. The kept tokens (by the same `context_mask` rules as a
harvest) of all contexts, in order and repeated epoch after epoch, form one endless sequence cut into blocks of
`buffer_tokens` (a whole number of batches). A block is computed by forward passes over the contexts it spans (one
forward per `contexts_per_forward` contexts, each stopped after the deepest hookpoint), its rows permuted by a
generator seeded from (seed, block index), and handed out as consecutive batches: every token is emitted exactly
once per epoch, and memory holds one block plus one forward batch per hookpoint, whatever the token count.

Everything is a function of the step count, which makes resuming exact: step s lies in block s·B // L, which is
recomputed from its first context (the one forward batch it shares with the previous block is run again) and the
batches already consumed are skipped. Forward batches always start at multiples of `contexts_per_forward`, so a
recomputed batch equals the original bit for bit.

Hookpoints across processes (`exchange`, under torchrun with `--distribute-hookpoints`): each process holds the
rows of the hookpoints it owns (`owners`) and nothing else, while the forward passes are shared out: the forward
batches a block needs are taken N at a time, process r runs the r-th of each group, and one all-to-all sends every
hookpoint's rows to its owner. A forward batch is the same contexts whichever process runs it, so each owner
assembles exactly the rows one process would have computed, and the batches it yields are bit-identical to one
process's for those hookpoints.

With a `StoreWriter` (`--cache-to`), each forward batch of the first epoch is appended once, in order, so the
cache is the store `saelab harvest` would write for the same contexts; a resumed run first re-runs the forwards its
cache lost (the unflushed shard) before going on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from saelab.activations.normalize import NormStats, estimate_norm_stats
from saelab.activations.writer import StoreWriter
from saelab.data.tokenize import DataConfig, context_mask
from saelab.errors import ConfigError, DataError
from saelab.models.hookpoints import resolve_hookpoint
from saelab.models.hooks import capture

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from saelab.activations.store import ActivationStore

TOKEN_INDEX = "token_index"  # key of each row's position in the endless token sequence, when asked for


class Exchange(Protocol):
    """What the stream needs of a process group to share forward passes out (`saelab.training.distributed.Dist`)."""

    rank: int
    world_size: int

    def all_to_all(self, parts: list[Tensor], counts: list[int]) -> list[Tensor]: ...


class ActivationStream:
    """Block-shuffled `{hookpoint: [batch_size, d]}` batches of `model`'s activations on `contexts[N, T]`.

    `batches(start_step)` yields the batches from step `start_step` on, endlessly. `max_buffered_tokens` reports
    the most rows the shuffle buffer held at once (per hookpoint); `forward_tokens` / `forward_seconds` measure the
    model's work.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        contexts: Tensor,
        hookpoints: Sequence[str],
        data: DataConfig,
        *,
        batch_size: int,
        buffer_tokens: int = 65_536,
        contexts_per_forward: int = 8,
        seed: int = 0,
        token_index: bool = False,
        writer: Callable[[], StoreWriter] | None = None,
        exchange: Exchange | None = None,
        owners: Mapping[str, int] | None = None,
    ) -> None:
        if contexts.ndim != 2 or contexts.shape[0] == 0 or contexts.is_floating_point():
            raise DataError(
                f"contexts must be a non-empty integer tensor [n_contexts, context_length], got {contexts.dtype} "
                f"{tuple(contexts.shape)}; build them with saelab.data.tokenize.build_contexts"
            )
        if batch_size < 1 or contexts_per_forward < 1:
            raise ConfigError("batch_size and contexts_per_forward must be at least 1")
        if buffer_tokens < batch_size:
            raise ConfigError(
                f"buffer_tokens={buffer_tokens} is less than one batch ({batch_size}); the shuffle buffer must hold "
                "at least one batch (and should hold many: it sets how many contexts a batch mixes)"
            )
        self.hookpoints = list(dict.fromkeys(hookpoints))
        if not self.hookpoints:
            raise ConfigError("no hookpoints given; name at least one, e.g. resid_post.6")
        for hookpoint in self.hookpoints:  # a bad name fails here, before anything runs or is written
            resolve_hookpoint(model, hookpoint)
        self.model, self.tokenizer, self.data = model, tokenizer, data
        self.exchange = exchange
        if exchange is not None:
            if owners is None or set(owners) != set(self.hookpoints):
                raise ConfigError("sharing hookpoints across processes needs the owning rank of every hookpoint")
            if writer is not None or token_index:
                raise ConfigError(
                    "--cache-to cannot be combined with --distribute-hookpoints (no process sees every hookpoint); "
                    "harvest the store in a separate run, or train without --distribute-hookpoints"
                )
        self.owners = dict(owners) if exchange is not None and owners is not None else {}
        # The hookpoints whose rows this process holds and yields.
        self.held = [hp for hp in self.hookpoints if exchange is None or self.owners[hp] == exchange.rank]
        self.contexts = contexts.detach().to("cpu", torch.long)
        self.batch_size = batch_size
        self.block_tokens = buffer_tokens // batch_size * batch_size
        self.per_forward = contexts_per_forward
        self.seed = seed
        self.token_index = token_index
        kept = context_mask(data, tokenizer, self.contexts).sum(dim=1)
        self._ends = kept.cumsum(0).numpy()  # kept tokens up to and including each context
        self.epoch_tokens = int(self._ends[-1])
        if self.epoch_tokens == 0:
            raise DataError("no position of any context is kept; give more contexts or drop fewer positions")
        self._make_writer = writer
        self._writer: StoreWriter | None = None
        self._cached_through = 0  # contexts the writer holds (published or buffered)
        self._last: tuple[int, dict[str, Tensor]] | None = None  # the latest forward batch: (index, kept rows)
        self._first_block: tuple[dict[str, Tensor], Tensor] | None = None
        self._hookpoint_widths: dict[str, int] | None = None
        self.max_buffered_tokens = 0
        self.forward_tokens = 0
        self.forward_seconds = 0.0

    @property
    def n_forward_batches(self) -> int:
        return -(-self.contexts.shape[0] // self.per_forward)

    # ---- batches ------------------------------------------------------------------------------------------
    def batches(self, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        """The batches from step `start_step` on (endless); the block holding it is recomputed from its start."""
        self._open_writer()
        first = start_step * self.batch_size
        block, skip = first // self.block_tokens, first % self.block_tokens
        if block != 0:
            self._first_block = None
        per_block = self.block_tokens // self.batch_size
        while True:
            rows, index = self.block(block)
            order = self._permutation(block)
            order_on_device = order.to(next(iter(rows.values())).device)
            for i in range(skip // self.batch_size, per_block):
                chosen = slice(i * self.batch_size, (i + 1) * self.batch_size)
                batch = {hp: rows[hp][order_on_device[chosen]] for hp in self.held}
                if self.token_index:
                    batch[TOKEN_INDEX] = index[order[chosen]]
                yield batch
            del rows, index
            skip, block = 0, block + 1

    def block(self, block: int) -> tuple[dict[str, Tensor], Tensor]:
        """The rows of tokens [block·L, (block+1)·L) of the endless sequence, unshuffled, and their indices."""
        if block == 0 and self._first_block is not None:
            kept, self._first_block = self._first_block, None
            return kept
        length = self.block_tokens
        index = torch.arange(block * length, (block + 1) * length)
        pieces = self._pieces(block)
        rows: dict[str, Tensor] = {}
        for forward, acts in self._forwards([batch for batch, _, _, _ in pieces]):
            for batch, offset, take, filled in pieces:
                if batch != forward:
                    continue
                for hp, x in acts.items():
                    if hp not in rows:
                        rows[hp] = torch.empty((length, x.shape[1]), dtype=torch.float32, device=x.device)
                    rows[hp][filled : filled + take] = x[offset : offset + take]
        self.max_buffered_tokens = max(self.max_buffered_tokens, length)
        return rows, index

    def _pieces(self, block: int) -> list[tuple[int, int, int, int]]:
        """How block `block` is cut from forward batches: (forward batch, first kept row, rows, rows before)."""
        length = self.block_tokens
        pieces, filled = [], 0
        while filled < length:
            local = (block * length + filled) % self.epoch_tokens
            batch = int(np.searchsorted(self._ends, local, side="right")) // self.per_forward
            offset = local - self._kept_before(batch * self.per_forward)
            take = min(self._kept_in(batch) - offset, length - filled)
            pieces.append((batch, offset, take, filled))
            filled += take
        return pieces

    def _kept_in(self, batch: int) -> int:
        first = batch * self.per_forward
        return self._kept_before(min(first + self.per_forward, self.contexts.shape[0])) - self._kept_before(first)

    def _forwards(self, batches: list[int]) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """(batch, its kept rows of the held hookpoints) for each distinct batch of `batches`, in order."""
        order = [b for i, b in enumerate(batches) if i == 0 or b != batches[i - 1]]
        if self.exchange is None:
            for batch in order:
                yield batch, self._forward(batch)
            return
        if self._last is not None and order and order[0] == self._last[0]:
            yield self._last
            order = order[1:]
        world, rank = self.exchange.world_size, self.exchange.rank
        for start in range(0, len(order), world):
            group = order[start : start + world]
            mine = self._run_batch(group[rank]) if rank < len(group) else None
            received = self._exchange(mine, group)
            for batch in group:
                yield batch, received[batch]
            self._last = (group[-1], received[group[-1]])

    def _exchange(self, mine: dict[str, Tensor] | None, group: list[int]) -> dict[int, dict[str, Tensor]]:
        """Every hookpoint's rows of the forward batches in `group` (rank r ran the r-th) sent to its owner: the
        rows of the held hookpoints of each batch."""
        assert self.exchange is not None
        widths = self._widths()
        parts = []
        for owner in range(self.exchange.world_size):
            owned = [hp for hp in self.hookpoints if self.owners[hp] == owner]
            parts.append(torch.cat([mine[hp].reshape(-1) for hp in owned]) if mine is not None
                         else torch.empty(0))
        held_width = sum(widths[hp] for hp in self.held)
        counts = [self._kept_in(group[r]) * held_width if r < len(group) else 0
                  for r in range(self.exchange.world_size)]
        received = self.exchange.all_to_all(parts, counts)
        out = {}
        for batch, flat in zip(group, received, strict=False):  # a part: each held hookpoint's [rows, d] in turn
            n = self._kept_in(batch)
            parts_of = flat.split([n * widths[hp] for hp in self.held])
            out[batch] = {hp: part.reshape(n, widths[hp]) for hp, part in zip(self.held, parts_of, strict=True)}
        return out

    def _widths(self) -> dict[str, int]:
        """Each hookpoint's width, from a one-context forward (every process can know them without exchanging)."""
        if self._hookpoint_widths is None:
            acts = capture(self.model, self.contexts[:1], self.hookpoints, stop_early=True)
            self._hookpoint_widths = {hp: x.shape[-1] for hp, x in acts.items()}
        return self._hookpoint_widths

    def norm_stats(self) -> dict[str, NormStats]:
        """Each hookpoint's normalisation statistics, estimated on the first block (the store estimates them on
        its first shard): what a fresh SAE with preprocessing="scale" needs before training starts."""
        rows, index = self.block(0)
        self._first_block = (rows, index)  # training starts with this block: kept rather than computed again
        return {hp: estimate_norm_stats(x.cpu()) for hp, x in rows.items()}

    def finish_cache(self) -> ActivationStore | None:
        """Run the forwards the cache still lacks (training may end before the first epoch does), then complete
        the cached store and open it; None without a cache."""
        self._open_writer()
        if self._writer is None:
            return None
        if not self._writer.complete:
            self._catch_up(self.contexts.shape[0])
        return self._writer.finish()

    # ---- internals -----------------------------------------------------------------------------------------
    def _permutation(self, block: int) -> Tensor:
        state = np.random.SeedSequence([self.seed, block]).generate_state(2, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))
        return torch.randperm(self.block_tokens, generator=generator)

    def _kept_before(self, context: int) -> int:
        return int(self._ends[context - 1]) if context > 0 else 0

    def _forward(self, batch: int) -> dict[str, Tensor]:
        """The kept rows of forward batch `batch`, in context order (the latest one is reused, not recomputed)."""
        if self._last is not None and self._last[0] == batch:
            return self._last[1]
        rows = self._run_batch(batch)
        self._last = (batch, rows)
        return rows

    def _run_batch(self, batch: int) -> dict[str, Tensor]:
        first = batch * self.per_forward
        self._catch_up(first)
        return self._run(first, min(first + self.per_forward, self.contexts.shape[0]))

    def _run(self, first: int, stop: int) -> dict[str, Tensor]:
        """One forward over contexts [first, stop); appended to the cache when it is the cache's next part."""
        ids = self.contexts[first:stop]
        started = time.perf_counter()
        keep = context_mask(self.data, self.tokenizer, ids)
        acts = capture(self.model, ids, self.hookpoints, stop_early=True)
        self.forward_seconds += time.perf_counter() - started
        self.forward_tokens += ids.numel()
        kept = {hp: x[keep.to(x.device)] for hp, x in acts.items()}
        if self._writer is not None and not self._writer.complete and first == self._cached_through:
            length = ids.shape[1]
            self._writer.append(
                kept,
                token_ids=ids[keep],
                positions=torch.arange(length).expand(len(ids), length)[keep],
                context_index=torch.arange(first, stop)[:, None].expand_as(ids)[keep],
                n_contexts=len(ids),
            )
            self._cached_through = stop
        return {hp: x.float() for hp, x in kept.items()}

    def _catch_up(self, until: int) -> None:
        """Feed the cache the contexts before `until` it does not hold yet (after a resume, the ones of the shard
        that was never flushed), in forward batches aligned like the original ones."""
        if self._writer is None or self._writer.complete:
            return
        while self._cached_through < until:
            first = self._cached_through
            stop = min((first // self.per_forward + 1) * self.per_forward, self.contexts.shape[0])
            self._run(first, stop)

    def _open_writer(self) -> None:
        if self._make_writer is not None and self._writer is None:
            self._writer = self._make_writer()
            self._cached_through = self._writer.n_contexts
            self._last = self._first_block = None  # computed before the cache existed: run again for the cache
