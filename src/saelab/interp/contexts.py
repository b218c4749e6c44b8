"""Feature contexts: for chosen latents, their top-activating and randomly sampled activating contexts, with the
activating tokens marked `<<like this>>` and their activation values, as text.

Built on the latent record (one pass of the SAE over a store; `record_latents`) and the example sampler (windows
rebuilt from the store's contexts and token positions), so the HTML feature pages and autointerp read the same
windows. Random contexts never overlap the top ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from saelab.errors import ConfigError
from saelab.interp.examples import Example, ExampleSampler, TokenText, marked_text
from saelab.interp.record import LatentRecord


@dataclasses.dataclass(frozen=True)
class FeatureContexts:
    latent: int
    count: int  # recorded tokens on which the latent fires
    n_tokens: int  # recorded tokens
    max_activation: float
    top: list[Example]
    random: list[Example]


def feature_contexts(
    record: LatentRecord, sampler: ExampleSampler, latents: Sequence[int], n_top: int, n_random: int, seed: int = 0
) -> list[FeatureContexts]:
    """The `n_top` strongest and `n_random` uniformly drawn activating windows of each latent (fewer when it
    fires on fewer separate windows)."""
    counts = record.counts
    out = []
    for latent in latents:
        if not 0 <= latent < record.n_latents:
            raise ConfigError(f"latent {latent} is out of range: the SAE has {record.n_latents} latents")
        _, values = record.activations(latent)
        top = sampler.top(latent, n_top)
        random = sampler.random_activating(latent, n_random, seed=seed, exclude=top)
        out.append(FeatureContexts(latent, int(counts[latent]), record.n_tokens, float(np.max(values, initial=0.0)),
                                   top, random))
    return out


def example_text(example: Example, text: TokenText) -> str:
    """One window: its text with the activating tokens marked, then each marked token's activation."""
    pieces = text.pieces(example.token_ids)
    marks = [value > 0 for value in example.activations]
    values = ", ".join(f"{piece.strip()!r} {value:.3g}"
                       for piece, value in zip(pieces, example.activations, strict=True) if value > 0)
    where = f"context {example.context}, positions {example.start}-{example.start + len(example.token_ids) - 1}"
    return f"[max {example.max_activation:.3g}] {where}: {marked_text(pieces, marks)!r}\n      activations: {values}"


def feature_text(contexts: FeatureContexts, text: TokenText) -> str:
    """A latent's block of the text output."""
    share = contexts.count / max(contexts.n_tokens, 1)
    lines = [f"latent {contexts.latent}: fires on {contexts.count:,} of {contexts.n_tokens:,} recorded tokens "
             f"({share:.3%}), max activation {contexts.max_activation:.4g}"]
    if contexts.count == 0:
        return lines[0] + " (never fires: no contexts)"
    for title, examples in (("top-activating contexts", contexts.top), ("random activating contexts", contexts.random)):
        lines.append(f"  {title}:")
        lines += [f"    {example_text(example, text)}" for example in examples]
    return "\n".join(lines)
