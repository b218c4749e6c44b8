"""The multilayer run's figures and report: reconstruction, activation rates, trigger layers, banding, decoder
cosines and information flow, beside the numbers of the write-up "Multi-layer SAEs"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saelab.experiments.multilayer.analysis import (
    ActivationRates,
    LayerPairStats,
    TriggerLayers,
    banding,
    plot_activation_rates,
    plot_banding,
    plot_bucket_counts,
    plot_by_gap,
    plot_decoder_cosines,
    plot_flow,
)
from saelab.interp.feature_data import FeatureData
from saelab.report.html import Report
from saelab.report.plots import plot_training_curves
from saelab.report.run_features import add_features_section

ADJACENT_FOLDER = "adjacent"  # the second layer set's run folder, inside the first's (and its summary key)


def write_figures(folder: Path, records: Sequence[Mapping[str, Any]] | None, rates: ActivationRates,
                  triggers: TriggerLayers, cosines: dict[str, LayerPairStats],
                  flow: dict[str, dict[str, LayerPairStats]]) -> dict[str, Path]:
    """Every figure of the report into `folder`, by name; training curves from the trainer's log `records` (None
    for an SAE trained elsewhere)."""
    figures: dict[str, Path] = {}
    if records is not None:
        figures["training"] = plot_training_curves(records, folder / "training_curves.png")
    figures["rates"] = plot_activation_rates(rates, folder / "activation_rates.png")
    figures["buckets"] = plot_bucket_counts(triggers, folder / "bucket_counts.png")
    for grouped in (False, True):
        band = banding(triggers, rates, group_by_bucket=grouped)
        for which in ("encoder", "decoder"):
            name = f"banding_{which}{'_by_bucket' if grouped else ''}"
            figures[name] = plot_banding(band, folder / f"{name}.png", which=which)
    figures["cosines"] = plot_decoder_cosines(cosines["all"], folder / "decoder_cosines.png")
    figures["cosines_by_gap"] = plot_by_gap(cosines, folder / "decoder_cosines_by_gap.png", ylabel="mean cosine",
                                            title="decoder cosine vs layer gap, per trigger bucket")
    for quantity in ("cosine", "strength"):
        figures[f"flow_{quantity}"] = plot_flow(flow["all"][quantity], folder / f"flow_{quantity}.png",
                                                quantity=quantity)
    return figures


def _mean_sd(stats: LayerPairStats) -> list[dict[str, Any]]:
    """Rows "layer l | l -> m: mean (sd)" for a report table."""
    rows = []
    for i, layer in enumerate(stats.layers):
        row: dict[str, Any] = {"layer l": layer}
        for j, other in enumerate(stats.layers):
            mean, sd = stats.mean[i, j].item(), stats.sd[i, j].item()
            row[f"m={other}"] = "" if mean != mean else f"{mean:.3f} ({sd:.3f})"
        rows.append(row)
    return rows


def write_report(summary: dict[str, Any], cosines: dict[str, LayerPairStats],
                 flow: dict[str, dict[str, LayerPairStats]], figures: dict[str, Path], path: Path,
                 features: FeatureData | None = None) -> Path:
    """The report at `path`: the summary's numbers, the pair statistics as tables and the `figures` (and a
    Features section linking to the browser when `features` is given)."""
    sae, triggers = summary["sae"], summary["triggers"]
    layers = sae["layers"]
    report = Report(f"saelab multilayer: one SAE over layers {layers} of {summary['config']['model']}")
    train = summary["train"]
    trained = f"trained on {train['tokens']:,} tokens" if train else f"loaded from {sae['folder']}"
    report.paragraph(
        f"{sae['n_latents']} latents, k={sae['k']}, input = resid_post of layers {layers} concatenated "
        f"({sae['d_in']} features), normalisation {sae['normalization']!r}; {trained}. Evaluated on "
        f"{summary['stores']['eval_tokens']:,} held-out tokens."
    )
    report.heading("Reconstruction")
    metrics = summary["metrics"]
    report.key_values({"fvu (pooled, normalised space)": metrics["fvu"],
                       "fvu_per_dim (mean over dimensions of per-dimension ratios, the write-up's)":
                       metrics["fvu_per_dim"], "fvu_raw": metrics["fvu_raw"],
                       "l0": metrics["l0"], "dead_fraction (never fired on held-out tokens)": metrics["dead_fraction"]})
    report.table([{"layer": layer, "fvu": fvu, "fvu_per_dim": summary["per_layer_fvu_per_dim"][layer]}
                  for layer, fvu in summary["per_layer_fvu"].items()],
                 caption="FVU per layer, pooled (the total is their mean weighted by each layer's variance) and "
                 "per-dimension mean (the total is their plain mean when layers are equally wide)")
    if "training" in figures:
        report.figure(figures["training"], "training curves")
    report.heading("Activation rates")
    report.key_values(summary["activation"])
    report.figure(figures["rates"], "per-latent activation rate on the held-out tokens (latents that fired)")
    if features is not None:
        add_features_section(report, features, summary["features"]["index"])
    report.heading("Trigger layers")
    report.table([{"layer": layer, "by encoder norm": enc, "by decoder norm": dec} for layer, enc, dec in
                  zip(layers, triggers["bucket_counts_by_encoder"], triggers["bucket_counts_by_decoder"],
                      strict=True)], caption=f"active latents per trigger layer ({triggers['n_active']} active)")
    report.figure(figures["buckets"], "bucket counts")
    report.heading("Banding")
    for name, caption in (("banding_encoder", "encoder squared-norm share per layer, latents by activation rate"),
                          ("banding_decoder", "decoder squared-norm share per layer, latents by activation rate"),
                          ("banding_encoder_by_bucket", "encoder share, grouped by trigger layer then by rate"),
                          ("banding_decoder_by_bucket", "decoder share, grouped by trigger layer then by rate")):
        report.figure(figures[name], caption)
    report.heading("Decoder cosines between layers")
    report.table(_mean_sd(cosines["all"]), caption=f"cos(dec_l, dec_m), mean (SD) over the "
                 f"{cosines['all'].n_latents} most active latents")
    report.figure(figures["cosines"], "mean decoder cosine per pair of layers")
    report.figure(figures["cosines_by_gap"], "mean decoder cosine against layer gap, overall and per trigger bucket")
    report.table([{"latents": name, "n": s.n_latents, **{f"gap {g}": v for g, v in s.by_gap().items()}}
                  for name, s in cosines.items()], caption="mean cosine by layer gap")
    report.heading("Information flow")
    report.paragraph(
        "For latent f, source layer l and later layer m: J·d is the forward-mode derivative of the model's map from "
        "layer l to layer m (blocks l+1..m on the whole real sequence) along d = dec_{f,l}, at tokens where f fires. "
        "cosine = cos(J·d, dec_{f,m}); strength = (J·d)ᵀdec_{f,m} / ||dec_{f,m}||². Averaged over each latent's "
        f"tokens, then mean (SD) over latents; {summary['flow_rows']} (latent, token, l, m) samples.", note=True)
    for quantity in ("cosine", "strength"):
        report.figure(figures[f"flow_{quantity}"], f"{quantity}, all studied latents, one line per source layer")
        report.table(_mean_sd(flow["all"][quantity]), caption=f"{quantity}: source l (rows), target m")
    report.table([{"latents": name, "n": s["cosine"].n_latents,
                   **{f"{q} {a}->{b}": v for q in ("cosine", "strength")
                      for a, b, v in zip(layers[:-1], layers[1:], s[q].adjacent(), strict=True)}}
                  for name, s in flow.items()], caption="adjacent layers, per trigger bucket")
    if "side_by_side" in summary:
        other = summary[ADJACENT_FOLDER]
        report.heading("Strided and adjacent layers side by side")
        gaps = sorted({b - a for a, b in zip(layers[:-1], layers[1:], strict=True)})
        report.paragraph(
            f"A second SAE of the same size and budget over layers {other['sae']['layers']} (consecutive, as the "
            f"write-up's 6 layers of Pythia-70M), beside this one over layers {layers}, whose neighbouring layers are "
            f"{'/'.join(map(str, gaps))} blocks apart. FVU per-dimension mean = mean over dimensions of each "
            "dimension's unexplained-variance ratio (the write-up's); pooled = saelab's Σ error / Σ variance.")
        report.table(summary["side_by_side"], caption=f"figures of the write-up \"Multi-layer SAEs\" (Pythia-70M) "
                     f"and of both layer sets of this run ({summary['config']['model']})")
        report.link(f"{ADJACENT_FOLDER}/report.html", "The consecutive-layer SAE's full report",
                    after=" (its banding, tables, figures and feature browser).")
    report.heading("Compared with the write-up (Pythia-70M, 6 layers)")
    report.table(_comparison(summary), caption="figures of the write-up \"Multi-layer SAEs\"; this run's in the "
                 "right column")
    report.heading("Timings (s)")
    report.key_values(summary["timings_s"])
    report.heading("Config and provenance")
    report.code({"config": summary["config"], "provenance": summary["provenance"], "sae": sae})
    return report.write(path)


def _span(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    return f"{min(present):.2f}-{max(present):.2f}" if present else "n/a"


def _values(values: list[float | None]) -> str:
    return ", ".join("n/a" if v is None else f"{v:.2f}" for v in values)


def _figures_of(summary: dict[str, Any]) -> dict[str, str]:
    """One layer set's figures in the write-up's terms, keyed as `WRITE_UP` (plus the pooled and per-layer FVUs)."""
    cos = summary["decoder_cosines"]["all"]
    flow = summary["information_flow"]["all"]
    pairs = "; pairs " + ", ".join(f"{a}-{b}" for a, b in zip(cos["layers"][:-1], cos["layers"][1:], strict=True))
    return {
        "fvu": f"{summary['fvu_per_dim']:.4f} per-dimension mean; {summary['fvu']:.4f} pooled",
        "per_layer_fvu": "per-dim mean " + _values(list(summary["per_layer_fvu_per_dim"].values()))
        + "; pooled " + _values(list(summary["per_layer_fvu"].values())),
        "bucket_counts_by_encoder": " / ".join(map(str, summary["triggers"]["bucket_counts_by_encoder"]))
        + f" of {summary['triggers']['n_active']} active",
        "decoder_cosine_adjacent": f"{_span(cos['adjacent'])} ({_values(cos['adjacent'])}{pairs})",
        "decoder_cosine_first_last": "n/a" if cos["mean"][0][-1] is None
        else f"{cos['mean'][0][-1]:.2f} (layer {cos['layers'][0]} vs {cos['layers'][-1]})",
        "flow_cosine_adjacent": f"{_span(flow['cosine']['adjacent'])} ({_values(flow['cosine']['adjacent'])})",
        "flow_strength_adjacent": f"{_span(flow['strength']['adjacent'])} ({_values(flow['strength']['adjacent'])})",
    }


def _comparison(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The write-up's figures beside this run's, one row per quantity."""
    ours = _figures_of(summary)
    return [{"quantity": key, "write-up": text, "this run": ours[key]} for key, text in summary["write_up"].items()]


def side_by_side(first: dict[str, Any], second: dict[str, Any]) -> list[dict[str, str]]:
    """Two layer sets' figures (e.g. every 6th layer and consecutive layers, at the same budget) beside the
    write-up's, one row per quantity; the write-up's FVU is the per-dimension mean."""
    ours = [_figures_of(first), _figures_of(second)]
    names = [f"layers {','.join(map(str, s['sae']['layers']))}" for s in (first, second)]
    return [{"quantity": key, "write-up": first["write_up"].get(key, "per-dimension mean, not given per layer"),
             **{name: figures[key] for name, figures in zip(names, ours, strict=True)}} for key in ours[0]]
