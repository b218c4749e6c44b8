"""Synthetic stores for the activation tests: known arrays written through the real StoreWriter."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from saelab.activations.store import ActivationStore
from saelab.activations.writer import StoreWriter


@dataclasses.dataclass
class Written:
    """What went into a synthetic store, for comparison with what comes out."""

    store: ActivationStore
    activations: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    positions: torch.Tensor
    context_index: torch.Tensor


def write_batches(
    writer: StoreWriter, activations: dict[str, torch.Tensor], context_length: int, contexts_per_append: int, start: int
) -> None:
    """Append contexts [start, end) of `activations` (rows ordered context-major) in batches of contexts."""
    n_contexts = next(iter(activations.values())).shape[0] // context_length
    for first in range(start, n_contexts, contexts_per_append):
        last = min(first + contexts_per_append, n_contexts)
        rows = slice(first * context_length, last * context_length)
        positions = torch.arange(context_length).repeat(last - first)
        contexts = torch.arange(first, last).repeat_interleave(context_length)
        writer.append(
            {hp: x[rows] for hp, x in activations.items()}, contexts * 7 % 100, positions, contexts, last - first
        )


@pytest.fixture
def append_contexts() -> Callable[..., None]:
    return write_batches


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., Written]:
    def make(
        dims: dict[str, int] | None = None,
        n_contexts: int = 12,
        context_length: int = 4,
        shard_tokens: int = 10,
        contexts_per_append: int = 3,
        dtype: str = "float32",
        name: str = "store",
    ) -> Written:
        dims = dims or {"resid_post.0": 6, "resid_post.1": 4}
        n = n_contexts * context_length
        activations = {hp: torch.randn(n, d) * (i + 1) + i for i, (hp, d) in enumerate(dims.items())}
        writer = StoreWriter(
            tmp_path / name,
            model="synthetic",
            hookpoints=list(dims),
            dtype=dtype,
            context_length=context_length,
            shard_tokens=shard_tokens,
        )
        write_batches(writer, activations, context_length, contexts_per_append, start=0)
        contexts = torch.arange(n_contexts).repeat_interleave(context_length)
        return Written(
            store=writer.finish(),
            activations=activations,
            token_ids=contexts * 7 % 100,
            positions=torch.arange(context_length).repeat(n_contexts),
            context_index=contexts,
        )

    return make
