"""`connectors-lm`: the language-model half of "Learning Interpretable Features with Sparse Auto-Encoders" (feature
connectors), end to end in one run folder.

One harvest stores the input and the output of the MLP of several blocks (`mlp_in.L`, `mlp_out.L` for each L in
`--layers`); per block a top-k SAE is trained on each, connectors of every form (linear, ReLU, MLP) learn the output
features from the input features. An output feature is linear when the linear connector's held-out MSE is within a
tolerance of a nonlinear reference's: per feature, the best on validation tokens of the linear connector, the linear
connector plus an MLP correction (early-stopped on held-out MSE, see `connector`), and the ReLU and MLP connectors.
The write-up's test (against the independently trained MLP connector) and the ReLU connector's are kept as columns.
Without L1 the linear connector is the least-squares linear map, solved exactly, and the ReLU connector starts there:
from random weights Adam left the linear connector of a 3k x 3k block far from converged after 8 epochs (block 2 of
the full run: training MSE still falling 6% per epoch, held-out MSE 6x the reference's), which the test then read
as nonlinearity. The per-block fractions form the write-up's per-layer table. For the main block (`--layer`) also:
a sweep of the linear connector's L1 coefficient, the strongest input connections of well-predicted output
features with each feature's top-activating contexts (to read OR- and AND-NOT-like relations), cross-entropy with
the MLP replaced by encode → connector → decode (and by a transcoder) next to SAE-only splices and MLP
zero-ablation, and each shown feature's effect on the next-token logits when it is removed.

Budgets (`--budget`): "small" (the defaults) harvests 150k tokens of blocks 2, 6 and 10 and trains each SAE on
100k; measured on a 2-core AVX2 EPYC shared with other jobs (load 2-6): harvest 8.3 min, 11-12 min per block at
load 2 (31 min at load 6), then transcoder, L1 sweep, CE and relations 15 min: about 45 min on a busy machine,
near half an hour on an idle one. "full" adds blocks 14, 18 and 22, harvests 600k tokens, trains each SAE on 1M
and widens the connectors; measured on 2 Zen 4 cores: harvest 43 min, then 22-25 min per block (two SAEs 3 min, the
ReLU and MLP connectors 10, the corrected linear one 11-15 epochs of about 75 s), about 3 h in all before the main
block's transcoder, L1 sweep, CE and relations.

Writes `summary.json`, `report.html` and the figures (see `report_lm`), and per block each output feature's held-out
MSE per connector form in `layers/<L>/per_feature.safetensors`. Re-running resumes: the store, the trained SAEs
(`train`'s done-markers) and the connectors trained from the same SAEs and settings (their done-markers) are reused.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from saelab.activations.harvest import HarvestConfig, open_or_harvest
from saelab.activations.split import StoreSplit, load_half, split_store
from saelab.activations.store import ActivationStore
from saelab.config import BudgetConfig
from saelab.data.tokenize import DataConfig
from saelab.errors import ConfigError
from saelab.evaluation import evaluate_reconstruction, splice_edits, splice_losses
from saelab.experiments.connectors import report_lm
from saelab.experiments.connectors.connector import (
    ConnectorConfig,
    FeatureConnector,
    LinearMap,
    alive_features,
    count_large_weights,
    encode_latents,
    heldout_feature_mse,
    least_squares_map,
    linear_features,
    n_rows,
    residual_from_linear,
    set_first_layer_,
    take_rows,
    through_features,
    top_connections,
    train_connector,
    trained_connector,
)
from saelab.experiments.connectors.lm_sites import feature_ablation_effects, mlp_replacement, mlp_sites
from saelab.interp.contexts import example_text
from saelab.interp.examples import ExampleSampler, TokenText
from saelab.interp.record import record_latents, sae_fingerprint
from saelab.io import atomic_write_with
from saelab.models.loading import OFFLINE_DEFAULT_MODEL, load_model
from saelab.run_folder import RunFolder
from saelab.saes import SparseAutoencoder
from saelab.saes.base import Latents, SparseLatents, to_dense
from saelab.saes.initialization import seeded
from saelab.saes.spec import SAESpec
from saelab.training.config import TrainerConfig
from saelab.training.entry import train_on_tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMS = ("linear", "relu", "mlp")
REFERENCE = "residual"  # the form of the nonlinear reference


@dataclasses.dataclass
class LMConnectorsConfig(BudgetConfig):
    BUDGETS = {
        "small": {},
        "full": {"layers": [2, 6, 10, 14, 18, 22], "data": {"n_tokens": 600_000}, "analysis_tokens": 60_000,
                 "validation_tokens": 30_000,
                 "downstream_contexts": 48, "trainer": {"total_tokens": 1_000_000},
                 "connector": {"epochs": 5, "mlp_hidden": 1024}, "reference": {"epochs": 40, "mlp_hidden": 1024}},
    }

    out_dir: str = dataclasses.field(default="runs/connectors-lm", metadata={"help": "run folder"})
    model: str = dataclasses.field(default=OFFLINE_DEFAULT_MODEL, metadata={"help": "HF name, path or offline default"})
    layer: int = dataclasses.field(default=6, metadata={"help": "block whose MLP is replaced (the detailed analyses)"})
    layers: list[int] = dataclasses.field(
        default_factory=lambda: [2, 6, 10],
        metadata={"help": "blocks of the per-layer linearity table (--layer is added when missing)"})
    store: str | None = dataclasses.field(
        default=None, metadata={"help": "reuse this store (holding mlp_in.L and mlp_out.L) instead of harvesting"}
    )
    # Positions 0-1 are dropped: SmolLM2's first real token carries rare massive activations (norms ~20x the
    # median) that would dominate pooled variances.
    data: DataConfig = dataclasses.field(
        default_factory=lambda: DataConfig(source="kjv", context_length=128, n_tokens=150_000, drop_first_positions=2)
    )
    analysis_tokens: int = dataclasses.field(
        default=30_000, metadata={"help": "stored tokens held out of all training, to score the connectors"}
    )
    validation_tokens: int = dataclasses.field(
        default=15_000, metadata={"help": "last training tokens kept out of the connectors' training: the reference "
                                          "early-stops on them and each feature's reference is chosen on them"})
    downstream_contexts: int = dataclasses.field(
        default=24, metadata={"help": "last contexts of the store, held out of everything, for the CE table"}
    )
    sae: SAESpec = dataclasses.field(
        default_factory=lambda: SAESpec(architecture="topk", n_latents=3072, k=32, preprocessing="scale")
    )
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(
            total_tokens=100_000, batch_size=1024, warmup_steps=50, auxk_coefficient=1 / 32,
            dead_window_tokens=200_000, checkpoint_every_steps=200, log_every_steps=20,
        )
    )
    forms: list[str] = dataclasses.field(default_factory=lambda: list(FORMS), metadata={"help": "connector forms"})
    transcoder: bool = dataclasses.field(
        default=True, metadata={"help": "also a transcoder (the SAE settings, mlp_in -> mlp_out, the same tokens) "
                                        "replacing the MLP in the CE table"})
    transcoder_skip_connection: bool = dataclasses.field(
        default=False, metadata={"help": "give the transcoder a linear skip connection"})
    # The write-up found a bias did not help; here it is kept (the SAEs' b_dec offsets need one) and reported.
    connector: ConnectorConfig = dataclasses.field(
        default_factory=lambda: ConnectorConfig(epochs=4, batch_size=1024, lr=1e-3, l1_coefficient=0.0,
                                                mlp_hidden=512),
        metadata={"help": "the connectors of the per-layer table; without L1 the linear one is the least-squares map "
                          "(L1 trades error for sparse weights: see l1_sweep)"}
    )
    reference: ConnectorConfig = dataclasses.field(
        default_factory=lambda: ConnectorConfig(form=REFERENCE, epochs=10, patience=2, batch_size=1024, lr=1e-3,
                                                l1_coefficient=0.0, mlp_hidden=512, min_improvement=0.005),
        metadata={"help": "the nonlinear reference: starts at the trained linear connector, early-stopped"})
    least_squares_start: bool = dataclasses.field(
        default=True, metadata={"help": "linear and relu connectors start at the least-squares linear map of the fit "
                                        "tokens (solved exactly) instead of random weights"})
    l1_sweep: list[float] = dataclasses.field(
        default_factory=lambda: [0.0, 1e-4, 3e-4, 1e-3, 3e-3],
        metadata={"help": "L1 coefficients of extra linear connectors on the main block (the write-up's sweep)"})
    linear_tolerance: float = dataclasses.field(
        default=1e-3,
        metadata={"help": "an output feature is linear if linear MSE - mlp MSE <= this (the write-up's test)"},
    )
    linear_tolerance_relative: float = dataclasses.field(
        default=0.05, metadata={"help": "the same test relative to each feature's variance"}
    )
    weight_threshold: float = dataclasses.field(default=0.1, metadata={"help": "a weight is large if |w| > this"})
    n_shown: int = dataclasses.field(default=8, metadata={"help": "output features shown with their connections"})
    n_connections: int = dataclasses.field(default=5, metadata={"help": "input connections shown per feature"})
    min_frequency: float = dataclasses.field(
        default=1e-3, metadata={"help": "shown output features fire on at least this share of tokens"}
    )
    record_tokens: int = dataclasses.field(
        default=100_000, metadata={"help": "stored tokens searched for each shown feature's top contexts"}
    )
    n_examples: int = dataclasses.field(default=3, metadata={"help": "top contexts shown per feature"})
    harvest_batch_size: int = dataclasses.field(default=8, metadata={"help": "contexts per harvest forward"})
    downstream_batch_size: int = dataclasses.field(default=4, metadata={"help": "contexts per CE forward"})
    device: str = dataclasses.field(default="cpu", metadata={"help": "torch device of the language model"})

    def validate(self) -> None:
        unknown = sorted(set(self.forms) - set(FORMS))
        if unknown or "linear" not in self.forms or "mlp" not in self.forms:
            raise ConfigError(f"forms {self.forms} must be among {list(FORMS)} and include linear and mlp "
                              "(the linearity test compares them)")
        if self.reference.form != REFERENCE:
            raise ConfigError(f"reference.form must be {REFERENCE!r} (it starts at the linear connector)")
        if min([self.layer, *self.layers]) < 0:
            raise ConfigError(f"layers must be >= 0 (got layer {self.layer}, layers {self.layers})")
        if any(c < 0 for c in self.l1_sweep):
            raise ConfigError(f"l1_sweep coefficients must be >= 0 (got {self.l1_sweep})")
        if self.sae.preprocessing == "token_l2":
            raise ConfigError("sae.preprocessing token_l2 cannot decode where the MLP's own output is gone (its "
                              "per-token norm is unknown there): use --sae.preprocessing scale or none")
        for name in ("analysis_tokens", "validation_tokens", "downstream_contexts", "n_shown", "n_connections",
                     "record_tokens", "n_examples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (got {getattr(self, name)})")

    def blocks(self) -> list[int]:
        """The blocks of the per-layer table, the main one included, in order."""
        return sorted({*self.layers, self.layer})


@dataclasses.dataclass
class Block:
    """One block's SAEs, features and connectors, and what its row of the per-layer table reports."""

    layer: int
    sites: tuple[str, str]
    saes: dict[str, SparseAutoencoder]
    sae_logs: dict[str, dict[str, Any]]
    features: dict[tuple[str, str], Latents]  # (in|out, fit|valid|test)
    connectors: dict[str, FeatureConnector]
    connector_results: dict[str, dict[str, Any]]
    feature_mse: dict[str, Tensor]  # held-out per output feature, per form and for the reference
    variance: Tensor
    alive: Tensor
    linearity: dict[str, Any]
    per_feature: Path
    start: Callable[[], LinearMap] | None  # the least-squares map of the fit tokens, solved once when first asked


def run(cfg: LMConnectorsConfig) -> dict[str, Any]:
    """Run every stage into `cfg.out_dir` (reusing the store, SAEs and connectors an earlier run finished) and return
    what `summary.json` holds."""
    folder = RunFolder.start(cfg)
    model, tokenizer = load_model(cfg.model, cfg.device, torch.float32)
    sites = {layer: mlp_sites(model, layer) for layer in cfg.blocks()}
    store = _open_store(cfg, model, tokenizer, [site for pair in sites.values() for site in pair], folder.path)
    data = HarvestConfig.from_dict(store.manifest["config"]).data
    split = split_store(store, cfg.analysis_tokens, cfg.downstream_contexts)
    if split.train[1] - split.train[0] <= 2 * cfg.validation_tokens:
        raise ConfigError(f"the store has {split.train[1] - split.train[0]} training tokens, too few to keep "
                          f"validation_tokens={cfg.validation_tokens} out of them; lower it or harvest more")
    folder.lap("load_and_harvest")

    table = []
    for layer in cfg.blocks():
        block = _block(cfg, store, split, layer, sites[layer], folder)
        table.append(_table_row(block))
        folder.lap(f"block_{layer}")
        if layer == cfg.layer:
            main = block
    site_in, site_out = main.sites
    saes, features, connectors = main.saes, main.features, main.connectors

    transcoder = None
    sae_logs = dict(main.sae_logs)
    if cfg.transcoder:  # trained on the SAEs' tokens, its input the MLP's input and its target the MLP's output
        transcoder, trained = train_on_tensor(
            cfg.sae.replace(skip_connection=cfg.transcoder_skip_connection),
            load_half(store, site_in, split.train), cfg.trainer, folder.file(_block_path(cfg.layer, "saes/transcoder")),
            hookpoint=site_in, model_name=cfg.model, target=load_half(store, site_out, split.train),
            target_hookpoint=site_out)
        sae_logs["transcoder"] = trained.records[-1] if trained.records else {}
        folder.lap("train_transcoder")

    sweep = _l1_sweep(cfg, main, folder)
    folder.lap("l1_sweep")

    ce = _cross_entropy(cfg, model, data, tokenizer, split, saes, connectors, site_in, site_out, transcoder)
    folder.lap("cross_entropy")

    shown = _shown_features(cfg, features["out", "fit"], main.feature_mse["linear"], main.variance, main.alive)
    relations = _relations(cfg, model, store, tokenizer, data, saes, connectors["linear"], shown, site_in, site_out,
                           folder.path)
    folder.lap("relations")

    summary: dict[str, Any] = {
        "setup": {"model": cfg.model, "layer": cfg.layer, "sites": [site_in, site_out], "store": str(store.path),
                  "blocks": cfg.blocks(), "corpus": data.source, "context_length": data.context_length,
                  "drop_first_positions": data.drop_first_positions,
                  "tokens": {"train": split.train[1] - split.train[0],
                             "connector_validation": cfg.validation_tokens,
                             "heldout": split.analysis[1] - split.analysis[0],
                             "downstream_contexts": int(split.downstream.shape[0])}},
        "saes": {role: {"n_latents": sae.n_latents, "k": getattr(sae.cfg, "k", None), "training": sae_logs[role],
                        "heldout_fvu": _heldout_fvu(sae, store, site, split.analysis)}
                 for (role, sae), site in zip(saes.items(), (site_in, site_out), strict=True)},
        **({} if transcoder is None else {"transcoder": {
            "n_latents": transcoder.n_latents, "k": transcoder.k, "skip_connection": transcoder.cfg.skip_connection,
            "training": sae_logs["transcoder"], "heldout_fvu": _heldout_fvu(transcoder, store, site_in, split.analysis,
                                                                            target=site_out)}}),
        "connectors": main.connector_results,
        "linearity": main.linearity,
        "per_layer": table,
        "l1_sweep": sweep,
        "write_up": WRITE_UP,
        "cross_entropy": ce,
        "relations": relations,
        "files": {"per_feature": str(main.per_feature),
                  "connectors": {form: str(folder.file(_block_path(cfg.layer, f"connectors/{form}.safetensors")))
                                 for form in connectors}},
    }
    summary["figures"] = report_lm.draw_figures(summary, folder.path)
    report_lm.write_report(folder.write_summary(summary, cfg), folder.report_path)
    folder.lap("report")
    return folder.write_summary(summary, cfg)


# The write-up's figures (Pythia-70M, 3072-latent SAEs, five layers), for the report's comparison.
WRITE_UP = {
    "fraction_linear_per_layer": [0.788, 0.959, 0.978, 0.980, 0.989],
    "test": "linear MSE within 1e-3 of the MLP connector's, over alive output features; L1 on the weights swept",
    "cross_entropy": "clean 4.97, SAE spliced 5.20-5.34, MLP zero-ablated 5.56-8.34",
}


def _block_path(layer: int, name: str) -> str:
    """Where a block's SAEs, connectors and per-feature errors live in the run folder."""
    return f"layers/{layer}/{name}"


def _block(cfg: LMConnectorsConfig, store: ActivationStore, split: StoreSplit, layer: int, sites: tuple[str, str],
           folder: RunFolder) -> Block:
    """Train (or reuse) one block's SAEs, connectors and reference and test which output features are linear."""
    saes, sae_logs = {}, {}
    for role, site in zip(("in", "out"), sites, strict=True):
        saes[role], trained = train_on_tensor(cfg.sae, load_half(store, site, split.train), cfg.trainer,
                                              folder.file(_block_path(layer, f"saes/mlp_{role}")), hookpoint=site,
                                              model_name=cfg.model)
        sae_logs[role] = trained.records[-1] if trained.records else {}
    features = {}
    for role, site in zip(("in", "out"), sites, strict=True):
        train = _features(saes[role], store, site, split.train)
        fit = n_rows(train) - cfg.validation_tokens
        features[role, "fit"] = take_rows(train, slice(0, fit))
        features[role, "valid"] = take_rows(train, slice(fit, None))
        features[role, "test"] = _features(saes[role], store, site, split.analysis)

    connectors, connector_results, feature_mse = {}, {}, {}
    alive = alive_features(features["out", "fit"])
    start = _least_squares_start(cfg, features)
    for form in cfg.forms:
        connectors[form], history = _fit_connector(cfg.connector.replace(form=form), saes, features, folder,
                                                   _block_path(layer, f"connectors/{form}"), start)
        feature_mse[form] = heldout_feature_mse(connectors[form], features["in", "test"], features["out", "test"])
        connector_results[form] = _connector_result(cfg, connectors[form], history, feature_mse[form], alive)
    reference, history = _fit_connector(cfg.reference, saes, features, folder,
                                        _block_path(layer, f"connectors/{REFERENCE}"), base=connectors["linear"])
    feature_mse[REFERENCE] = heldout_feature_mse(reference, features["in", "test"], features["out", "test"])
    connector_results[REFERENCE] = _connector_result(cfg, reference, history, feature_mse[REFERENCE], alive)
    # Each feature's reference: of linear, the corrected prediction and the other connectors, the one with the lowest
    # MSE on the validation tokens (linear first, so it wins ties): never worse than linear, or than any connector,
    # there. The corrected prediction alone was not enough: on block 2 of the full run it beat the least-squares map
    # by more than 1e-3 on 54% of the output features, a ReLU connector on 99%.
    candidates = {"linear": connectors["linear"], REFERENCE: reference,
                  **{form: c for form, c in connectors.items() if form != "linear"}}
    valid = torch.stack([heldout_feature_mse(c, features["in", "valid"], features["out", "valid"])
                         for c in candidates.values()])
    choice = valid.argmin(dim=0)
    feature_mse["reference"] = torch.stack([feature_mse[name] for name in candidates]).gather(0, choice[None])[0]
    chosen = {name: int((choice == i)[alive].sum()) for i, name in enumerate(candidates)}

    variance = _feature_variance(features["out", "test"])
    linearity = _linearity(cfg, feature_mse, variance, alive, chosen)
    per_feature = _save_per_feature(feature_mse, variance, alive, folder.file(_block_path(layer,
                                                                                         "per_feature.safetensors")))
    return Block(layer, sites, saes, sae_logs, features, connectors, connector_results, feature_mse, variance, alive,
                 linearity, per_feature, start)


def _connector_result(cfg: LMConnectorsConfig, connector: FeatureConnector, history: list[dict[str, float]],
                      mse: Tensor, alive: Tensor) -> dict[str, Any]:
    return {
        "train_curve": history,
        "test_mse_alive": mse[alive].mean().item(),
        "large_weights": count_large_weights(connector.weight_matrices(), cfg.weight_threshold),
        "total_weights": sum(w.numel() for w in connector.weight_matrices()),
    }


def _table_row(block: Block) -> dict[str, Any]:
    """One block's line of the per-layer table."""
    linearity, results = block.linearity, block.connector_results
    return {
        "layer": block.layer,
        "alive_output_features": linearity["alive_output_features"],
        "fraction_linear_vs_reference": linearity["fraction_linear_absolute_vs_reference"],
        "fraction_linear_vs_reference_relative": linearity["fraction_linear_relative_vs_reference"],
        "fraction_linear_vs_mlp": linearity["fraction_linear_absolute"],
        **({"fraction_linear_vs_relu": linearity["fraction_linear_absolute_vs_relu"],
            "fraction_relu_linear_vs_reference": linearity["fraction_relu_linear_absolute_vs_reference"],
            "fraction_relu_linear_vs_reference_relative": linearity["fraction_relu_linear_relative_vs_reference"]}
           if "relu" in block.connectors else {}),
        "test_mse_linear": results["linear"]["test_mse_alive"],
        "test_mse_reference": linearity["reference"]["test_mse_alive"],
        "test_mse_mlp": results["mlp"]["test_mse_alive"],
        "sae_in_train_fvu": block.sae_logs["in"].get("fvu"),
        "sae_out_train_fvu": block.sae_logs["out"].get("fvu"),
    }


def _l1_sweep(cfg: LMConnectorsConfig, block: Block, folder: RunFolder) -> list[dict[str, Any]]:
    """Linear connectors of the main block at each L1 coefficient of the sweep, tested against the same reference."""
    rows = []
    for coefficient in sorted({*cfg.l1_sweep, cfg.connector.l1_coefficient}):
        connector_cfg = cfg.connector.replace(form="linear", l1_coefficient=coefficient)
        if coefficient == cfg.connector.l1_coefficient:
            connector = block.connectors["linear"]
        else:
            connector, _ = _fit_connector(connector_cfg, block.saes, block.features, folder,
                                          _block_path(block.layer, f"l1_sweep/linear_l1_{coefficient:g}"),
                                          block.start)
        mse = heldout_feature_mse(connector, block.features["in", "test"], block.features["out", "test"])
        alive, weight = block.alive, connector.weight_matrices()[0]
        rows.append({
            "l1_coefficient": coefficient,
            "test_mse_alive": mse[alive].mean().item(),
            "fraction_linear_vs_reference": linear_features(
                mse, block.feature_mse["reference"], cfg.linear_tolerance)[alive].float().mean().item(),
            "fraction_linear_vs_reference_relative": linear_features(
                mse, block.feature_mse["reference"], cfg.linear_tolerance_relative,
                scale=block.variance)[alive].float().mean().item(),
            "fraction_linear_vs_mlp": linear_features(
                mse, block.feature_mse["mlp"], cfg.linear_tolerance)[alive].float().mean().item(),
            "large_weights": count_large_weights([weight], cfg.weight_threshold),
            "mean_row_l1": weight.detach().abs().sum(dim=1)[alive].mean().item(),
        })
    return rows


# ---- stages ---------------------------------------------------------------------------------------------------


def _open_store(cfg: LMConnectorsConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, sites: list[str],
                out: Path) -> ActivationStore:
    harvest_cfg = HarvestConfig(out_dir=str(out / "activations"), model=cfg.model, hookpoints=sites, data=cfg.data,
                                batch_size=cfg.harvest_batch_size, device=cfg.device, resume=True)
    return open_or_harvest(cfg.store, model, tokenizer, harvest_cfg)


@torch.no_grad()
def _features(sae: SparseAutoencoder, store: ActivationStore, site: str, tokens: tuple[int, int],
              chunk: int = 16_384) -> Latents:
    """The SAE's features of a token range, sparse for top-k SAEs (k values and indices per token)."""
    pieces = [encode_latents(sae, store.load(site, lo, min(lo + chunk, tokens[1])).float())
              for lo in range(tokens[0], tokens[1], chunk)]
    if isinstance(pieces[0], SparseLatents):
        return SparseLatents(torch.cat([p.values for p in pieces]), torch.cat([p.indices for p in pieces]),
                             pieces[0].n_latents)
    return torch.cat(pieces)


@torch.no_grad()
def _heldout_fvu(sae: SparseAutoencoder, store: ActivationStore, site: str, tokens: tuple[int, int],
                 target: str | None = None) -> float:
    """FVU on held-out tokens of `site` (against `target`'s activations for a transcoder)."""
    x = store.load(site, *tokens).float()
    batch = x if target is None else (x, store.load(target, *tokens).float())
    return float(evaluate_reconstruction(sae, [batch])["fvu"])


@torch.no_grad()
def _feature_variance(features: Latents, chunk: int = 16_384) -> Tensor:
    """Per-feature variance over the examples (float64 sums)."""
    total = squares = None
    n = n_rows(features)
    for start in range(0, n, chunk):
        dense = to_dense(take_rows(features, slice(start, start + chunk))).double()
        total = dense.sum(0) if total is None else total + dense.sum(0)
        squares = dense.pow(2).sum(0) if squares is None else squares + dense.pow(2).sum(0)
    mean = total / n
    return (squares / n - mean.pow(2)).clamp_min(0).float()


def _linearity(cfg: LMConnectorsConfig, mse: dict[str, Tensor], variance: Tensor, alive: Tensor,
               chosen: dict[str, int]) -> dict[str, Any]:
    """Fractions of alive output features that are linear: against the nonlinear reference (the main test), the
    mlp connector (the write-up's test; an mlp connector trained on its own can end worse than linear, which calls
    features linear for the wrong reason) and the relu connector; each with the absolute tolerance and relative to
    the feature's variance. Also the features whose relu connector is within the tolerance of the reference: a
    ReLU of a linear map, the write-up's connector form. `chosen`: how many alive features take their reference
    from each connector."""
    def fractions(reference: Tensor, form: str = "linear") -> tuple[float, float]:
        absolute = linear_features(mse[form], reference, cfg.linear_tolerance)[alive]
        relative = linear_features(mse[form], reference, cfg.linear_tolerance_relative, scale=variance)[alive]
        return absolute.float().mean().item(), relative.float().mean().item()

    result: dict[str, Any] = {"alive_output_features": int(alive.sum()), "tolerance_absolute": cfg.linear_tolerance,
                              "tolerance_relative_to_variance": cfg.linear_tolerance_relative}
    result["fraction_linear_absolute"], result["fraction_linear_relative"] = fractions(mse["mlp"])
    for name in ("reference", "relu"):
        if name in mse:
            result[f"fraction_linear_absolute_vs_{name}"], result[f"fraction_linear_relative_vs_{name}"] = fractions(
                mse[name])
    if "relu" in mse:  # ReLU of a linear map: the write-up's own connector form, features being non-negative
        result["fraction_relu_linear_absolute_vs_reference"], result["fraction_relu_linear_relative_vs_reference"] = (
            fractions(mse["reference"], "relu"))
    excess = (mse["reference"] - mse["linear"])[alive]
    result["reference"] = {
        "test_mse_alive": mse["reference"][alive].mean().item(),
        "linear_test_mse_alive": mse["linear"][alive].mean().item(),
        "features_chosen_from": chosen,
        "features_worse_than_linear_on_test": int((excess > 0).sum()),
        "largest_excess_over_linear_on_test": max(excess.max().item(), 0.0) if excess.numel() else 0.0,
    }
    result["median_variance_explained"] = {
        form: (1 - (m[alive] / variance[alive].clamp_min(1e-12))).clamp(min=-1).median().item()
        for form, m in mse.items()}
    result["median_feature_variance"] = variance[alive].median().item()
    return result


def _cross_entropy(cfg: LMConnectorsConfig, model: nn.Module, data: DataConfig, tokenizer: PreTrainedTokenizerBase,
                   split: StoreSplit, saes: dict[str, SparseAutoencoder], connectors: dict[str, nn.Module],
                   site_in: str, site_out: str, transcoder: SparseAutoencoder | None = None) -> dict[str, Any]:
    """CE and KL(clean || x) on the held-out contexts for each way of (partly) replacing the MLP (with a
    `transcoder`, also the MLP's output predicted by it from the MLP's input)."""
    replacements: dict[str, Any] = {
        "sae_on_mlp_input": {site_in: saes["in"].reconstruct},
        "sae_on_mlp_output": {site_out: saes["out"].reconstruct},
        "both_saes": {site_in: saes["in"].reconstruct, site_out: saes["out"].reconstruct},
        **{f"connector_{form}": mlp_replacement(site_in, site_out, through_features(saes["in"], [c], saes["out"]))
           for form, c in connectors.items()},
        **({} if transcoder is None else {"transcoder": splice_edits(transcoder, site_out)}),
        "mlp_zero_ablated": {site_out: torch.zeros_like},
    }
    excluded = tokenizer.all_special_ids if data.exclude_special_tokens else ()
    losses = splice_losses(model, site_out, split.downstream, replacements, batch_size=cfg.downstream_batch_size,
                           drop_first=data.drop_first_positions, exclude_token_ids=excluded, progress=True,
                           desc="cross-entropy")
    return {"ce": losses.ce, "kl": losses.kl}


def _shown_features(cfg: LMConnectorsConfig, f_out: Latents, mse_linear: Tensor, variance: Tensor,
                    alive: Tensor) -> list[int]:
    """Output features worth reading: firing often enough, ranked by the variance the linear connector explains."""
    counts = torch.bincount(f_out.indices[f_out.values > 0], minlength=f_out.n_latents) if isinstance(
        f_out, SparseLatents) else (f_out > 0).sum(0)
    eligible = alive & (counts.float() / n_rows(f_out) >= cfg.min_frequency)
    explained = torch.where(eligible, 1 - mse_linear / variance.clamp_min(1e-12), torch.tensor(-torch.inf))
    return [int(i) for i in explained.argsort(descending=True)[: cfg.n_shown] if eligible[i]]


def _relations(cfg: LMConnectorsConfig, model: nn.Module, store: ActivationStore,
               tokenizer: PreTrainedTokenizerBase, data: DataConfig, saes: dict[str, SparseAutoencoder],
               linear: FeatureConnector, shown: list[int], site_in: str, site_out: str, out: Path) -> list[dict]:
    """For each shown output feature: its strongest input connections (signed weights) and, for it and each input,
    the top-activating contexts and the next-token logit drop when the feature is removed."""
    text = TokenText(tokenizer)
    samplers = {role: ExampleSampler(record_latents(saes[role], store, out / "records" / f"mlp_{role}", site,
                                                    max_tokens=cfg.record_tokens, show_progress=False),
                                     store, window_before=12, window_after=2)
                for role, site in (("in", site_in), ("out", site_out))}
    contexts = store.contexts()

    @functools.cache  # an input feature often feeds several shown outputs: describe it once
    def describe(role: str, feature: int, site: str) -> dict[str, Any]:
        examples = samplers[role].top(feature, cfg.n_examples)
        rows = sorted({example.context for example in examples})
        effects = feature_ablation_effects(model, site, saes[role], feature, contexts[rows],
                                           drop_first=data.drop_first_positions) if rows else []
        strongest = sorted(effects, key=lambda e: -e.logit_drop)[:3]
        return {
            "feature": feature,
            "top_contexts": [example_text(example, text) for example in examples],
            "mean_logit_drop": float(np.mean([e.logit_drop for e in effects])) if effects else None,
            "largest_logit_drops": [{"next_token": text.piece(e.next_token), "logit_drop": e.logit_drop,
                                     "activation": e.activation} for e in strongest],
        }

    weight = linear.weight_matrices()[0]
    relations = []
    for feature in shown:
        connections = top_connections(weight, feature, cfg.n_connections)
        relations.append({
            "output": describe("out", feature, site_out),
            "formula": f"OF{feature} ≈ " + " ".join(f"{w:+.2f}·IF{i}" for i, w in connections),
            "inputs": [{"weight": w, **describe("in", i, site_in)} for i, w in connections],
        })
    return relations


def _least_squares_start(cfg: LMConnectorsConfig, features: dict[tuple[str, str], Latents],
                         ) -> Callable[[], LinearMap] | None:
    """The least-squares linear map of the block's fit tokens, solved when first asked for (a resumed run whose
    connectors are all trained never solves it), or None when the connectors start at random."""
    if not cfg.least_squares_start:
        return None
    return functools.cache(lambda: least_squares_map(features["in", "fit"], features["out", "fit"]))


def _fit_connector(cfg: ConnectorConfig, saes: dict[str, SparseAutoencoder], features: dict[tuple[str, str], Latents],
                   folder: RunFolder, stage: str, start: Callable[[], LinearMap] | None = None,
                   base: FeatureConnector | None = None) -> tuple[FeatureConnector, list[dict[str, float]]]:
    """Train one connector on the fit tokens, or load it when the folder holds one trained with the same settings
    and SAEs (a rerun then only redoes the cheap analyses). A linear or relu connector starts at `start()` when
    given (a linear one without L1 is then that map, untrained). With `base` (a trained linear connector), a
    residual connector starting from it, early-stopped on the validation tokens."""
    with seeded(cfg.seed):
        connector = (FeatureConnector.from_config(saes["in"].n_latents, saes["out"].n_latents, cfg) if base is None
                     else residual_from_linear(base, cfg.mlp_hidden, cfg.seed))
    validation = None if base is None else (features["in", "valid"], features["out", "valid"])
    start = start if base is None and cfg.form in ("linear", "relu") else None

    def fit(current: FeatureConnector) -> list[dict[str, float]]:
        if start is not None:
            set_first_layer_(current, start())
            if cfg.form == "linear" and cfg.l1_coefficient == 0:
                return []  # already the minimum of the training loss
        history = train_connector(current, features["in", "fit"], features["out", "fit"], cfg, validation=validation)
        return [epoch._asdict() for epoch in history]

    request = {"connector": cfg.to_dict(), "saes": {role: sae_fingerprint(sae) for role, sae in saes.items()},
               "fit_tokens": n_rows(features["in", "fit"]),
               **({} if start is None else {"start": "least_squares"}),
               **({} if base is None else {"start": [w.detach().double().sum().item() for w in
                                                    base.weight_matrices()]})}
    return trained_connector(folder, stage, connector, request, fit)


def _save_per_feature(mse: dict[str, Tensor], variance: Tensor, alive: Tensor, path: Path) -> Path:
    """Each output feature's held-out MSE per connector form, its variance and whether it is alive (what the
    linearity test and its figure read)."""
    tensors = {**{f"mse.{form}": m.contiguous() for form, m in mse.items()}, "variance": variance.contiguous(),
               "alive": alive.contiguous()}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp)))
    return path
