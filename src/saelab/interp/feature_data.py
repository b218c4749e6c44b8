"""The data of a feature browser: what a person looks at to see what each latent of an SAE fires on.

Computed from a latent record, so the SAE never runs again over the store. Two parts:

- the index: per latent its firing count, largest activation and (when autointerp ran) explanation and scores, plus
  the density histogram of all latents; columnar and rounded so 100k latents stay about 1 MB;
- chunks of `chunk_size` consecutive latents: per latent the top-activating windows, windows sampled from each
  activation quantile, the histogram of its nonzero activations, the tokens its decoder direction promotes and
  suppresses (see `saelab.interp.logits`), and for a multi-layer SAE the norm of its encoder and decoder segment in
  each layer. A window's tokens are ids into the chunk's string table, so repeated tokens cost a few bytes each.

Everything is plain JSON-ready data; `saelab.report.feature_browser` writes it out as a site.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.errors import ConfigError
from saelab.interp.examples import Example, ExampleSampler, TokenText
from saelab.interp.logits import decoder_directions, logit_effects, reads_residual_stream
from saelab.interp.record import LatentRecord
from saelab.saes.base import SparseAutoencoder
from saelab.saes.multilayer import MultiLayerSAE, segment_norms


@dataclasses.dataclass
class FeatureDataConfig(Config):
    """How much of each latent the browser shows, and how its data is split into files."""

    top: int = dataclasses.field(default=10, metadata={"help": "top-activating windows per latent"})
    quantiles: int = dataclasses.field(default=4, metadata={"help": "activation quantiles sampled per latent"})
    per_quantile: int = dataclasses.field(default=2, metadata={"help": "windows sampled per quantile"})
    window_before: int = dataclasses.field(default=16, metadata={"help": "tokens shown before the activating one"})
    window_after: int = dataclasses.field(default=6, metadata={"help": "tokens shown after the activating one"})
    histogram_bins: int = dataclasses.field(default=20, metadata={"help": "bins of a latent's activation histogram"})
    density_bins: int = dataclasses.field(default=40, metadata={"help": "bins of the density histogram"})
    logit_tokens: int = dataclasses.field(default=8, metadata={"help": "promoted and suppressed tokens per latent"})
    chunk_size: int = dataclasses.field(default=64, metadata={"help": "latents per data file of the browser"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the quantile samples"})

    def validate(self) -> None:
        if min(self.quantiles, self.histogram_bins, self.density_bins, self.chunk_size) < 1:
            raise ConfigError("features: quantiles, histogram_bins, density_bins and chunk_size must be at least 1")
        if min(self.top, self.per_quantile, self.window_before, self.window_after, self.logit_tokens) < 0:
            raise ConfigError("features: top, per_quantile, window sizes and logit_tokens must be >= 0")


def rounded(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits: what the browser shows, and what keeps its files small."""
    return 0.0 if value == 0 or not math.isfinite(value) else float(f"{value:.{digits}g}")


def density_histogram(counts: np.ndarray, n_tokens: int, bins: int) -> dict[str, Any]:
    """Histogram of log10(firing frequency) over the latents that fire, on equal bins from log10(1/n_tokens) (one
    token) to 0 (every token); latents that never fire are counted apart as `dead`."""
    if n_tokens < 1:
        raise ConfigError("density_histogram needs at least one recorded token")
    counts = np.asarray(counts)
    alive = counts > 0
    edges = np.linspace(math.log10(1 / n_tokens), 0.0, bins + 1)
    histogram, _ = np.histogram(np.log10(counts[alive] / n_tokens), bins=edges)
    return {"edges": [rounded(e) for e in edges], "counts": histogram.tolist(), "dead": int((~alive).sum()),
            "alive": int(alive.sum()), "n_tokens": int(n_tokens)}


class ContextPieces:
    """Each stored context's token texts, decoded once per context (`TokenText.pieces` over the whole context) and
    kept for the most recent `capacity` contexts, so a window's text is a slice and not a fresh decode."""

    def __init__(self, store: ActivationStore, text: TokenText, capacity: int = 4096) -> None:
        self._contexts = store.contexts().numpy()
        self._text = text
        self._capacity = capacity
        self._cache: OrderedDict[int, list[str]] = OrderedDict()

    def window(self, context: int, start: int, length: int) -> list[str]:
        pieces = self._cache.get(context)
        if pieces is None:
            pieces = self._text.pieces(self._contexts[context].tolist())
            self._cache[context] = pieces
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(context)
        return pieces[start : start + length]


class _Strings:
    """A chunk's string table: each distinct token text once."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        return self.ids.setdefault(text, len(self.ids))

    @property
    def table(self) -> list[str]:
        return list(self.ids)


LOGIT_BLOCK = 512  # latents whose logit effects are computed together


class FeatureData:
    """The browser data of one SAE over one latent record (see the module docstring)."""

    def __init__(
        self, sae: SparseAutoencoder, record: LatentRecord, store: ActivationStore, text: TokenText,
        cfg: FeatureDataConfig | None = None, *, title: str = "", unembedding: Tensor | None = None,
        explanations: Mapping[int, str] | None = None, scores: Mapping[str, Mapping[int, float | None]] | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        if sae.n_latents != record.n_latents:
            raise ConfigError(f"the SAE has {sae.n_latents} latents but the record {record.n_latents}; record this "
                              "SAE (record_latents) before building its features")
        self.sae, self.record, self.cfg = sae, record, cfg or FeatureDataConfig()
        self.title = title or f"{sae.architecture} SAE at {record.hookpoint}"
        self.explanations = dict(explanations or {})
        self.scores = {name: dict(values) for name, values in (scores or {}).items()}
        self.notes = list(notes)
        self._text = text
        self._pieces = ContextPieces(store, text)
        self._sampler = ExampleSampler(record, store, self.cfg.window_before, self.cfg.window_after)
        self._counts = record.counts
        self._maxima = record.maxima
        uses_logits = (unembedding is not None and reads_residual_stream(record.hookpoint)
                       and unembedding.shape[1] == sae.d_in)
        self._unembedding = unembedding.detach().cpu() if uses_logits and unembedding is not None else None
        self._layers: tuple[list[int], Tensor, Tensor] | None = None
        self._logit_cache: dict[int, tuple[list[int], list[float], list[int], list[float]]] = {}
        self._token_pieces: dict[int, str] = {}
        if isinstance(sae, MultiLayerSAE):
            with torch.no_grad():
                self._layers = (sae.layers, segment_norms(sae.W_enc.detach().cpu(), sae.slices),
                                segment_norms(sae.decoder_weight.detach().cpu(), sae.slices))

    @property
    def n_chunks(self) -> int:
        return -(-self.record.n_latents // self.cfg.chunk_size)

    @property
    def has_logits(self) -> bool:
        return self._unembedding is not None

    # ---- the index ----------------------------------------------------------------------------------------

    def index(self) -> dict[str, Any]:
        """The small file every view starts from: columns over all latents and the density histogram."""
        return {
            "title": self.title, "notes": self.notes, "architecture": self.sae.architecture,
            "hookpoint": self.record.hookpoint, "n_latents": self.record.n_latents, "n_tokens": self.record.n_tokens,
            "chunk_size": self.cfg.chunk_size, "n_chunks": self.n_chunks,
            "count": self._counts.tolist(), "max": [rounded(float(v)) for v in self._maxima],
            "explanation": {str(k): v for k, v in sorted(self.explanations.items())},
            "scores": {name: {str(k): (None if v is None else rounded(v)) for k, v in sorted(values.items())}
                       for name, values in self.scores.items()},
            "density": density_histogram(self._counts, self.record.n_tokens, self.cfg.density_bins),
            "logits": self.has_logits, "layers": self._layers[0] if self._layers else None,
        }

    def spread_of_densities(self, n: int) -> list[int]:
        """`n` latents that fire, evenly spaced in firing frequency rank (rarest to most frequent): a fair sample
        to show inline."""
        alive = np.flatnonzero(self._counts > 0)
        order = alive[np.argsort(self._counts[alive], kind="stable")]
        if len(order) <= n:
            return order.tolist()
        return order[np.unique(np.linspace(0, len(order) - 1, n).round().astype(int))].tolist()

    def entries(self, latents: Sequence[int]) -> tuple[list[str], dict[int, dict[str, Any]]]:
        """(string table, entries) of a few chosen latents, as in a chunk."""
        strings = _Strings()
        logits = self._logits([latent for latent in latents if self._counts[latent] > 0], strings)
        entries = {latent: self.latent(latent, strings, logits.get(latent)) for latent in latents}
        return strings.table, entries

    # ---- the chunks ---------------------------------------------------------------------------------------

    def chunks(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(chunk number, chunk data) for every chunk, in order."""
        for chunk in range(self.n_chunks):
            yield chunk, self.chunk(chunk)

    def chunk(self, chunk: int) -> dict[str, Any]:
        lo = chunk * self.cfg.chunk_size
        latents = list(range(lo, min(lo + self.cfg.chunk_size, self.record.n_latents)))
        strings = _Strings()
        logits = self._logits([latent for latent in latents if self._counts[latent] > 0], strings)
        entries = {str(latent): self.latent(latent, strings, logits.get(latent)) for latent in latents}
        return {"chunk": chunk, "first": lo, "strings": strings.table, "latents": entries}

    def latent(self, latent: int, strings: _Strings, logits: dict[str, Any] | None = None) -> dict[str, Any]:
        """One latent's entry; token texts become ids into `strings`."""
        count = int(self._counts[latent])
        entry: dict[str, Any] = {"count": count, "max": rounded(float(self._maxima[latent]))}
        if self._layers is not None:
            _, encoder, decoder = self._layers
            entry["layers"] = {"encoder": [rounded(v) for v in encoder[latent].tolist()],
                               "decoder": [rounded(v) for v in decoder[latent].tolist()]}
        if count == 0:
            return entry
        _, values = self.record.activations(latent)
        histogram, edges = np.histogram(values, bins=self.cfg.histogram_bins, range=(0.0, float(values.max())))
        top = self._sampler.top(latent, self.cfg.top)
        sampled = self._sampler.quantile_examples(latent, self.cfg.quantiles, self.cfg.per_quantile, self.cfg.seed,
                                                  exclude=top)
        entry.update({
            "histogram": {"edges": [rounded(e) for e in edges], "counts": histogram.tolist()},
            "top": [self._window(e, strings) for e in top],
            "quantiles": [[self._window(e, strings) for e in sampled if e.quantile == q]
                          for q in range(self.cfg.quantiles)],
        })
        if logits is not None:
            entry["logits"] = logits
        return entry

    def _window(self, example: Example, strings: _Strings) -> dict[str, Any]:
        pieces = self._pieces.window(example.context, example.start, len(example.token_ids))
        table = strings.ids
        return {"context": example.context, "start": example.start,
                "tokens": [table.setdefault(p, len(table)) for p in pieces],
                "acts": [0.0 if a == 0 else rounded(a) for a in example.activations]}

    def _logits(self, latents: list[int], strings: _Strings) -> dict[int, dict[str, Any]]:
        """Promoted and suppressed tokens of `latents`, computed `LOGIT_BLOCK` latents at a time (one large
        product with the unembedding is several times faster than many small ones)."""
        if self._unembedding is None or self.cfg.logit_tokens == 0:
            return {}
        missing = [latent for latent in latents if latent not in self._logit_cache]
        if missing:
            block = [i for i in range(missing[0], min(missing[0] + LOGIT_BLOCK, self.record.n_latents))
                     if self._counts[i] > 0]
            block = sorted(set(block) | set(missing))
            kept = {latent: self._logit_cache[latent] for latent in latents if latent in self._logit_cache}
            self._logit_cache = {**kept, **dict(zip(block, self._logit_rows(block), strict=True))}

        def named(ids: list[int], values: list[float]) -> list[list[Any]]:
            return [[strings(self._piece(i)), rounded(v)] for i, v in zip(ids, values, strict=True)]

        return {latent: {"top": named(*self._logit_cache[latent][:2]), "bottom": named(*self._logit_cache[latent][2:])}
                for latent in latents}

    def _logit_rows(self, latents: list[int]) -> list[tuple[list[int], list[float], list[int], list[float]]]:
        assert self._unembedding is not None
        k = min(self.cfg.logit_tokens, self._unembedding.shape[0])
        directions = decoder_directions(self.sae, latents, [max(float(self._maxima[i]), 1e-6) for i in latents])
        top_v, top_i, bottom_v, bottom_i = (t.tolist() for t in logit_effects(directions, self._unembedding, k))
        return [(top_i[row], top_v[row], bottom_i[row], bottom_v[row]) for row in range(len(latents))]

    def _piece(self, token_id: int) -> str:
        piece = self._token_pieces.get(token_id)
        if piece is None:
            piece = self._token_pieces[token_id] = self._text.piece(token_id)
        return piece
