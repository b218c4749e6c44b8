"""Analyses of a multi-layer SAE (the write-up "Multi-layer SAEs"), each a function returning data plus a plot
helper.

Notation: the SAE reads layers l_0 < l_1 < ... (positions 0..L-1 in `sae.layers`); enc_{f,l} and dec_{f,l} are the
segments of latent f's encoder row and decoder row that read from / write to layer l, in the SAE's normalised
space (per-layer scales are scalars, so cosines are the same in raw space).

- Activation rate: the fraction of tokens on which each latent is nonzero.
- Trigger layer: the layer of the largest segment norm, of the encoder (where the latent reads) or of the decoder
  (where it writes); latents are bucketed by it. Banding heatmaps show each latent's squared-norm share per layer,
  ||enc_{f,l}||² / ||enc_f||² (and the same for the decoder), latents sorted by activation rate.
- Decoder cosines: cos(dec_{f,l}, dec_{f,m}) for the N most active latents, mean and SD over latents per pair.
- Information flow: J·d, the forward-mode derivative of the model's map from layer l to layer m (blocks l+1..m
  run on the whole real sequence) along d = dec_{f,l}, at tokens where f fires; reported as cos(J·d, dec_{f,m})
  and strength (J·d)ᵀdec_{f,m} / ||dec_{f,m}||² (1 when pushing the latent's layer-l write through the model
  reproduces exactly its layer-m write). Per latent the values are averaged over its tokens, then mean and SD are
  taken over latents.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.errors import ConfigError, DataError
from saelab.metrics import LatentAccumulator
from saelab.models.blocks import BlockRunner
from saelab.models.hooks import capture
from saelab.report.plots import plot_heatmap, plot_histogram, plot_lines
from saelab.saes.base import to_dense
from saelab.saes.multilayer import MultiLayerSAE, segment_norms

TriggerBy = Literal["encoder", "decoder"]


def _json_floats(t: Tensor) -> list[Any]:
    """Nested lists with NaN as None, so the JSON is standard."""
    return [_json_floats(row) for row in t] if t.ndim > 1 else [None if math.isnan(v) else v for v in t.tolist()]


# ---- activation rates ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class ActivationRates:
    counts: Tensor  # [n_latents] int64: tokens on which each latent is nonzero
    n_tokens: int

    @property
    def rates(self) -> Tensor:
        return self.counts.double() / self.n_tokens

    @property
    def active(self) -> Tensor:
        """Latents that fired at least once."""
        return self.counts > 0

    def most_active(self, n: int, among: Tensor | None = None) -> Tensor:
        """Ids of the (up to) `n` most active latents that fired, optionally only among a boolean mask."""
        eligible = self.active if among is None else self.active & among
        ids = eligible.nonzero().squeeze(1)
        order = torch.sort(self.counts[ids], descending=True, stable=True).indices
        return ids[order[:n]]


@torch.no_grad()
def activation_rates(sae: MultiLayerSAE, batches: Iterable[Tensor]) -> ActivationRates:
    """Per-latent firing counts over raw activation batches `[B, d_in]`."""
    stats = LatentAccumulator(sae.n_latents)
    dtype = next(sae.parameters()).dtype
    for batch in batches:
        x_n, _ = sae.normalize(batch.to(sae.device, dtype))
        stats.update(sae.encode(x_n))
    if stats.tokens == 0:
        raise DataError("activation_rates got no activations; pass at least one non-empty batch")
    return ActivationRates(stats.counts, stats.tokens)


def plot_activation_rates(rates: ActivationRates, path: str | Path) -> Path:
    values = torch.log10(rates.rates[rates.active]).tolist()
    dead = int((~rates.active).sum())
    return plot_histogram(values, path, xlabel="log10 activation rate (fraction of tokens)",
                          title=f"{len(values)} latents fired, {dead} never on {rates.n_tokens:,} tokens", logy=False)


# ---- trigger layers and banding ---------------------------------------------------------------------------


@dataclasses.dataclass
class TriggerLayers:
    layers: list[int]
    encoder_norms: Tensor  # [n_latents, L] ||enc_{f,l}||
    decoder_norms: Tensor  # [n_latents, L] ||dec_{f,l}||
    active: Tensor  # [n_latents] bool: fired on the measured tokens (buckets count only these)

    def trigger(self, by: TriggerBy = "encoder") -> Tensor:
        """`[n_latents]`: position in `layers` of each latent's largest encoder (or decoder) segment."""
        return (self.encoder_norms if by == "encoder" else self.decoder_norms).argmax(dim=1)

    def bucket(self, position: int, by: TriggerBy = "encoder") -> Tensor:
        """Boolean mask of the active latents whose trigger layer is `layers[position]`."""
        return self.active & (self.trigger(by) == position)

    def bucket_counts(self, by: TriggerBy = "encoder") -> list[int]:
        return torch.bincount(self.trigger(by)[self.active], minlength=len(self.layers)).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "n_active": int(self.active.sum()),
                "bucket_counts_by_encoder": self.bucket_counts("encoder"),
                "bucket_counts_by_decoder": self.bucket_counts("decoder")}


@torch.no_grad()
def trigger_layers(sae: MultiLayerSAE, rates: ActivationRates) -> TriggerLayers:
    slices = sae.slices
    return TriggerLayers(sae.layers, segment_norms(sae.W_enc.detach().cpu(), slices),
                         segment_norms(sae.decoder_weight.detach().cpu(), slices), rates.active.cpu())


def plot_bucket_counts(triggers: TriggerLayers, path: str | Path) -> Path:
    series = {f"by {by} norm": (triggers.layers, triggers.bucket_counts(by)) for by in ("encoder", "decoder")}
    return plot_lines(series, path, xlabel="trigger layer", ylabel="active latents",
                      title="latents per trigger layer (largest segment norm)")


@dataclasses.dataclass
class Banding:
    layers: list[int]
    latents: Tensor  # column order: active latents, least active first (grouped by trigger bucket if asked)
    encoder_share: Tensor  # [L, n_columns] ||enc_{f,l}||² / ||enc_f||²
    decoder_share: Tensor  # [L, n_columns]
    bucket_starts: list[int]  # first column of each trigger bucket when grouped, else empty


def banding(triggers: TriggerLayers, rates: ActivationRates, group_by_bucket: bool = False) -> Banding:
    """Each active latent's squared-norm share per layer, in columns sorted by activation rate (ascending); with
    `group_by_bucket` the columns are grouped by encoder trigger layer first (bands within each bucket)."""
    ids = triggers.active.nonzero().squeeze(1)
    ids = ids[torch.sort(rates.counts[ids], stable=True).indices]
    starts: list[int] = []
    if group_by_bucket:
        trigger = triggers.trigger("encoder")[ids]
        ids = ids[torch.sort(trigger, stable=True).indices]
        counts = torch.bincount(trigger, minlength=len(triggers.layers))
        starts = (torch.cumsum(counts, 0) - counts).tolist()

    def share(norms: Tensor) -> Tensor:
        squared = norms[ids].double().pow(2)
        return (squared / squared.sum(dim=1, keepdim=True).clamp_min(1e-30)).T

    return Banding(triggers.layers, ids, share(triggers.encoder_norms), share(triggers.decoder_norms), starts)


def plot_banding(band: Banding, path: str | Path, which: TriggerBy = "encoder") -> Path:
    matrix = band.encoder_share if which == "encoder" else band.decoder_share
    grouped = f", grouped by trigger layer (buckets start at {band.bucket_starts})" if band.bucket_starts else ""
    return plot_heatmap(matrix.numpy(), path, xlabel=f"active latents, least to most active{grouped}",
                        ylabel=f"layer (rows: {band.layers})",
                        title=f"{which} squared-norm share per layer")


# ---- statistics per pair of layers --------------------------------------------------------------------------


@dataclasses.dataclass
class LayerPairStats:
    """Mean and SD over latents of a per-latent quantity for each pair of layer positions (row l, column m);
    NaN where no latent has a value."""

    layers: list[int]
    mean: Tensor  # [L, L] float64
    sd: Tensor  # [L, L] float64
    n_latents: int

    def by_gap(self) -> dict[int, float]:
        """Gap j (in positions of `layers`) -> mean over l of mean[l, l+j]."""
        n = len(self.layers)
        out = {}
        for gap in range(1, n):
            values = torch.stack([self.mean[i, i + gap] for i in range(n - gap)])
            values = values[~values.isnan()]
            if values.numel():
                out[gap] = values.mean().item()
        return out

    def adjacent(self) -> list[float | None]:
        """mean[l, l+1] for each consecutive pair of layers."""
        return _json_floats(torch.stack([self.mean[i, i + 1] for i in range(len(self.layers) - 1)]))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "n_latents": self.n_latents, "mean": _json_floats(self.mean),
                "sd": _json_floats(self.sd), "adjacent": self.adjacent(), "by_gap": self.by_gap()}


def pair_stats(layers: list[int], per_latent: Tensor) -> LayerPairStats:
    """Mean and population SD over latents of `per_latent [n_latents, L, L]`, ignoring NaN entries."""
    valid = ~per_latent.isnan()
    count = valid.sum(0)
    values = per_latent.double().nan_to_num(0.0)
    mean = values.sum(0) / count
    sd = ((values - mean).pow(2) * valid).sum(0).div(count).sqrt()
    return LayerPairStats(layers, mean, sd, int(valid.any(dim=(1, 2)).sum()))


# ---- decoder cosines -------------------------------------------------------------------------------------------


def _decoder_segments(sae: MultiLayerSAE, latents: Tensor) -> Tensor:
    """`[n, L, d]` decoder segments of `latents` (every layer must have the same width)."""
    if len(set(sae.cfg.slice_widths)) != 1:
        raise ConfigError(f"decoder cosines need layers of equal width; this SAE has {sae.cfg.slice_widths}")
    rows = sae.decoder_weight.detach()[latents.to(sae.device)].cpu().double()
    return rows.reshape(len(latents), len(sae.layers), sae.cfg.slice_widths[0])


@torch.no_grad()
def decoder_cosines(sae: MultiLayerSAE, latents: Tensor) -> LayerPairStats:
    """cos(dec_{f,l}, dec_{f,m}) for every pair of layers, mean and SD over `latents`."""
    segments = F.normalize(_decoder_segments(sae, latents), dim=-1)
    return pair_stats(sae.layers, torch.einsum("nld,nmd->nlm", segments, segments))


def plot_decoder_cosines(stats: LayerPairStats, path: str | Path, title: str = "") -> Path:
    return plot_heatmap(stats.mean.numpy(), path, xlabel=f"layer m ({stats.layers})", ylabel="layer l",
                        title=title or f"mean cos(dec_l, dec_m), {stats.n_latents} most active latents")


def plot_by_gap(stats: Mapping[str, LayerPairStats], path: str | Path, *, ylabel: str, title: str = "") -> Path:
    """One line per group (e.g. all latents, each trigger bucket): the mean over pairs at each layer gap."""
    series = {name: (list(s.by_gap()), list(s.by_gap().values())) for name, s in stats.items() if s.by_gap()}
    return plot_lines(series, path, xlabel="gap between layers (positions in the layer list)", ylabel=ylabel,
                      title=title)


# ---- information flow -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class FlowSamples:
    """One entry per (latent, token, source layer position, target layer position) with source < target."""

    layers: list[int]
    latent: Tensor  # int64
    context: Tensor  # int64, row of the contexts
    position: Tensor  # int64, token position in the context
    source: Tensor  # int64, position in `layers`
    target: Tensor  # int64
    cosine: Tensor  # float64, cos(J·d, dec_{f,target})
    strength: Tensor  # float64, (J·d)ᵀ dec_{f,target} / ||dec_{f,target}||²

    def summary(self, latents: Tensor | None = None) -> dict[str, LayerPairStats]:
        """{"cosine", "strength"}: per latent averaged over its tokens, then mean and SD over latents (only
        `latents` if given) for each (source, target) pair."""
        keep = torch.ones_like(self.latent, dtype=torch.bool) if latents is None else torch.isin(self.latent, latents)
        ids, row = torch.unique(self.latent[keep], return_inverse=True)
        n, size = len(ids), len(self.layers)
        cell = (row * size + self.source[keep]) * size + self.target[keep]
        out = {}
        for name, values in (("cosine", self.cosine), ("strength", self.strength)):
            total = torch.zeros(n * size * size, dtype=torch.float64).index_add_(0, cell, values[keep])
            count = torch.zeros(n * size * size, dtype=torch.float64).index_add_(0, cell, torch.ones_like(values[keep]))
            out[name] = pair_stats(self.layers, (total / count).view(n, size, size))  # 0/0 = NaN: no tokens
        return out


def _pick_tokens(fired: Tensor, limit: int, generator: torch.Generator) -> Tensor:
    """Up to `limit` random (context, position) pairs where `fired [N, T]` is True, as `[n, 2]`."""
    where = fired.nonzero()
    return where[torch.randperm(len(where), generator=generator)[:limit]]


@torch.no_grad()
def _firing(model: nn.Module, sae: MultiLayerSAE, contexts: Tensor, latents: Tensor, batch_size: int) -> Tensor:
    """`[N, T, len(latents)]` bool: where each latent fires on the real sequences."""
    out = []
    dtype = next(sae.parameters()).dtype
    for start in range(0, len(contexts), batch_size):
        acts = capture(model, contexts[start : start + batch_size], sae.hookpoints)
        x = torch.cat([acts[hp] for hp in sae.hookpoints], dim=-1).to(sae.device, dtype)
        z = to_dense(sae.encode(sae.normalize(x)[0]))
        out.append((z[..., latents.to(sae.device)] != 0).cpu())
    return torch.cat(out)


def information_flow(
    model: nn.Module,
    sae: MultiLayerSAE,
    contexts: Tensor,
    latents: Tensor,
    positions: Tensor | None = None,
    tokens_per_latent: int = 8,
    rows_per_pass: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> FlowSamples:
    """J·dec_{f,l} from every SAE layer l to every later one, at up to `tokens_per_latent` random tokens of
    `contexts [N, T]` where latent f fires (only positions where `positions [N, T]` is True, e.g. not BOS).

    Each chosen token is its own batch row, holding its whole sequence (a perturbation at one position reaches
    later positions through attention, so tokens of one sequence cannot share a row); `rows_per_pass` rows go
    through the blocks at once. Cost per row: one forward pass up to the last layer plus, per source layer, about
    three passes of the blocks after it.
    A d placed in raw space is dec_{f,l} / s_l, and J·d is read back in the SAE's space as s_m·J·d (s = the
    layer scales), so a strength of 1 means the SAE's own write at layer m is what the model makes of its write
    at layer l.
    """
    if len(sae.layers) < 2:
        raise ConfigError("information flow needs an SAE over at least two layers")
    contexts = contexts.long()
    allowed = torch.ones_like(contexts, dtype=torch.bool) if positions is None else positions.bool()
    fired = _firing(model, sae, contexts, latents, rows_per_pass) & allowed[..., None]
    generator = torch.Generator().manual_seed(seed)
    rows = [(int(f), int(c), int(p)) for i, f in enumerate(latents.tolist())
            for c, p in _pick_tokens(fired[..., i], tokens_per_latent, generator).tolist()]
    chunks = [rows[i : i + rows_per_pass] for i in range(0, len(rows), rows_per_pass)]

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    layers, slices, scales = sae.layers, sae.slices, sae.cfg.layer_scales
    decoder = sae.decoder_weight.detach().to(device, dtype)
    records: dict[str, list[Tensor]] = {k: [] for k in ("latent", "context", "position", "source", "target",
                                                       "cosine", "strength")}
    for chunk in tqdm(chunks, desc="information flow", disable=not progress):
        latent_ids, context_ids, pos = (torch.tensor(column, device=device) for column in zip(*chunk, strict=True))
        row_ids = torch.arange(len(chunk), device=device)
        runner = BlockRunner(model, contexts[context_ids.cpu()], first_block=layers[0] + 1, last_block=layers[-1])
        for a in range(len(layers) - 1):
            hidden = runner.resid_post(layers[a])
            tangent = torch.zeros_like(hidden)
            tangent[row_ids, pos] = decoder[latent_ids, slices[a]] / scales[a]
            _, pushed = runner.jvp(hidden, tangent, layers[a], layers[a + 1 :])
            for b, jd in enumerate(pushed, start=a + 1):
                moved = jd[row_ids, pos].double() * scales[b]
                target = decoder[latent_ids, slices[b]].double()
                records["cosine"].append(F.cosine_similarity(moved, target, dim=-1, eps=1e-12).cpu())
                records["strength"].append(((moved * target).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-30)).cpu())
                for name, value in (("latent", latent_ids), ("context", context_ids), ("position", pos)):
                    records[name].append(value.cpu())
                records["source"].append(torch.full((len(chunk),), a))
                records["target"].append(torch.full((len(chunk),), b))
    if not records["cosine"]:
        raise DataError("none of the given latents fires on the given contexts; give more contexts or other latents")
    return FlowSamples(layers, **{k: torch.cat(v) for k, v in records.items()})


def plot_flow(stats: LayerPairStats, path: str | Path, *, quantity: str) -> Path:
    """One line per source layer l: the mean over latents at each later layer m."""
    n = len(stats.layers)
    series = {}
    for a in range(n - 1):
        xs = [stats.layers[b] for b in range(a + 1, n)]
        series[f"from layer {stats.layers[a]}"] = (xs, [stats.mean[a, b].item() for b in range(a + 1, n)])
    return plot_lines(series, path, xlabel="target layer m", ylabel=f"mean {quantity}",
                      title=f"information flow: {quantity} of J·dec_l with dec_m ({stats.n_latents} latents)")
