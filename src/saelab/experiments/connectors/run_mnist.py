"""`connectors-mnist`: the MNIST half of "Learning Interpretable Features with Sparse Auto-Encoders" (feature
connectors), end to end in one run folder.

Train a small ReLU MLP on MNIST, an L1 ReLU SAE on every hidden layer (tied and untied), connectors between the
features of consecutive layers (trained from stored feature activations), then run the network with every span of
layers replaced by encode → connectors → decode. Writes `summary.json`, `report.html` and the figures (see
`report_mnist`).

A rerun of the same config reuses what the folder holds: the trained network (reloaded, so the SAEs' training data
is the same network's hidden states), the SAEs (`train`'s done-markers) and the connectors; only the cheap
evaluations, figures and report are redone. A folder whose network was trained with other settings is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from saelab.config import Config
from saelab.data.mnist import MnistSplit, load_mnist
from saelab.errors import CheckpointError, ConfigError
from saelab.evaluation import evaluate_reconstruction
from saelab.experiments.connectors import report_mnist
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
    trained_connector,
    weight_l1,
)
from saelab.interp.record import sae_fingerprint
from saelab.io import atomic_write_with, sha256_file
from saelab.models.mnist_mlp import (
    WEIGHTS_FILE,
    MnistMLP,
    MnistMLPConfig,
    MnistTrainConfig,
    evaluate_mnist_mlp,
    train_mnist_mlp,
)
from saelab.run_folder import RunFolder
from saelab.saes.initialization import seeded
from saelab.saes.losses import l1_penalty
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.training.config import TrainerConfig
from saelab.training.entry import tensor_batches, train

VARIANTS = ("tied", "untied")
MODEL_NAME = "mnist_mlp"
NETWORK_STAGE = "train_mlp"


@dataclasses.dataclass
class MnistSAEConfig(Config):
    expansion: int = dataclasses.field(default=4, metadata={"help": "latents per neuron"})
    l1_coefficient: float = dataclasses.field(
        default=1e-2, metadata={"help": "× mean over examples of Σ_i z_i·||d_i|| (decoder rows kept at unit norm)"}
    )
    # Batch 512 needs half the steps of 256 for a slightly worse layer-1 FVU (tied 0.061 vs 0.056 at 15 epochs).
    epochs: int = dataclasses.field(default=20, metadata={"help": "passes over the training images"})
    batch_size: int = dataclasses.field(default=512, metadata={"help": "hidden states per step"})
    lr: float = dataclasses.field(default=2e-3, metadata={"help": "learning rate"})
    warmup_steps: int = dataclasses.field(default=100, metadata={"help": "linear lr warm-up steps"})
    variants: list[str] = dataclasses.field(
        default_factory=lambda: list(VARIANTS), metadata={"help": "SAE variants trained and evaluated (tied, untied)"}
    )
    connect_variant: str = dataclasses.field(default="tied", metadata={"help": "whose features the connectors map"})

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
    # Off for the mlp form unless its hidden width equals the network's (the smart init needs it).
    compare_inits: bool = dataclasses.field(
        default=True, metadata={"help": "also train every connector from the other initialisation and compare final "
                                        "losses (the smart init can get stuck in a worse minimum)"}
    )
    weight_threshold: float = dataclasses.field(default=0.1, metadata={"help": "a weight is large if |w| > this"})
    train_limit: int | None = dataclasses.field(default=None, metadata={"help": "first N training images only"})
    test_limit: int | None = dataclasses.field(default=None, metadata={"help": "first N test images only"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the network's and the SAEs' initial weights"})
    # The matrices here are too small to gain from intra-op threads; on a busy machine, two threads' spin-waiting cost
    # 5x the CPU time of one (measured on MLP training).
    threads: int | None = dataclasses.field(default=1, metadata={"help": "torch threads (None: torch's setting)"})

    def validate(self) -> None:
        for name in ("train_limit", "test_limit", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive or None (got {value})")
        if self.weight_threshold < 0:
            raise ConfigError(f"weight_threshold must be >= 0 (got {self.weight_threshold})")


def run(cfg: MnistConnectorsConfig) -> dict[str, Any]:
    """Run every stage into `cfg.out_dir` (reusing what an earlier run of the same config finished) and return
    what `summary.json` holds."""
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: MnistConnectorsConfig) -> dict[str, Any]:
    folder = RunFolder.start(cfg)

    train_split, test = load_mnist("train", cfg.train_limit), load_mnist("test", cfg.test_limit)
    model, train_losses = _network(cfg, folder, train_split)
    base = evaluate_mnist_mlp(model, test)
    folder.lap("train_mlp")

    with torch.no_grad():
        hidden_train, hidden_test = model.hidden_states(train_split.images), model.hidden_states(test.images)
    layers = range(1, model.n_hidden + 1)
    network = sha256_file(folder.file("model") / WEIGHTS_FILE)
    saes: dict[str, dict[int, ReluSAE]] = {}
    sae_metrics: dict[str, dict[int, dict[str, float]]] = {}
    for variant in cfg.sae.variants:
        saes[variant] = {k: _train_sae(cfg, hidden_train[k - 1], k, variant, network, folder) for k in layers}
        sae_metrics[variant] = {k: _sae_metrics(saes[variant][k], hidden_test[k - 1]) for k in layers}
        for span in evaluate_spans(model, saes[variant], {}, test.images, test.labels):
            sae_metrics[variant][span.start]["spliced_accuracy"] = span.accuracy
            sae_metrics[variant][span.start]["spliced_loss"] = span.loss
    folder.lap("train_saes")

    chosen = saes[cfg.sae.connect_variant]
    with torch.no_grad():
        features = {part: {k: encode_features(chosen[k], hidden[k - 1]) for k in layers}
                    for part, hidden in (("train", hidden_train), ("test", hidden_test))}
    connectors: dict[int, FeatureConnector] = {}
    connector_results: dict[int, dict[str, Any]] = {}
    other_init = "smart" if cfg.connector.init == "random" else "random"
    for k in layers[:-1]:
        snapshots = _snapshots_path(folder) if k == 1 else None
        connectors[k], connector_results[k] = _fit_connector(folder, _connector_stage(k), model, chosen, features, k,
                                                             cfg.connector, snapshots)
        if cfg.compare_inits and _smart_init_applies(cfg.connector, model):
            _, connector_results[k][f"init_{other_init}"] = _fit_connector(
                folder, _connector_stage(k, other_init), model, chosen, features, k,
                cfg.connector.replace(init=other_init), None,
            )
    folder.lap("train_connectors")

    spans = [span._asdict() for span in evaluate_spans(model, chosen, connectors, test.images, test.labels)]
    weight_counts = _weight_counts(model, connectors, cfg.weight_threshold)
    folder.lap("simulate")

    summary: dict[str, Any] = {
        "base": base._asdict(),
        "mlp_train_losses": train_losses,
        "saes": sae_metrics,
        "connectors": connector_results,
        "spans": spans,
        "headline": _headline(base.accuracy, spans, weight_counts),
        "weight_counts": weight_counts,
        "files": {"network": str(folder.file("model")),
                  "connectors": {k: str(folder.file(f"{_connector_stage(k)}.safetensors")) for k in connectors},
                  "connector_epochs": str(_snapshots_path(folder))},
    }
    summary["figures"] = report_mnist.draw_figures(summary, folder.path)
    folder.lap("figures")
    report_mnist.write_report(folder.write_summary(summary, cfg), folder.report_path)
    folder.lap("report")
    return folder.write_summary(summary, cfg)


# ---- stages ---------------------------------------------------------------------------------------------------


def _network(cfg: MnistConnectorsConfig, folder: RunFolder, data: MnistSplit) -> tuple[MnistMLP, list[float]]:
    """The network, trained once per folder: a rerun reloads the saved one, so the SAEs trained on its hidden states
    are found finished. A folder whose network was trained with other settings is refused (its SAEs and
    connectors describe that network)."""
    request = json.loads(json.dumps({"model": cfg.model.to_dict(), "train": cfg.train.to_dict(),
                                     "train_limit": cfg.train_limit, "seed": cfg.seed}))
    done = folder.result(NETWORK_STAGE)
    if done is not None:
        if done["request"] != request:
            differ = sorted(key for key in request if request[key] != done["request"].get(key))
            raise CheckpointError(
                f"{folder.path} holds a network trained with other settings ({', '.join(differ)} differ, see "
                f"{folder.marker(NETWORK_STAGE)}); delete that folder to redo it, or choose another out_dir"
            )
        return MnistMLP.load(folder.file("model")), done["train_losses"]
    with seeded(cfg.seed):
        model = MnistMLP(cfg.model)
        train_losses = train_mnist_mlp(model, data, cfg.train)
    model.save(folder.file("model"))
    folder.mark_done(NETWORK_STAGE, {"request": request, "train_losses": train_losses})
    return model, train_losses


def _train_sae(cfg: MnistConnectorsConfig, hidden: Tensor, k: int, variant: str, network: str,
               folder: RunFolder) -> ReluSAE:
    """One SAE on hidden state k, in its own training folder. Its data is described by the network it comes from
    (the saved weights' hash) rather than by the hidden states' values, so a rerun that recomputes them with
    last-bit differences (other thread counts or CPUs) still finds the SAE finished."""
    sae_cfg = cfg.sae
    with seeded(cfg.seed + k):
        sae = ReluSAE(ReluSAEConfig(d_in=hidden.shape[1], n_latents=sae_cfg.expansion * hidden.shape[1],
                                    tied=variant == "tied", hookpoint=f"hidden.{k}", model_name=MODEL_NAME))
    batch_size = min(sae_cfg.batch_size, len(hidden))
    per_epoch = len(hidden) // batch_size * batch_size
    trainer_cfg = TrainerConfig(
        total_tokens=sae_cfg.epochs * per_epoch, batch_size=batch_size, lr=sae_cfg.lr, loss="mse",
        l1_coefficient=sae_cfg.l1_coefficient, warmup_steps=sae_cfg.warmup_steps, dead_window_tokens=per_epoch,
        checkpoint_every_steps=None, log_every_steps=50, seed=cfg.seed, progress=False,
    )
    data = {"network": network, "hidden_state": k, "shape": list(hidden.shape), "seed": cfg.seed + k}
    train(sae, tensor_batches(hidden, batch_size, seed=cfg.seed + k), trainer_cfg,
          folder.file("saes") / variant / f"layer_{k}", data=data)
    return sae


@torch.no_grad()
def _sae_metrics(sae: ReluSAE, hidden: Tensor) -> dict[str, float]:
    metrics = evaluate_reconstruction(sae, [hidden])
    latents = encode_features(sae, hidden)
    return {**{key: float(metrics[key]) for key in ("fvu", "mse", "l0", "dead_fraction")},
            "l1": l1_penalty(latents, sae.decoder_norms()).item()}


def _smart_init_applies(connector_cfg: ConnectorConfig, model: MnistMLP) -> bool:
    return connector_cfg.form != "mlp" or connector_cfg.mlp_hidden == model.cfg.hidden


def _connector_stage(k: int, init: str | None = None) -> str:
    """The done-marker stage of connector k → k+1 (the one configured, or the comparison from `init`); its weights
    are `<stage>.safetensors` in the run folder."""
    return f"connectors/connector_{k}_to_{k + 1}" + (f"_init_{init}" if init else "")


def _snapshots_path(folder: RunFolder) -> Path:
    return folder.file(f"{_connector_stage(1)}_epochs.safetensors")


def _fit_connector(folder: RunFolder, stage: str, model: MnistMLP, saes: dict[int, ReluSAE],
                   features: dict[str, dict[int, Tensor]], k: int, connector_cfg: ConnectorConfig,
                   snapshots: Path | None) -> tuple[FeatureConnector, dict[str, Any]]:
    """One connector k → k+1, trained once per folder, with its training curve and held-out MSE. With `snapshots`,
    its first weight matrix at init and after every epoch is saved there, stacked, for the report's figure."""
    with seeded(connector_cfg.seed + k):
        connector = FeatureConnector.from_config(saes[k].n_latents, saes[k + 1].n_latents, connector_cfg)
    if connector_cfg.init == "smart":
        smart_init_(connector, model.layers[k], saes[k], saes[k + 1])

    def fit(current: FeatureConnector) -> list[dict[str, float]]:
        taken = [current.weight_matrices()[0].detach().clone()]
        history = train_connector(current, features["train"][k], features["train"][k + 1], connector_cfg,
                                  on_epoch=lambda _, c: taken.append(c.weight_matrices()[0].detach().clone()))
        if snapshots is not None:
            stacked = torch.stack(taken).contiguous()
            atomic_write_with(snapshots, lambda tmp: save_file({"weights": stacked}, str(tmp)))
        return [epoch._asdict() for epoch in history]

    request = {"connector": connector_cfg.to_dict(), "saes": [sae_fingerprint(saes[k]), sae_fingerprint(saes[k + 1])]}
    connector, curve = trained_connector(folder, stage, connector, request, fit)
    alive = alive_features(features["train"][k + 1]) if connector_cfg.alive_only else None
    with torch.no_grad():
        test_mse = connector_mse(connector(features["test"][k]), features["test"][k + 1], alive).item()
    return connector, {
        "init": connector_cfg.init,
        "train_curve": curve,
        "final_train": curve[-1],
        "test_mse": test_mse,
        "weight_l1": weight_l1(connector.weight_matrices()).item(),
        "alive_outputs": int(alive.sum()) if alive is not None else None,
    }


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
    """The three targets of the feature-connector write-up, measured (None where the network has too few layers to
    measure one)."""
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
