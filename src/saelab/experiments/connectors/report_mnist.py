"""Figures and `report.html` of `connectors-mnist`, from its summary and the files it names: the neuron and feature
weight matrices, the first connector over its training epochs, and test accuracy per replaced span."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file
from torch import Tensor

from saelab.experiments.connectors.connector import count_large_weights, load_connector
from saelab.models.mnist_mlp import MnistMLP
from saelab.report.html import Report
from saelab.report.plots import pyplot, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage


def draw_figures(summary: dict[str, Any], folder: Path) -> dict[str, list[str]]:
    """Every figure as PNG in `folder`: {"span_accuracy": [...], "weights": [one per connector], "connector_epochs":
    [the first connector's epochs, when its snapshots were saved]}."""
    files = summary["files"]
    threshold = summary["weight_counts"]["threshold"]
    network = MnistMLP.load(files["network"])
    weights = []
    for key, path in files["connectors"].items():
        k = int(key)
        weights.append(_plot_weights(network.layers[k].weight, load_connector(path).weight_matrices()[0], k,
                                     threshold, folder / f"weights_{k}_to_{k + 1}.png"))
    snapshots = Path(files["connector_epochs"])
    figures = {
        "span_accuracy": [_plot_spans(summary["spans"], summary["base"]["accuracy"], folder / "span_accuracy.png")],
        "weights": weights,
        "connector_epochs": [_plot_epochs(load_file(str(snapshots))["weights"], folder / "connector_1_to_2_epochs.png")]
        if snapshots.exists() else [],
    }
    return {name: [str(path) for path in paths] for name, paths in figures.items()}


def _show_weights(ax: Axes, weight: Tensor, limit: float, title: str) -> AxesImage:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("from")
    ax.set_ylabel("to")
    return ax.imshow(weight.detach().cpu().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")


def _plot_weights(neuron_weight: Tensor, feature_weight: Tensor, k: int, threshold: float, path: Path) -> Path:
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4.6))
    for ax, weight, name in ((axes[0], neuron_weight, "neurons"), (axes[1], feature_weight, "features")):
        limit = max(weight.detach().abs().max().item(), 1e-8)
        large = count_large_weights([weight], threshold)
        image = _show_weights(ax, weight, limit, f"{name} {k}→{k + 1}: {large} weights with |w| > {threshold}")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_epochs(snapshots: Tensor, path: Path) -> Path:
    """One panel per epoch on one colour scale, so growth and pruning of connections are visible."""
    cols = min(len(snapshots), 6)
    rows = -(-len(snapshots) // cols)
    limit = max(snapshots.abs().max().item(), 1e-8)
    fig, axes = pyplot().subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index < len(snapshots):
            _show_weights(ax, snapshots[index], limit, "init" if index == 0 else f"epoch {index}")
        ax.set_axis_off()
    fig.suptitle("connector 1→2 over training", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_spans(spans: list[dict[str, Any]], base_accuracy: float, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(spans) + 1.5), 3.6))
    labels = [f"{s['start']}→{s['end']}" for s in spans]
    colours = [plt.cm.viridis(s["layers_replaced"] / max(1, max(x["layers_replaced"] for x in spans))) for s in spans]
    bars = ax.bar(labels, [s["accuracy"] for s in spans], color=colours)
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.axhline(base_accuracy, color="black", lw=1, ls="--", label=f"network {base_accuracy:.2%}")
    lowest = min([s["accuracy"] for s in spans] + [base_accuracy])
    ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
    ax.set_xlabel("span encoded → decoded (layers replaced = end − start)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(summary: dict[str, Any], path: Path) -> Path:
    """The HTML page of a summary whose figures are drawn (`draw_figures`)."""
    figures = summary["figures"]
    report = Report("Feature connectors on MNIST")
    report.paragraph(
        "A ReLU MLP's hidden layers are unwrapped into L1 ReLU SAE features; connectors map the features of one layer "
        "to the next; the network is then run with a span of layers replaced by encode → connectors → decode."
    )
    report.heading("Targets")
    report.key_values(summary["headline"])
    report.heading("Accuracy with layers replaced (test set)")
    report.table([{"span": f"{s['start']}→{s['end']}", **s} for s in summary["spans"]],
                 columns=["span", "layers_replaced", "accuracy", "loss"])
    for png in figures["span_accuracy"]:
        report.figure(png, "test accuracy per span; dashed: the original network")
    report.heading("Large weights")
    report.table(summary["weight_counts"]["per_layer"])
    for png in figures["weights"]:
        report.figure(png, "network weights between neurons (left) and connector weights between features (right)")
    for png in figures["connector_epochs"]:
        report.figure(png, "the first connector at init and after each training epoch")
    report.heading("SAEs (test set)")
    report.table([{"variant": variant, "layer": k, **metrics} for variant, per_layer in summary["saes"].items()
                  for k, metrics in per_layer.items()])
    report.heading("Connectors")
    report.table([{"connector": f"{k}→{int(k) + 1}", "init": r["init"], "test_mse": r["test_mse"],
                   "train_mse": r["final_train"]["mse"], "weight_l1": r["weight_l1"],
                   **{f"{key}_test_mse": v["test_mse"] for key, v in r.items() if key.startswith("init_")}}
                  for k, r in summary["connectors"].items()])
    report.heading("Timings (s), config and provenance")
    report.key_values(summary["timings_s"])
    report.code({"config": summary["config"], "provenance": summary["provenance"]})
    return report.write(path)
