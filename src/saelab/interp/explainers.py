"""Explanations of latents: from an LLM shown the training examples, and a non-LLM baseline as a floor.

The baseline names the latent's most frequent activating tokens; an LLM explanation that scores no better than it
says little beyond "fires on these tokens".
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np

from saelab.interp.examples import LatentExamples, TokenText, marked_text
from saelab.interp.llm import ChatClient, ChatRequest
from saelab.interp.prompts import explainer_request, parse_explanation


@dataclasses.dataclass(frozen=True)
class Explanation:
    """`text` is None when the explainer's reply held no usable explanation (counted as invalid)."""

    latent: int
    text: str | None
    source: str  # the client's model_id, or "baseline"
    reply: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def explanation_request(examples: LatentExamples, text: TokenText, max_tokens: int = 64) -> ChatRequest:
    """The explainer prompt for one latent's training examples (marked text plus each marked token's 1-10 value)."""
    excerpts = []
    for example in examples.train:
        pieces = text.pieces(example.token_ids)
        scaled = example.scaled(examples.max_activation)
        marks = [value > 0 for value in scaled]
        activating = [(piece, value) for piece, value in zip(pieces, scaled, strict=True) if value > 0]
        excerpts.append((marked_text(pieces, marks), activating))
    return explainer_request(excerpts, max_tokens)


def explain_latents(
    client: ChatClient, latent_examples: Sequence[LatentExamples], text: TokenText, max_tokens: int = 64
) -> list[Explanation]:
    """One explanation per latent, requested together so the client can batch or parallelise them."""
    requests = [explanation_request(examples, text, max_tokens) for examples in latent_examples]
    replies = client.complete_many(requests)
    return [
        Explanation(examples.latent, parse_explanation(reply.text), client.model_id, reply.text)
        for examples, reply in zip(latent_examples, replies, strict=True)
    ]


def baseline_explanation(latent: int, token_ids: np.ndarray, text: TokenText, n_tokens: int = 5) -> Explanation:
    """The `n_tokens` most frequent texts among the tokens where the latent fires (`token_ids`, one per activating
    token; ids that differ only in surrounding whitespace count together)."""
    ids, counts = np.unique(token_ids, return_counts=True)
    order = np.argsort(-counts, kind="stable")[: 4 * n_tokens]
    merged: Counter[str] = Counter()
    for token_id, count in zip(ids[order].tolist(), counts[order].tolist(), strict=True):
        token = text.piece(token_id).strip()
        if token:
            merged[token] += count
    common = [token for token, _ in merged.most_common(n_tokens)]
    return Explanation(latent, "the tokens " + ", ".join(f'"{t}"' for t in common) if common else None, "baseline")
