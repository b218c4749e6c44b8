"""Figures and `report.html` of `connectors-lm`, from its summary and the files it names: the per-layer linearity
table beside the write-up's, linear vs reference error per output feature, the L1 sweep, cross-entropy with the
MLP (partly) replaced, and the linear connector's readable connections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file
from torch import Tensor

from saelab.experiments.connectors.connector import load_connector
from saelab.report.html import Report
from saelab.report.plots import pyplot, save_figure


def draw_figures(summary: dict[str, Any], folder: Path) -> dict[str, str]:
    """Every figure as PNG in `folder`: {"linearity", "cross_entropy", "connections"} -> its path."""
    files = summary["files"]
    figures = {
        "linearity": _plot_linearity(load_file(files["per_feature"]), summary["linearity"], folder / "linearity.png"),
        "cross_entropy": _plot_ce(summary["cross_entropy"], folder / "cross_entropy.png"),
        "connections": _plot_connections(load_connector(files["connectors"]["linear"]).weight_matrices()[0].detach(),
                                         summary["relations"], folder / "connections.png"),
    }
    return {name: str(path) for name, path in figures.items()}


def _plot_linearity(per_feature: dict[str, Any], linearity: dict[str, Any], path: Path) -> Path:
    tolerance, relative = linearity["tolerance_absolute"], linearity["tolerance_relative_to_variance"]
    alive, variance = per_feature["alive"], per_feature["variance"]
    mse = {"linear": per_feature["mse.linear"], "reference": per_feature["mse.reference"]}
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    lin, ref = mse["linear"][alive].numpy(), mse["reference"][alive].numpy()
    axes[0].scatter(ref, lin, s=3, alpha=0.4)
    top = float(max(lin.max(), ref.max(), 1e-6))
    axes[0].plot([0, top], [0, top], color="black", lw=0.8)
    axes[0].plot([0, top], [tolerance, top + tolerance], color="red", lw=0.8, ls="--", label=f"tolerance {tolerance:g}")
    axes[0].set_xlabel("held-out MSE, nonlinear reference")
    axes[0].set_ylabel("held-out MSE, linear connector")
    axes[0].legend(fontsize=8)
    gap = ((mse["linear"] - mse["reference"]) / variance.clamp_min(1e-12))[alive].numpy()
    axes[1].hist(np.clip(gap, -0.2, 1.0), bins=60)
    axes[1].axvline(relative, color="red", ls="--", lw=0.8)
    axes[1].set_xlabel("(linear − reference MSE) / feature variance (clipped to [−0.2, 1])")
    axes[1].set_ylabel("output features")
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_ce(ce: dict[str, Any], path: Path) -> Path:
    names = list(ce["ce"])
    fig, ax = pyplot().subplots(figsize=(max(5.0, 1.1 * len(names)), 3.8))
    bars = ax.bar(names, [ce["ce"][n] for n in names], color=["black"] + ["tab:blue"] * (len(names) - 1))
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_ylabel("next-token cross-entropy (held-out)")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_connections(weight: Tensor, relations: list[dict[str, Any]], path: Path) -> Path:
    """Rows: the shown output features; columns: the union of their top inputs (signed weights of the linear
    connector's `[n_out, n_in]` matrix)."""
    shown = [relation["output"]["feature"] for relation in relations]
    inputs = sorted({item["feature"] for relation in relations for item in relation["inputs"]})
    block = weight[shown][:, inputs].numpy() if shown and inputs else np.zeros((1, 1))
    limit = max(float(np.abs(block).max()), 1e-8)
    fig, ax = pyplot().subplots(figsize=(max(4.0, 0.35 * len(inputs) + 2), max(2.5, 0.35 * len(shown) + 1.5)))
    image = ax.imshow(block, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_yticks(range(len(shown)), [f"OF{f}" for f in shown], fontsize=7)
    ax.set_xticks(range(len(inputs)), [f"IF{i}" for i in inputs], fontsize=6, rotation=90)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title("linear connector: top input connections of the shown output features", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(summary: dict[str, Any], path: Path) -> Path:
    """The HTML page of a summary whose figures are drawn (`draw_figures`)."""
    setup = summary["setup"]
    report = Report(f"Feature connectors in {setup['model']}, MLP of block {setup['layer']}")
    linearity = summary["linearity"]
    report.paragraph(
        f"Per block L: top-k SAEs on mlp_in.L (the MLP's input) and mlp_out.L (its output); connectors learn the "
        "output features from the input features. The test: an output feature is linear when the linear "
        f"connector's held-out MSE is within {linearity['tolerance_absolute']:g} of the nonlinear reference's (the "
        "write-up's tolerance; also relative, within a share of the feature's variance). The linear connector is "
        "the exact least-squares linear map of the training tokens (from random weights Adam left it far from "
        "converged after 8 epochs, which reads as nonlinearity); the ReLU connector starts there. The reference, per "
        "feature, is whichever of the linear map, the linear map plus an early-stopped MLP correction, the ReLU and "
        "the MLP connectors has the lowest MSE on validation tokens: by construction at least as good as linear (and "
        "as each of them) on every feature there. The write-up compared against an independently trained MLP "
        "connector (column vs_mlp), which can end worse than linear and so call features linear for the wrong "
        "reason; the ReLU connector is the second comparison (vs_relu). fraction_relu_linear_vs_reference counts "
        "the features a ReLU of a linear map (the write-up's connector form; the features are non-negative) predicts "
        "within the tolerance of the reference. The L1 sweep trains linear connectors with the write-up's penalty "
        "from the least-squares map."
    )
    report.heading("Fraction of output features that are linear, per layer")
    write_up = summary["write_up"]
    report.table(summary["per_layer"])
    fractions = ", ".join(f"{f:.1%}" for f in write_up["fraction_linear_per_layer"])
    report.paragraph(f"The write-up (Pythia-70M, five layers): {fractions} linear; its test: {write_up['test']}.")
    report.heading(f"Linearity in detail, block {setup['layer']}")
    report.key_values({k: v for k, v in linearity.items() if k not in ("median_variance_explained", "reference")})
    report.key_values(linearity["reference"], caption="the nonlinear reference against linear (held-out tokens)")
    report.table([{"form": form, "median_variance_explained": v}
                  for form, v in linearity["median_variance_explained"].items()])
    report.figure(Path(summary["figures"]["linearity"]), "per output feature: linear connector vs reference MSE")
    report.heading("L1 sweep of the linear connector")
    report.table(summary["l1_sweep"])
    report.heading("Cross-entropy with the MLP (partly) replaced")
    ce = summary["cross_entropy"]
    report.table([{"pass": name, "ce": value, "kl_from_clean": ce["kl"].get(name)} for name, value in ce["ce"].items()])
    if "transcoder" in summary:
        report.paragraph(
            "transcoder: the MLP's output predicted from its input by one top-k transcoder (the SAEs' width and k, "
            "trained on the same tokens), against connector_*: input SAE, connector, output SAE."
        )
    report.figure(Path(summary["figures"]["cross_entropy"]), "held-out next-token cross-entropy")
    report.heading("Connectors")
    # a linear connector without L1 is the least-squares map, solved rather than trained: no training curve
    report.table([{"form": form, "test_mse_alive": r["test_mse_alive"], "large_weights": r["large_weights"],
                   "total_weights": r["total_weights"],
                   "final_train_loss": r["train_curve"][-1]["loss"] if r["train_curve"] else "least squares"}
                  for form, r in summary["connectors"].items()])
    report.heading("Readable connections (linear connector)")
    report.figure(Path(summary["figures"]["connections"]), "signed weights of the shown features' top inputs")
    for relation in summary["relations"]:
        lines = [relation["formula"], _feature_lines("OF", relation["output"])]
        lines += [f"  weight {item['weight']:+.3f}\n" + _feature_lines("IF", item) for item in relation["inputs"]]
        report.code("\n".join(lines))
    report.heading("SAEs")
    report.table([{"role": role, "n_latents": s["n_latents"], "k": s["k"], "heldout_fvu": s["heldout_fvu"],
                   "train_fvu": s["training"].get("fvu"), "dead_fraction": s["training"].get("dead_fraction")}
                  for role, s in {**summary["saes"], **({"transcoder": summary["transcoder"]}
                                                          if "transcoder" in summary else {})}.items()])
    report.heading("Setup, timings (s), config and provenance")
    report.key_values(summary["timings_s"])
    report.code({"setup": setup, "config": summary["config"], "provenance": summary["provenance"]})
    return report.write(path)


def _feature_lines(prefix: str, feature: dict[str, Any]) -> str:
    drops = ", ".join(f"{d['next_token']!r} {d['logit_drop']:+.2f}" for d in feature["largest_logit_drops"])
    mean = feature["mean_logit_drop"]
    head = f"  {prefix}{feature['feature']}: mean next-token logit drop when removed " + (
        f"{mean:+.3f}" if mean is not None else "n/a") + f"; largest: {drops}"
    return "\n".join([head, *[f"      {line}" for line in feature["top_contexts"]]])
