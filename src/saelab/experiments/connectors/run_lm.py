"""`connectors-lm`: the language-model half of "Learning Interpretable Features with Sparse Auto-Encoders" (feature
connectors), end to end in one run folder.

One harvest stores the input and the output of one block's MLP (`mlp_in.L`, `mlp_out.L`); a top-k SAE is trained on
each; connectors of every form (linear, ReLU, MLP) learn the output features from the input features; then:
which output features are linear (the linear connector within a tolerance of the MLP connector), the strongest
input connections of well-predicted output features with each feature's top-activating contexts (to read OR- and
AND-NOT-like relations), cross-entropy with the MLP replaced by encode → connector → decode next to SAE-only
splices and MLP zero-ablation, and each shown feature's effect on the next-token logits when it is removed.

Writes `summary.json`, `report.html` and the figures (see `report_lm`), and each output feature's held-out MSE per
connector form in `per_feature.safetensors`. Re-running resumes: the store, the trained SAEs (`train`'s
done-markers) and the connectors trained from the same SAEs and settings (their done-markers) are reused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from saelab.activations.harvest import HarvestConfig, open_or_harvest
from saelab.activations.split import StoreSplit, load_half, split_store
from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.data.tokenize import DataConfig
from saelab.errors import ConfigError
from saelab.evaluation import evaluate_reconstruction, splice_edits, splice_losses
from saelab.experiments.connectors import report_lm
from saelab.experiments.connectors.connector import (
    ConnectorConfig,
    FeatureConnector,
    alive_features,
    count_large_weights,
    encode_latents,
    heldout_feature_mse,
    linear_features,
    n_rows,
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


@dataclasses.dataclass
class LMConnectorsConfig(Config):
    out_dir: str = dataclasses.field(default="runs/connectors-lm", metadata={"help": "run folder"})
    model: str = dataclasses.field(default=OFFLINE_DEFAULT_MODEL, metadata={"help": "HF name, path or offline default"})
    layer: int = dataclasses.field(default=6, metadata={"help": "block whose MLP is replaced"})
    store: str | None = dataclasses.field(
        default=None, metadata={"help": "reuse this store (holding mlp_in.L and mlp_out.L) instead of harvesting"}
    )
    # Positions 0-1 are dropped: SmolLM2's first real token carries rare massive activations (norms ~20x the
    # median) that would dominate pooled variances.
    data: DataConfig = dataclasses.field(
        default_factory=lambda: DataConfig(source="kjv", context_length=128, n_tokens=250_000, drop_first_positions=2)
    )
    analysis_tokens: int = dataclasses.field(
        default=50_000, metadata={"help": "stored tokens held out of all training, to score the connectors"}
    )
    downstream_contexts: int = dataclasses.field(
        default=24, metadata={"help": "last contexts of the store, held out of everything, for the CE table"}
    )
    sae: SAESpec = dataclasses.field(
        default_factory=lambda: SAESpec(architecture="topk", n_latents=3072, k=32, preprocessing="scale")
    )
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(
            total_tokens=500_000, batch_size=1024, warmup_steps=50, auxk_coefficient=1 / 32,
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
        default_factory=lambda: ConnectorConfig(epochs=6, batch_size=1024, lr=1e-3, l1_coefficient=3e-4,
                                                mlp_hidden=1024)
    )
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
        if self.sae.preprocessing == "token_l2":
            raise ConfigError("sae.preprocessing token_l2 cannot decode where the MLP's own output is gone (its "
                              "per-token norm is unknown there): use --sae.preprocessing scale or none")
        if self.layer < 0:
            raise ConfigError(f"layer must be >= 0 (got {self.layer})")
        for name in ("analysis_tokens", "downstream_contexts", "n_shown", "n_connections", "record_tokens",
                     "n_examples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (got {getattr(self, name)})")


def run(cfg: LMConnectorsConfig) -> dict[str, Any]:
    """Run every stage into `cfg.out_dir` (reusing the store, SAEs and connectors an earlier run finished) and return
    what `summary.json` holds."""
    folder = RunFolder.start(cfg)
    model, tokenizer = load_model(cfg.model, cfg.device, torch.float32)
    site_in, site_out = mlp_sites(model, cfg.layer)
    store = _open_store(cfg, model, tokenizer, [site_in, site_out], folder.path)
    data = HarvestConfig.from_dict(store.manifest["config"]).data
    split = split_store(store, cfg.analysis_tokens, cfg.downstream_contexts)
    folder.lap("load_and_harvest")

    saes, sae_logs = {}, {}
    for role, site in (("in", site_in), ("out", site_out)):
        saes[role], trained = train_on_tensor(cfg.sae, load_half(store, site, split.train), cfg.trainer,
                                              folder.file("saes") / f"mlp_{role}", hookpoint=site,
                                              model_name=cfg.model)
        sae_logs[role] = trained.records[-1] if trained.records else {}
    folder.lap("train_saes")
    transcoder = None
    if cfg.transcoder:  # trained on the SAEs' tokens, its input the MLP's input and its target the MLP's output
        transcoder, trained = train_on_tensor(
            cfg.sae.replace(skip_connection=cfg.transcoder_skip_connection),
            load_half(store, site_in, split.train), cfg.trainer, folder.file("saes") / "transcoder",
            hookpoint=site_in, model_name=cfg.model, target=load_half(store, site_out, split.train),
            target_hookpoint=site_out)
        sae_logs["transcoder"] = trained.records[-1] if trained.records else {}
        folder.lap("train_transcoder")

    features = {(role, part): _features(saes[role], store, site, tokens)
                for role, site in (("in", site_in), ("out", site_out))
                for part, tokens in (("train", split.train), ("test", split.analysis))}
    folder.lap("encode_features")

    connectors, connector_results, feature_mse = {}, {}, {}
    alive = alive_features(features["out", "train"])
    for form in cfg.forms:
        connector_cfg = cfg.connector.replace(form=form)
        connectors[form], history = _fit_connector(connector_cfg, saes, features, folder, f"connectors/{form}")
        feature_mse[form] = heldout_feature_mse(connectors[form], features["in", "test"], features["out", "test"])
        connector_results[form] = {
            "train_curve": history,
            "test_mse_alive": feature_mse[form][alive].mean().item(),
            "large_weights": count_large_weights(connectors[form].weight_matrices(), cfg.weight_threshold),
            "total_weights": sum(w.numel() for w in connectors[form].weight_matrices()),
        }
    folder.lap("train_connectors")

    variance = _feature_variance(features["out", "test"])
    linearity = _linearity(cfg, feature_mse, variance, alive)
    per_feature = _save_per_feature(feature_mse, variance, alive, folder.file("per_feature.safetensors"))
    folder.lap("linearity")

    ce = _cross_entropy(cfg, model, data, tokenizer, split, saes, connectors, site_in, site_out, transcoder)
    folder.lap("cross_entropy")

    shown = _shown_features(cfg, features["out", "train"], feature_mse["linear"], variance, alive)
    relations = _relations(cfg, model, store, tokenizer, data, saes, connectors["linear"], shown, site_in, site_out,
                           folder.path)
    folder.lap("relations")

    summary: dict[str, Any] = {
        "setup": {"model": cfg.model, "layer": cfg.layer, "sites": [site_in, site_out], "store": str(store.path),
                  "corpus": data.source, "context_length": data.context_length,
                  "drop_first_positions": data.drop_first_positions,
                  "tokens": {"train": split.train[1] - split.train[0],
                             "heldout": split.analysis[1] - split.analysis[0],
                             "downstream_contexts": int(split.downstream.shape[0])}},
        "saes": {role: {"n_latents": sae.n_latents, "k": getattr(sae.cfg, "k", None), "training": sae_logs[role],
                        "heldout_fvu": _heldout_fvu(sae, store, site, split.analysis)}
                 for (role, sae), site in zip(saes.items(), (site_in, site_out), strict=True)},
        **({} if transcoder is None else {"transcoder": {
            "n_latents": transcoder.n_latents, "k": transcoder.k, "skip_connection": transcoder.cfg.skip_connection,
            "training": sae_logs["transcoder"], "heldout_fvu": _heldout_fvu(transcoder, store, site_in, split.analysis,
                                                                            target=site_out)}}),
        "connectors": connector_results,
        "linearity": linearity,
        "cross_entropy": ce,
        "relations": relations,
        "files": {"per_feature": str(per_feature),
                  "connectors": {form: str(folder.file(f"connectors/{form}.safetensors")) for form in connectors}},
    }
    summary["figures"] = report_lm.draw_figures(summary, folder.path)
    report_lm.write_report(folder.write_summary(summary, cfg), folder.report_path)
    folder.lap("report")
    return folder.write_summary(summary, cfg)


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


def _linearity(cfg: LMConnectorsConfig, mse: dict[str, Tensor], variance: Tensor, alive: Tensor) -> dict[str, Any]:
    """Fractions of alive output features that are linear: against the mlp connector (the write-up's test), and
    against the best nonlinear connector per feature (an undertrained mlp connector can be worse than the linear
    one, which would call features linear for the wrong reason)."""
    best = torch.stack([m for form, m in mse.items() if form != "linear"]).min(dim=0).values
    absolute = linear_features(mse["linear"], mse["mlp"], cfg.linear_tolerance)[alive]
    relative = linear_features(mse["linear"], mse["mlp"], cfg.linear_tolerance_relative, scale=variance)[alive]
    absolute_best = linear_features(mse["linear"], best, cfg.linear_tolerance)[alive]
    relative_best = linear_features(mse["linear"], best, cfg.linear_tolerance_relative, scale=variance)[alive]
    explained = {form: (1 - (m[alive] / variance[alive].clamp_min(1e-12))).clamp(min=-1).median().item()
                 for form, m in mse.items()}
    return {
        "alive_output_features": int(alive.sum()),
        "fraction_linear_absolute": absolute.float().mean().item(),
        "tolerance_absolute": cfg.linear_tolerance,
        "fraction_linear_relative": relative.float().mean().item(),
        "tolerance_relative_to_variance": cfg.linear_tolerance_relative,
        "fraction_linear_absolute_vs_best_nonlinear": absolute_best.float().mean().item(),
        "fraction_linear_relative_vs_best_nonlinear": relative_best.float().mean().item(),
        "median_variance_explained": explained,
        "median_feature_variance": variance[alive].median().item(),
    }


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


def _fit_connector(cfg: ConnectorConfig, saes: dict[str, SparseAutoencoder], features: dict[tuple[str, str], Latents],
                   folder: RunFolder, stage: str) -> tuple[FeatureConnector, list[dict[str, float]]]:
    """Train one connector, or load it when the folder holds one trained with the same settings and SAEs (a rerun
    then only redoes the cheap analyses)."""
    with seeded(cfg.seed):
        connector = FeatureConnector.from_config(saes["in"].n_latents, saes["out"].n_latents, cfg)

    def fit(current: FeatureConnector) -> list[dict[str, float]]:
        history = train_connector(current, features["in", "train"], features["out", "train"], cfg)
        return [epoch._asdict() for epoch in history]

    request = {"connector": cfg.to_dict(), "saes": {role: sae_fingerprint(sae) for role, sae in saes.items()}}
    return trained_connector(folder, stage, connector, request, fit)


def _save_per_feature(mse: dict[str, Tensor], variance: Tensor, alive: Tensor, path: Path) -> Path:
    """Each output feature's held-out MSE per connector form, its variance and whether it is alive (what the
    linearity test and its figure read)."""
    tensors = {**{f"mse.{form}": m.contiguous() for form, m in mse.items()}, "variance": variance.contiguous(),
               "alive": alive.contiguous()}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp)))
    return path
