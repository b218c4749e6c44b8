"""Tokenise documents and pack them into fixed-length contexts, and choose which positions count.

Packing: documents are tokenised without special tokens, each is followed by EOS, and the stream is cut into
contexts; with `prepend_bos` each context starts with BOS (position 0 then acts as the attention sink the model
was trained with, instead of a random mid-document token). The last partial context is dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.config import Config
from saelab.data.corpora import iter_documents
from saelab.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_TOKENIZE_BATCH = 64  # documents per fast-tokenizer call


@dataclasses.dataclass
class DataConfig(Config):
    """Which text, cut how, and which positions of each context are used."""

    source: str = dataclasses.field(
        default="kjv", metadata={"help": "corpus: kjv, pydoc, a .txt/.jsonl file or folder, hf:<name>[:<cfg>]:<split>"}
    )
    context_length: int = dataclasses.field(default=128, metadata={"help": "tokens per context, BOS included"})
    n_tokens: int = dataclasses.field(
        default=200_000, metadata={"help": "usable positions to harvest (sets how many contexts are packed)"}
    )
    prepend_bos: bool = dataclasses.field(default=True, metadata={"help": "start every context with BOS"})
    drop_first_positions: int = dataclasses.field(
        default=0, metadata={"help": "ignore the first N positions of each context (early tokens are atypical)"}
    )
    exclude_special_tokens: bool = dataclasses.field(
        default=True, metadata={"help": "ignore BOS/EOS/pad/other special-token positions"}
    )
    text_field: str = dataclasses.field(default="text", metadata={"help": "text field of .jsonl / HF datasets"})

    def validate(self) -> None:
        if self.context_length < 2:
            raise ConfigError(f"context_length must be at least 2 (got {self.context_length})")
        if self.n_tokens <= 0:
            raise ConfigError(f"n_tokens must be positive (got {self.n_tokens})")
        if not 0 <= self.drop_first_positions < self.context_length:
            raise ConfigError(
                f"drop_first_positions={self.drop_first_positions} must be in 0..context_length-1 "
                f"({self.context_length - 1}); otherwise no position of a context is used"
            )

    def n_contexts(self) -> int:
        """Contexts needed for `n_tokens` usable positions. A BOS at position 0 that is excluded anyway is not
        counted; EOS positions inside contexts are, so the usable count can fall slightly short of n_tokens."""
        bos_excluded = 1 if self.prepend_bos and self.exclude_special_tokens else 0
        usable = self.context_length - max(self.drop_first_positions, bos_excluded)
        return math.ceil(self.n_tokens / usable)


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(documents)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _special_id(tokenizer: PreTrainedTokenizerBase, which: str, fix: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None:
        name = f"{type(tokenizer).__name__} ({tokenizer.name_or_path})"
        raise DataError(f"the tokenizer {name} has no {which.upper()} token; {fix}")
    return int(token_id)


def pack_contexts(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    context_length: int,
    n_contexts: int | None = None,
    prepend_bos: bool = True,
    show_progress: bool = False,
) -> torch.LongTensor:
    """`[N, context_length]` token ids; N = `n_contexts` (reading only as many documents as needed), or every full
    context the documents yield when None."""
    bos = None
    if prepend_bos:
        bos = _special_id(tokenizer, "bos", "set prepend_bos=False or give the tokenizer a bos_token")
    eos = _special_id(tokenizer, "eos", "give the tokenizer an eos_token to separate documents")
    body = context_length - (1 if prepend_bos else 0)
    if body < 1:
        raise DataError(f"context_length={context_length} leaves no room for text after BOS; use at least 2")
    needed = None if n_contexts is None else n_contexts * body
    eos_piece = np.array([eos], dtype=np.int64)
    chunks: list[np.ndarray] = []
    n_stream = 0
    with tqdm(total=needed, unit="tok", desc="tokenising", disable=not show_progress) as bar:
        for batch in _batches(documents, _TOKENIZE_BATCH):
            ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            pieces = [part for doc in ids for part in (np.asarray(doc, dtype=np.int64), eos_piece)]
            chunk = np.concatenate(pieces)
            chunks.append(chunk)
            n_stream += len(chunk)
            bar.update(len(chunk))
            if needed is not None and n_stream >= needed:
                break
    available = n_stream // body
    if available == 0:
        raise DataError(
            f"the corpus yielded {n_stream} tokens, not enough for one context of {context_length}; "
            "use a larger corpus or a shorter context_length"
        )
    if n_contexts is not None and available < n_contexts:
        raise DataError(
            f"the corpus yields only {n_stream} tokens = {available} contexts of {context_length} "
            f"({available * body} text tokens), but {n_contexts} contexts ({needed} text tokens) were requested; "
            "request fewer tokens or use a larger corpus (e.g. join sources with '+')"
        )
    n = available if n_contexts is None else n_contexts
    tokens = torch.from_numpy(np.concatenate(chunks)[: n * body]).view(n, body)
    if bos is not None:
        tokens = torch.cat([torch.full((n, 1), bos, dtype=torch.long), tokens], dim=1)
    return tokens


def position_mask(input_ids: Tensor, drop_first: int = 0, exclude_token_ids: Sequence[int] = ()) -> torch.BoolTensor:
    """`[N, T]` True where a position counts: not among the first `drop_first` of its context, not a listed token."""
    if not 0 <= drop_first < input_ids.shape[-1]:
        raise DataError(
            f"drop_first={drop_first} must be in 0..{input_ids.shape[-1] - 1} for contexts of length "
            f"{input_ids.shape[-1]}; otherwise no position is left"
        )
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    mask[..., :drop_first] = False
    if exclude_token_ids:
        excluded = torch.tensor(list(exclude_token_ids), dtype=input_ids.dtype, device=input_ids.device)
        mask &= ~torch.isin(input_ids, excluded)
    return mask


def build_contexts(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, show_progress: bool = False, skip_contexts: int = 0
) -> Tensor:
    """The `[cfg.n_contexts(), cfg.context_length]` token ids the config asks for, after the first `skip_contexts`
    contexts of the corpus (e.g. the ones a training store already holds)."""
    documents = iter_documents(cfg.source, text_field=cfg.text_field)
    try:
        return pack_contexts(
            documents, tokenizer, cfg.context_length, skip_contexts + cfg.n_contexts(), cfg.prepend_bos,
            show_progress=show_progress,
        )[skip_contexts:]
    except DataError as exc:
        raise DataError(f"corpus {cfg.source!r}: {exc}") from None


def context_mask(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, input_ids: Tensor) -> torch.BoolTensor:
    """`position_mask` with the config's rules: which positions of `build_contexts` output are harvested."""
    excluded = tokenizer.all_special_ids if cfg.exclude_special_tokens else ()
    return position_mask(input_ids, cfg.drop_first_positions, excluded)
