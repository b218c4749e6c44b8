"""Split one store into token ranges for training, analysis and held-out downstream evaluation.

Recipes that train SAEs, analyse them on other tokens and splice them into the model on yet other contexts all
split the same way, with contexts kept whole so no context is seen by two stages.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from saelab.activations.store import ActivationStore
from saelab.errors import ConfigError


@dataclasses.dataclass
class StoreSplit:
    """Token ranges of the store (contexts kept whole) and the held-out contexts' token ids."""

    train: tuple[int, int]
    analysis: tuple[int, int]
    downstream: Tensor  # [contexts, context_length]


def split_store(store: ActivationStore, analysis_tokens: int, downstream_contexts: int) -> StoreSplit:
    """The last `downstream_contexts` contexts for the CE splices, before them whole contexts holding at least
    `analysis_tokens` stored tokens for the analysis, and everything earlier for SAE training."""
    contexts = store.contexts()
    context_of = store.context_index()
    if downstream_contexts >= contexts.shape[0]:
        raise ConfigError(f"the store has {contexts.shape[0]} contexts, not more than downstream_contexts")
    end = int(torch.searchsorted(context_of, contexts.shape[0] - downstream_contexts))
    if end <= analysis_tokens:
        raise ConfigError(
            f"the store has {end} tokens before its held-out contexts, not more than analysis_tokens="
            f"{analysis_tokens}; harvest more (--data.n-tokens) or lower --analysis-tokens"
        )
    start = int(torch.searchsorted(context_of, context_of[end - analysis_tokens]))
    return StoreSplit((0, start), (start, end), contexts[-downstream_contexts:])


def load_half(store: ActivationStore, hookpoint: str, tokens: tuple[int, int], chunk: int = 65_536) -> Tensor:
    """A token range of one hookpoint as float16 (as stored), read in chunks so float32 never holds it all."""
    return torch.cat([store.load(hookpoint, lo, min(lo + chunk, tokens[1])).half()
                      for lo in range(tokens[0], tokens[1], chunk)])
