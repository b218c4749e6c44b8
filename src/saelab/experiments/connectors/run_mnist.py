"""`connectors-mnist`: the MNIST half of the feature-connector seed, end to end in one run folder.

Train a small ReLU MLP on MNIST, an L1 ReLU SAE on every hidden layer (tied and untied), connectors between the
features of consecutive layers (trained from stored feature activations), then run the network with every span of
layers replaced by encode → connectors → decode. Writes `results.json`, `report.html` and the figures: the neuron
and feature weight matrices, one connector over its training epochs, and accuracy per span.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch
from saelab.recipes.train_tensor import tensor_batches
from safetensors.torch import save_file
from torch import Tensor

from saelab.config import Config
from saelab.data.mnist import load_mnist
from saelab.errors import ConfigError
from saelab.evaluation import evaluate_reconstruction
from saelab.experiments.connectors.connector import (
    ConnectorConfig,
    FeatureConnector,
    alive_features,
    connector_mse,
    count_large_weights,
    encode_features,
    evaluate_spans,
    smart_init_,
    train_connector,
    weight_l1,
)
from saelab.io import atomic_write_json, atomic_write_with
from saelab.models.mnist_mlp import (
    MnistMLP,
    MnistMLPConfig,
    MnistTrainConfig,
    evaluate_mnist_mlp,
    train_mnist_mlp,
)
from saelab.provenance import provenance
from saelab.report.html import Report
from saelab.report.plots import save_figure
from saelab.run_folder import Stopwatch
from saelab.saes.losses import l1_penalty
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.training.config import TrainerConfig
from saelab.training.trainer import Trainer

matplotlib.use("Agg")  # files only, no display; set before the first figure

VARIANTS = ("tied", "untied")
MODEL_NAME = "mnist_mlp"


@dataclasses.dataclass
class MnistSAEConfig(Config):
    expansion: int = 4  # latents per neuron
    l1_coefficient: float = 1e-2  # × mean over examples of Σ_i z_i·||d_i|| (decoder rows kept at unit norm)
    # Batch 512 needs half the steps of 256 for a slightly worse layer-1 FVU (tied 0.061 vs 0.056 at 15 epochs).
    epochs: int = 20
    batch_size: int = 512
    lr: float = 2e-3
    warmup_steps: int = 100
    variants: list[str] = dataclasses.field(default_factory=lambda: list(VARIANTS))  # trained and evaluated
    connect_variant: str = "tied"  # whose features the connectors map

    def validate(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise ConfigError(f"sae.variants {self.variants} must be a non-empty subset of {list(VARIANTS)}")
        if self.connect_variant not in self.variants:
            raise ConfigError(f"sae.connect_variant={self.connect_variant!r} is not among sae.variants")
        if min(self.expansion, self.epochs, self.batch_size) <= 0 or self.lr <= 0 or self.l1_coefficient < 0:
            raise ConfigError("sae: expansion, epochs, batch_size and lr must be positive, l1_coefficient >= 0")


@dataclasses.dataclass
class MnistConnectorsConfig(Config):
    out_dir: str = dataclasses.field(default="runs/connectors_mnist", metadata={"help": "run folder"})
    model: MnistMLPConfig = dataclasses.field(default_factory=MnistMLPConfig)
    train: MnistTrainConfig = dataclasses.field(default_factory=MnistTrainConfig)
    sae: MnistSAEConfig = dataclasses.field(default_factory=MnistSAEConfig)
    # l1 1e-2: on the default network, 3e-3 / 1e-2 / 3e-2 gave 4317 / 2361 / 1236 large feature weights (3851 between
    # neurons) at 96.3 / 96.2 / 95.7% test accuracy with two layers replaced (base 97.6%).
    connector: ConnectorConfig = dataclasses.field(default_factory=lambda: ConnectorConfig(l1_coefficient=1e-2))
    # Also train every connector from the other initialisation, to compare final losses (the seed found the smart
    # init stuck in a worse minimum). Off for the mlp form unless its hidden width equals the network's.
    compare_inits: bool = True
    weight_threshold: float = dataclasses.field(default=0.1, metadata={"help": "a weight is large if |w| > this"})
    train_limit: int | None = dataclasses.field(default=None, metadata={"help": "first N training images only"})
    test_limit: int | None = dataclasses.field(default=None, metadata={"help": "first N test images only"})
    seed: int = 0
    # The matrices here are too small to gain from intra-op threads; on a busy machine, two threads' spin-waiting cost
    # 5x the CPU time of one (measured on MLP training). None keeps torch's setting.
    threads: int | None = 1

    def validate(self) -> None:
        for name in ("train_limit", "test_limit", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive or None (got {value})")
        if self.weight_threshold < 0:
            raise ConfigError(f"weight_threshold must be >= 0 (got {self.weight_threshold})")


CONFIG = MnistConnectorsConfig


def run(cfg: MnistConnectorsConfig) -> dict[str, Any]:
    return run_mnist_connectors(cfg, cfg.out_dir)


def run_mnist_connectors(cfg: MnistConnectorsConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run every stage into `out_dir` and return the results that `results.json` holds. Stages are not resumed: a
    rerun retrains everything (a few minutes) and overwrites the folder's files."""
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg.replace(out_dir=str(out_dir)), Path(out_dir))
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: MnistConnectorsConfig, out: Path) -> dict[str, Any]:
    cfg.save(out / "config.json")
    watch = Stopwatch()
    lap, timings = watch.lap, watch.seconds

    train, test = load_mnist("train", cfg.train_limit), load_mnist("test", cfg.test_limit)
    torch.manual_seed(cfg.seed)
    model = MnistMLP(cfg.model)
    train_losses = train_mnist_mlp(model, train, cfg.train)
    model.save(out / "model")
    base = evaluate_mnist_mlp(model, test)
    lap("train_mlp")

    with torch.no_grad():
        hidden_train, hidden_test = model.hidden_states(train.images), model.hidden_states(test.images)
    layers = range(1, model.n_hidden + 1)
    saes: dict[str, dict[int, ReluSAE]] = {}
    sae_metrics: dict[str, dict[int, dict[str, float]]] = {}
    for variant in cfg.sae.variants:
        saes[variant] = {k: _train_sae(cfg, hidden_train[k - 1], k, variant, out) for k in layers}
        sae_metrics[variant] = {k: _sae_metrics(saes[variant][k], hidden_test[k - 1]) for k in layers}
        for span in evaluate_spans(model, saes[variant], {}, test.images, test.labels):
            sae_metrics[variant][span.start]["spliced_accuracy"] = span.accuracy
            sae_metrics[variant][span.start]["spliced_loss"] = span.loss
    lap("train_saes")

    chosen = saes[cfg.sae.connect_variant]
    with torch.no_grad():
        features_train = {k: encode_features(chosen[k], hidden_train[k - 1]) for k in layers}
        features_test = {k: encode_features(chosen[k], hidden_test[k - 1]) for k in layers}
    connectors: dict[int, FeatureConnector] = {}
    connector_results: dict[int, dict[str, Any]] = {}
    snapshots: list[Tensor] = []
    other_init = "smart" if cfg.connector.init == "random" else "random"
    for k in layers[:-1]:
        fit = functools.partial(_fit_connector, model, chosen, features_train, features_test, k)
        connectors[k], connector_results[k] = fit(cfg.connector, snapshots if k == 1 else None)
        if cfg.compare_inits and _smart_init_applies(cfg.connector, model):
            _, connector_results[k][f"init_{other_init}"] = fit(cfg.connector.replace(init=other_init), None)
        _save_connector(connectors[k], out / "connectors" / f"connector_{k}_to_{k + 1}.safetensors")
    lap("train_connectors")

    spans = [span._asdict() for span in evaluate_spans(model, chosen, connectors, test.images, test.labels)]
    weight_counts = _weight_counts(model, connectors, cfg.weight_threshold)
    lap("simulate")

    figures = {
        "span_accuracy": [_plot_spans(spans, base.accuracy, out / "span_accuracy.png")],
        "weights": [_plot_weights(model.layers[k].weight, connectors[k], k, cfg.weight_threshold,
                                  out / f"weights_{k}_to_{k + 1}.png") for k in connectors],
        "connector_epochs": [_plot_epochs(snapshots, out / "connector_1_to_2_epochs.png")] if snapshots else [],
    }
    lap("figures")
    results = {
        "base": base._asdict(),
        "mlp_train_losses": train_losses,
        "saes": sae_metrics,
        "connectors": connector_results,
        "spans": spans,
        "headline": _headline(base.accuracy, spans, weight_counts),
        "weight_counts": weight_counts,
        "figures": {name: [str(path) for path in paths] for name, paths in figures.items()},
        "timings_s": timings,
        "config": cfg.to_dict(),
        "provenance": provenance(),
    }
    _write_report(results, figures, out / "report.html")
    lap("report")
    atomic_write_json(out / "results.json", {**results, "timings_s": timings})
    return {**results, "timings_s": timings}


# ---- stages ---------------------------------------------------------------------------------------------------


def _train_sae(cfg: MnistConnectorsConfig, hidden: Tensor, k: int, variant: str, out: Path) -> ReluSAE:
    sae_cfg = cfg.sae
    sae = ReluSAE(ReluSAEConfig(d_in=hidden.shape[1], n_latents=sae_cfg.expansion * hidden.shape[1],
                                tied=variant == "tied", hookpoint=f"hidden.{k}", model_name=MODEL_NAME))
    batch_size = min(sae_cfg.batch_size, len(hidden))
    per_epoch = len(hidden) // batch_size * batch_size
    trainer_cfg = TrainerConfig(
        total_tokens=sae_cfg.epochs * per_epoch, batch_size=batch_size, lr=sae_cfg.lr, loss="mse",
        l1_coefficient=sae_cfg.l1_coefficient, warmup_steps=sae_cfg.warmup_steps, dead_window_tokens=per_epoch,
        checkpoint_every_steps=None, log_every_steps=50, seed=cfg.seed, progress=False,
    )
    torch.manual_seed(cfg.seed + k)
    Trainer(sae, trainer_cfg, out / "saes" / variant / f"layer_{k}").fit(
        tensor_batches(hidden, batch_size, seed=cfg.seed + k)
    )
    return sae


@torch.no_grad()
def _sae_metrics(sae: ReluSAE, hidden: Tensor) -> dict[str, float]:
    metrics = evaluate_reconstruction(sae, [hidden])
    latents = encode_features(sae, hidden)
    return {**{key: float(metrics[key]) for key in ("fvu", "mse", "l0", "dead_fraction")},
            "l1": l1_penalty(latents, sae.decoder_norms()).item()}


def _smart_init_applies(connector_cfg: ConnectorConfig, model: MnistMLP) -> bool:
    return connector_cfg.form != "mlp" or connector_cfg.mlp_hidden == model.cfg.hidden


def _fit_connector(model: MnistMLP, saes: dict[int, ReluSAE], features_train: dict[int, Tensor],
                   features_test: dict[int, Tensor], k: int, connector_cfg: ConnectorConfig,
                   snapshots: list[Tensor] | None) -> tuple[FeatureConnector, dict[str, Any]]:
    """One connector k → k+1 with its training curve and held-out MSE; appends the weights at init and after every
    epoch to `snapshots` when given (the first matrix of the connector)."""
    torch.manual_seed(connector_cfg.seed + k)
    connector = FeatureConnector.from_config(saes[k].n_latents, saes[k + 1].n_latents, connector_cfg)
    if connector_cfg.init == "smart":
        smart_init_(connector, model.layers[k], saes[k], saes[k + 1])

    def snapshot(_epoch: int, current: FeatureConnector) -> None:
        snapshots.append(current.weight_matrices()[0].detach().clone())

    if snapshots is not None:
        snapshot(-1, connector)
    history = train_connector(connector, features_train[k], features_train[k + 1], connector_cfg,
                              on_epoch=snapshot if snapshots is not None else None)
    alive = alive_features(features_train[k + 1]) if connector_cfg.alive_only else None
    with torch.no_grad():
        test_mse = connector_mse(connector(features_test[k]), features_test[k + 1], alive).item()
    return connector, {
        "init": connector_cfg.init,
        "train_curve": [epoch._asdict() for epoch in history],
        "final_train": history[-1]._asdict(),
        "test_mse": test_mse,
        "weight_l1": weight_l1(connector.weight_matrices()).item(),
        "alive_outputs": int(alive.sum()) if alive is not None else None,
    }


def _save_connector(connector: FeatureConnector, path: Path) -> None:
    tensors = {name: t.detach().contiguous() for name, t in connector.state_dict().items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"form": connector.form}))


def _weight_counts(model: MnistMLP, connectors: dict[int, FeatureConnector], threshold: float) -> dict[str, Any]:
    """Large weights between neurons (the network layers the connectors replace) vs between features."""
    per_layer = []
    for k, connector in connectors.items():
        neuron, feature = [model.layers[k].weight], connector.weight_matrices()
        per_layer.append({
            "layers": f"{k}->{k + 1}",
            "neuron_large": count_large_weights(neuron, threshold),
            "neuron_total": sum(w.numel() for w in neuron),
            "feature_large": count_large_weights(feature, threshold),
            "feature_total": sum(w.numel() for w in feature),
        })
    totals = {key: sum(row[key] for row in per_layer) for key in per_layer[0] if key != "layers"} if per_layer else {}
    return {"threshold": threshold, "per_layer": per_layer, "total": totals}


def _headline(base_accuracy: float, spans: list[dict[str, Any]], weight_counts: dict[str, Any]) -> dict[str, Any]:
    """The seed's three targets, measured (None where the network has too few layers to measure one)."""
    two = [s for s in spans if s["layers_replaced"] == 2]
    best_two = max(two, key=lambda s: s["accuracy"]) if two else None
    totals = weight_counts["total"]
    return {
        "base_accuracy": base_accuracy,
        "base_at_least_97.5": base_accuracy >= 0.975,
        "two_layers_replaced_span": [best_two["start"], best_two["end"]] if best_two else None,
        "two_layers_replaced_accuracy": best_two["accuracy"] if best_two else None,
        "two_layers_within_5_points": base_accuracy - best_two["accuracy"] <= 0.05 if best_two else None,
        "neuron_large_weights": totals.get("neuron_large"),
        "feature_large_weights": totals.get("feature_large"),
        "fewer_large_weights_between_features": totals["feature_large"] < totals["neuron_large"] if totals else None,
    }


# ---- figures and report -------------------------------------------------------------------------------------


def _show_weights(ax: plt.Axes, weight: Tensor, limit: float, title: str) -> Any:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("from")
    ax.set_ylabel("to")
    return ax.imshow(weight.detach().cpu().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")


def _plot_weights(neuron_weight: Tensor, connector: FeatureConnector, k: int, threshold: float, path: Path) -> Path:
    feature_weight = connector.weight_matrices()[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, weight, name in ((axes[0], neuron_weight, "neurons"), (axes[1], feature_weight, "features")):
        limit = max(weight.detach().abs().max().item(), 1e-8)
        large = count_large_weights([weight], threshold)
        image = _show_weights(ax, weight, limit, f"{name} {k}→{k + 1}: {large} weights with |w| > {threshold}")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_epochs(snapshots: list[Tensor], path: Path) -> Path:
    """One panel per epoch on one colour scale, so growth and pruning of connections are visible."""
    cols = min(len(snapshots), 6)
    rows = -(-len(snapshots) // cols)
    limit = max(max(s.abs().max().item() for s in snapshots), 1e-8)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index < len(snapshots):
            _show_weights(ax, snapshots[index], limit, "init" if index == 0 else f"epoch {index}")
        ax.set_axis_off()
    fig.suptitle("connector 1→2 over training", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_spans(spans: list[dict[str, Any]], base_accuracy: float, path: Path) -> Path:
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


def _write_report(results: dict[str, Any], figures: dict[str, Any], path: Path) -> Path:
    report = Report("Feature connectors on MNIST")
    report.paragraph(
        "A ReLU MLP's hidden layers are unwrapped into L1 ReLU SAE features; connectors map the features of one layer "
        "to the next; the network is then run with a span of layers replaced by encode → connectors → decode."
    )
    report.heading("Targets")
    report.key_values(results["headline"])
    report.heading("Accuracy with layers replaced (test set)")
    report.table([{"span": f"{s['start']}→{s['end']}", **s} for s in results["spans"]],
                 columns=["span", "layers_replaced", "accuracy", "loss"])
    for png in figures["span_accuracy"]:
        report.figure(png, "test accuracy per span; dashed: the original network")
    report.heading("Large weights")
    report.table(results["weight_counts"]["per_layer"])
    for png in figures["weights"]:
        report.figure(png, "network weights between neurons (left) and connector weights between features (right)")
    for png in figures["connector_epochs"]:
        report.figure(png, "the first connector at init and after each training epoch")
    report.heading("SAEs (test set)")
    report.table([{"variant": variant, "layer": k, **metrics} for variant, per_layer in results["saes"].items()
                  for k, metrics in per_layer.items()])
    report.heading("Connectors")
    report.table([{"connector": f"{k}→{k + 1}", "init": r["init"], "test_mse": r["test_mse"],
                   "train_mse": r["final_train"]["mse"], "weight_l1": r["weight_l1"],
                   **{f"{key}_test_mse": v["test_mse"] for key, v in r.items() if key.startswith("init_")}}
                  for k, r in results["connectors"].items()])
    report.heading("Timings (s), config and provenance")
    report.key_values(results["timings_s"])
    report.code({"config": results["config"], "provenance": results["provenance"]})
    return report.write(path)
