"""The autointerp feature pages: each scored latent's record, examples, logits and scores as a page.

Takes plain values (the token text, the unembedding, the page layout) rather than the run's config, so it does not
depend on run.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from saelab.activations.store import ActivationStore
from saelab.interp.examples import Example, ExampleSampler, TokenText
from saelab.interp.feature_data import FeatureData, FeatureDataConfig
from saelab.interp.logits import decoder_directions, logit_effects, reads_residual_stream
from saelab.interp.record import LatentRecord
from saelab.report.feature_browser import write_feature_browser
from saelab.report.feature_pages import ContextView, LatentPage, write_feature_site
from saelab.saes import SparseAutoencoder

LOGITS_NOTE = (
    "Logit effects: the unembedding W_U applied to the unit-norm decoder direction of the latent (for a deep SAE: "
    "decode(a·e_i) − decode(0) at its largest recorded activation a); the direct path only, the final norm skipped "
    "(neither its normalisation nor its gain applied)."
)
HISTOGRAM_BINS = 40


def write_pages(
    sae: SparseAutoencoder, record: LatentRecord, sampler: ExampleSampler, results: list[dict[str, Any]],
    folder: Path, label: str, *, text: TokenText, unembedding: Tensor, top: int, quantiles: int, per_quantile: int,
    seed: int, logit_tokens: int,
) -> Path:
    """The site of SAE `label` for `results` (per-latent autointerp results) in `folder`; returns the index path.

    Each page shows the `top` strongest windows, then `per_quantile` windows (drawn with `seed`) from each of
    `quantiles` activation quantiles, and the `logit_tokens` most promoted and suppressed tokens."""
    latents = [r["latent"] for r in results]
    logits = _logits(sae, record, results, text, unembedding, logit_tokens)
    pages = []
    for result in results:
        latent = result["latent"]
        _, values = record.activations(latent)
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS)
        strongest = sampler.top(latent, top)
        drawn = sampler.quantile_examples(latent, quantiles, per_quantile, seed, exclude=strongest)
        sections = [("Top activations", _views(strongest, result["max_activation"], text))]
        for quantile in reversed(range(quantiles)):
            chosen = [e for e in drawn if e.quantile == quantile]
            sections.append((f"Quantile {quantile + 1} of {quantiles} (1 = weakest)",
                             _views(chosen, result["max_activation"], text)))
        top_logits, bottom_logits = logits.get(latent, (None, None))
        pages.append(LatentPage(
            latent=latent, count=result["count"], frequency=result["frequency"],
            max_activation=result["max_activation"], histogram_edges=edges.tolist(), histogram_counts=counts.tolist(),
            explanations={name: e["text"] for name, e in result["explanations"].items()},
            scores=_page_scores(result), contexts=sections, top_logits=top_logits, bottom_logits=bottom_logits,
        ))
    notes = [f"SAE {label} ({sae.architecture}) at {record.hookpoint}: {sae.n_latents} latents, "
             f"{record.n_tokens:,} recorded tokens; {len(latents)} scored latents shown. Scores: accuracy of the "
             "yes/no answers of the scorer on the test windows (detection: does the latent fire in this window; "
             "fuzzing: are the marked tokens the activating ones)."]
    note = LOGITS_NOTE if logits else f"No logit effects: {record.hookpoint} is not read in the residual-stream basis."
    return write_feature_site(folder, f"SAE {label}, {record.hookpoint}", pages, notes, note)


def write_browser(
    sae: SparseAutoencoder, record: LatentRecord, store: ActivationStore, results: list[dict[str, Any]],
    folder: Path, label: str, *, text: TokenText, unembedding: Tensor, cfg: FeatureDataConfig,
) -> Path:
    """The feature browser of every latent of SAE `label` in `folder`, the scored latents with their explanation
    (the LLM's, else the baseline's) and scores as sortable columns; returns the index path."""
    explanations = {}
    for result in results:
        texts = [e["text"] for e in result["explanations"].values() if e["text"]]
        if texts:
            explanations[result["latent"]] = texts[0]
    scores: dict[str, dict[int, float | None]] = {}
    for result in results:
        for name, value in _page_scores(result).items():
            scores.setdefault(name, {})[result["latent"]] = value
    data = FeatureData(sae, record, store, text, cfg, title=f"SAE {label}, {record.hookpoint}",
                       unembedding=unembedding, explanations=explanations, scores=scores,
                       notes=[f"{len(results)} latents explained and scored; scores are the scorer's accuracy."])
    return write_feature_browser(folder, data.index(), data.chunks())


def _views(examples: list[Example], max_activation: float, text: TokenText) -> list[ContextView]:
    return [
        ContextView(f"context {e.context}, positions {e.start}-{e.start + len(e.token_ids) - 1}",
                    text.pieces(e.token_ids), list(e.activations), e.scaled(max_activation))
        for e in examples
    ]


def _page_scores(result: dict[str, Any]) -> dict[str, float | None]:
    scores = {}
    for explainer, per_scorer in result["scores"].items():
        prefix = "" if explainer == "llm" else f"{explainer} "
        for scorer, block in per_scorer.items():
            scores[f"{prefix}{scorer}"] = block["metrics"]["accuracy"]
    return scores


def _logits(
    sae: SparseAutoencoder, record: LatentRecord, results: list[dict[str, Any]], text: TokenText,
    unembedding: Tensor, logit_tokens: int,
) -> dict[int, tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
    """Promoted and suppressed tokens per latent, or nothing when the SAE does not read the residual stream."""
    if not results or not reads_residual_stream(record.hookpoint) or sae.d_in != unembedding.shape[1]:
        return {}
    latents = [r["latent"] for r in results]
    directions = decoder_directions(sae, latents, [max(r["max_activation"], 1e-6) for r in results])
    top_v, top_i, bottom_v, bottom_i = logit_effects(directions, unembedding, logit_tokens)

    def named(values: Tensor, ids: Tensor) -> list[tuple[str, float]]:
        return [(text.piece(i), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]

    return {latent: (named(top_v[row], top_i[row]), named(bottom_v[row], bottom_i[row]))
            for row, latent in enumerate(latents)}
