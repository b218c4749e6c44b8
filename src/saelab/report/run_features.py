"""The feature browser of one SAE in a run folder: record its latents over a store, compute the browser data and
write the site (`<run>/features/index.html`). What every run that trains or loads an SAE calls at its end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from saelab.activations.store import ActivationStore
from saelab.interp.examples import TokenText
from saelab.interp.feature_data import FeatureData, FeatureDataConfig
from saelab.interp.record import record_latents
from saelab.report.feature_browser import density_svg, latent_html, write_feature_browser
from saelab.report.html import Report
from saelab.saes.base import SparseAutoencoder

FEATURES_FOLDER = "features"


def write_run_features(
    sae: SparseAutoencoder, store: ActivationStore, hookpoint: str | Sequence[str], run_dir: str | Path,
    text: TokenText, *,
    cfg: FeatureDataConfig | None = None, max_tokens: int | None = None, unembedding: Tensor | None = None,
    title: str = "", notes: Sequence[str] = (), explanations: Mapping[int, str] | None = None,
    scores: Mapping[str, Mapping[int, float | None]] | None = None, batch_size: int = 4096,
    record_dir: str | Path | None = None,
) -> tuple[Path, FeatureData]:
    """Record `sae` over the first `max_tokens` tokens of `store` (in `record_dir`, default `<run>/features/record`,
    resumed if present) and write the browser to `<run>/features`; returns (index.html, the data). A multi-layer
    SAE reads several hookpoints, concatenated."""
    folder = Path(run_dir) / FEATURES_FOLDER
    record = record_latents(sae, store, record_dir or folder / "record", hookpoint, max_tokens, batch_size=batch_size,
                            show_progress=False)
    data = FeatureData(sae, record, store, text, cfg, title=title, unembedding=unembedding, notes=notes,
                       explanations=explanations, scores=scores)
    return write_feature_browser(folder, data.index(), data.chunks()), data


def summary_of(data: FeatureData, index_path: Path, run_dir: str | Path) -> dict[str, Any]:
    """What a run's summary.json records about its browser."""
    density = data.index()["density"]
    return {"index": str(index_path.relative_to(Path(run_dir))), "recorded_tokens": data.record.n_tokens,
            "dead": density["dead"], "alive": density["alive"], "n_latents": data.record.n_latents}


def add_features_section(report: Report, data: FeatureData, href: str, n_latents: int = 12, windows: int = 3) -> None:
    """A "Features" section: the density histogram and `n_latents` latents spread over densities with their top
    `windows` windows inline, each linking to its panel in the browser at `href` (relative to the report)."""
    index = data.index()
    report.heading("Features")
    report.link(href, "Open the feature browser", after=(
        f" to see every latent ({index['n_latents']:,}): top-activating contexts, quantile samples, activation "
        "histograms and logit effects. It opens from the folder directly; saelab view RUN_DIR serves it for "
        "browsers that refuse local pages."))
    report.fragment(density_svg(index["density"]))
    chosen = data.spread_of_densities(n_latents)
    strings, entries = data.entries(chosen)
    report.paragraph(f"{len(chosen)} latents from the rarest to the most frequent, each with its {windows} "
                     "strongest windows; tokens are shaded by activation (hover for the value).", note=True)
    report.fragment("".join(latent_html(latent, entries[latent], strings, index["n_tokens"], f"{href}#latent={latent}",
                                        windows) for latent in chosen))
