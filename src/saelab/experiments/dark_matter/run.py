"""`saelab dark-matter`: "Decomposing The Dark Matter of Sparse Autoencoders" end to end in one run folder.

One harvest pass stores the target hookpoint (default `resid_post.15` of the offline SmolLM2) and the earlier
components that add up to it (the previous residual, this block's attention and MLP outputs), with the first
positions of each context and BOS left out. The store's contexts are split three ways: SAE training tokens, analysis
tokens (every regression is fit on a random part of them and scored on the rest) and a few held-out contexts for
the downstream loss. A width sweep of top-k SAEs at one L0 is trained (or pretrained SAEs are opened, e.g. Gemma
Scope), and experiments (1)-(10) run on it; `summary.json` holds every number and `report.html` every figure and
table. Re-running resumes: the store, every SAE already trained and every experiment already finished with the same
settings (its done-marker) are reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from saelab.activations.harvest import HarvestConfig, open_or_harvest
from saelab.activations.split import StoreSplit, load_half, split_store
from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.data.tokenize import DataConfig
from saelab.errors import ConfigError
from saelab.experiments.dark_matter.error_analysis import component_shares, synthetic_error_test
from saelab.experiments.dark_matter.error_experiments import (
    ROWS,
    ErrorAnalysis,
    FVUScaling,
    PairScaling,
    analyze_errors,
    component_cross_entropy,
    earlier_component_projections,
    error_components,
    evaluate_component_saes,
    fvu_scaling,
    pairwise_scaling,
    pursuit_comparison,
    reconstruct_rows,
)
from saelab.experiments.dark_matter.regression import RegressionConfig
from saelab.experiments.dark_matter.report import write_report
from saelab.models.hookpoints import canonical_hookpoint
from saelab.models.loading import OFFLINE_DEFAULT_MODEL, load_model
from saelab.run_folder import RunFolder
from saelab.saes import SparseAutoencoder
from saelab.saes.self_check import REFERENCE_TOKENS, SELF_CHECK_HELP, self_check
from saelab.saes.shallow import ShallowSAE
from saelab.saes.sources import SOURCE_HELP, open_sae
from saelab.saes.spec import SAESpec
from saelab.training.config import TrainerConfig
from saelab.training.entry import train_on_tensor
from saelab.training.trainer import TrainResult

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


DEFAULT_HOOKPOINT = "resid_post.15"  # of the offline SmolLM2


@dataclasses.dataclass
class DarkMatterConfig(Config):
    """`saelab dark-matter`: the defaults are the write-up's setup scaled to a small model on CPU."""

    out_dir: str = dataclasses.field(default="runs/dark-matter", metadata={"help": "run folder"})
    model: str = dataclasses.field(default=OFFLINE_DEFAULT_MODEL, metadata={"help": "HF name, path or offline default"})
    hookpoint: str | None = dataclasses.field(
        default=None, metadata={"help": f"where the SAEs read (default: the one the pretrained SAEs name, else "
                                        f"{DEFAULT_HOOKPOINT})"}
    )
    earlier_hookpoints: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "experiment 10's earlier components; default for resid_post.L: resid_post.L-1, attn_out.L, "
                          "mlp_out.L (empty: skip experiment 10)"},
    )
    store: str | None = dataclasses.field(
        default=None, metadata={"help": "reuse this store (all hookpoints, this model) instead of harvesting"}
    )
    # Early positions are easier to reconstruct, so they are dropped, as "Decomposing The Dark Matter of Sparse
    # Autoencoders" does: it kept positions >= 200 of 1024-token contexts; here 32 of 256, the same idea at the
    # context length that fits 2 CPU cores. The stored tokens (n_tokens) are split into SAE training, analysis and
    # held-out downstream contexts.
    data: DataConfig = dataclasses.field(
        default_factory=lambda: DataConfig(source="kjv", context_length=256, drop_first_positions=32,
                                           n_tokens=600_000, exclude_special_tokens=True)
    )
    analysis_tokens: int = dataclasses.field(
        default=80_000, metadata={"help": "stored tokens held out of SAE training for the regressions"}
    )
    downstream_contexts: int = dataclasses.field(
        default=16, metadata={"help": "last contexts of the store, held out of everything, for the CE splices (8)"}
    )
    widths: list[int] = dataclasses.field(
        default_factory=lambda: [1024, 2048, 4096, 8192, 16384], metadata={"help": "top-k SAE widths of the sweep"}
    )
    k: int = dataclasses.field(default=32, metadata={"help": "the sweep's fixed L0 (top-k)"})
    pretrained_sae: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": f"pretrained SAEs, each a {SOURCE_HELP} (comma-separated), analysed instead of the sweep"}
    )
    reference_width: int | None = dataclasses.field(
        default=4096,
        metadata={"help": "the SAE of experiments 5, 7 and 10 (and the splice check); None: the sweep's middle"},
    )
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(
            total_tokens=1_200_000, batch_size=1024, warmup_steps=50, auxk_coefficient=1 / 32,
            dead_window_tokens=500_000, checkpoint_every_steps=200, log_every_steps=20,
        )
    )
    aux_sae_tokens: int = dataclasses.field(
        default=500_000, metadata={"help": "training tokens of the error-component (7) and earlier-component (10) SAEs"}
    )
    regression: RegressionConfig = dataclasses.field(default_factory=RegressionConfig)
    pursuit_tokens: int = dataclasses.field(default=16_384, metadata={"help": "analysis tokens for pursuit (9)"})
    synthetic_tokens: int = dataclasses.field(default=16_384, metadata={"help": "analysis tokens for (5)"})
    harvest_batch_size: int = dataclasses.field(default=8, metadata={"help": "contexts per harvest forward"})
    downstream_batch_size: int = dataclasses.field(default=4, metadata={"help": "contexts per CE forward"})
    self_check: bool = dataclasses.field(default=True, metadata={"help": SELF_CHECK_HELP})
    device: str = dataclasses.field(default="cpu", metadata={"help": "device of the model and of pretrained SAEs"})

    def validate(self) -> None:
        if not self.pretrained_sae:
            if not self.widths or len(set(self.widths)) != len(self.widths):
                raise ConfigError(f"widths must be distinct, e.g. --widths 1024,2048,4096 (got {self.widths})")
            if self.reference_width is not None and self.reference_width not in self.widths:
                raise ConfigError(f"reference_width={self.reference_width} is not among the widths {self.widths}")
        for name in ("analysis_tokens", "downstream_contexts", "k", "aux_sae_tokens", "pursuit_tokens",
                     "synthetic_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive (got {getattr(self, name)})")

    def earlier(self) -> list[str]:
        """Experiment 10's earlier components: as given, or the three that add up to resid_post.L."""
        if self.earlier_hookpoints is not None:
            return list(self.earlier_hookpoints)
        kind, _, layer = (self.hookpoint or DEFAULT_HOOKPOINT).partition(".")
        if kind != "resid_post" or not layer.isdigit():
            raise ConfigError(f"name experiment 10's earlier components for {self.hookpoint} with --earlier-hookpoints")
        previous = f"resid_post.{int(layer) - 1}" if int(layer) > 0 else "resid_pre.0"
        return [previous, f"attn_out.{layer}", f"mlp_out.{layer}"]


def _open_store(cfg: DarkMatterConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, hookpoints: list[str],
                out: Path) -> ActivationStore:
    harvest_cfg = HarvestConfig(out_dir=str(out / "activations"), model=cfg.model, hookpoints=hookpoints, data=cfg.data,
                                batch_size=cfg.harvest_batch_size, device=cfg.device, resume=True)
    return open_or_harvest(cfg.store, model, tokenizer, harvest_cfg)


def _spec(width: int, k: int) -> SAESpec:
    return SAESpec(architecture="topk", n_latents=width, k=k, preprocessing="scale")


def _pick_reference(widths: dict[str, int], wanted: int | None) -> str:
    matching = [label for label, width in widths.items() if width == wanted]
    if matching:
        return matching[0]
    ordered = sorted(widths, key=widths.get)
    return ordered[len(ordered) // 2]


def _experiment_markers(cfg: DarkMatterConfig) -> str:
    """The stage prefix of the experiments' done-markers: a digest of every setting but the run folder's path, so a
    rerun with the same settings skips the experiments already finished and one with other settings redoes them
    (the store and the SAEs guard themselves: each records the request it answers)."""
    settings = {key: value for key, value in cfg.to_dict().items() if key != "out_dir"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"experiments/{digest}"


def run(cfg: DarkMatterConfig) -> dict[str, Any]:
    """Harvest (or open) the store, train (or load) the SAEs, run experiments (1)-(10), write `summary.json` and
    `report.html` into `cfg.out_dir`; returns the summary."""
    pretrained = {label: open_sae(source, cfg.device) for label, source in _pretrained_sources(cfg).items()}
    cfg = cfg.replace(hookpoint=_target_hookpoint(cfg, pretrained))
    folder = RunFolder.start(cfg)
    markers = _experiment_markers(cfg)
    target, earlier = cfg.hookpoint, cfg.earlier()

    model, tokenizer = load_model(cfg.model, cfg.device, torch.float32)
    store = _open_store(cfg, model, tokenizer, [*earlier, target], folder.path)
    data = HarvestConfig.from_dict(store.manifest["config"]).data
    split = split_store(store, cfg.analysis_tokens, cfg.downstream_contexts)
    if split.train[1] < cfg.trainer.batch_size:
        raise ConfigError(f"only {split.train[1]} tokens are left to train SAEs on; harvest more tokens")
    folder.lap("load_and_harvest")

    def train(name: str, spec: SAESpec, x: Tensor, trainer: TrainerConfig,
              hookpoint: str | None) -> tuple[SparseAutoencoder, TrainResult]:
        return train_on_tensor(spec, x, trainer, folder.path / "saes" / name, hookpoint=hookpoint,
                               model_name=cfg.model)

    x_train = load_half(store, target, split.train)
    saes, trained, widths = _sweep(cfg, x_train, train, pretrained)
    reference = _pick_reference(widths, cfg.reference_width)
    aux_spec = _spec(widths[reference], cfg.k)
    aux_trainer = cfg.trainer.replace(total_tokens=cfg.aux_sae_tokens)
    folder.lap("sweep_saes")

    x = store.load(target, *split.analysis)
    analyses = {label: analyze_errors(x, reconstruct_rows(sae, x), cfg.regression) for label, sae in saes.items()}
    labels = sorted(analyses, key=widths.get)
    scaling = fvu_scaling([widths[lb] for lb in labels], [analyses[lb].fvu for lb in labels])
    experiments = _sweep_summaries(analyses, labels, scaling, pairwise_scaling(analyses, widths, cfg.regression))
    folder.lap("experiments_1_2_3_4_6")

    # Each experiment's result is its done-marker: a rerun with the same settings reads it instead of redoing it.
    experiments["5_synthetic"] = folder.once(f"{markers}/5_synthetic", partial(
        _synthetic, saes[reference], reference, x[: cfg.synthetic_tokens], cfg.regression))
    folder.lap("experiment_5_synthetic")

    experiments["7_component_saes"] = folder.once(f"{markers}/7_component_saes", partial(
        _component_saes, saes[reference], analyses[reference], x, x_train, aux_spec, aux_trainer, reference, train))
    del x_train
    folder.lap("experiment_7_component_saes")

    experiments["10_earlier_components"] = folder.once(f"{markers}/10_earlier_components", partial(
        _earlier_components, cfg, store, split, earlier, saes[reference], analyses[reference], x, aux_spec,
        aux_trainer, reference, train))
    folder.lap("experiment_10_earlier_components")

    experiments["9_gradient_pursuit"] = folder.once(f"{markers}/9_gradient_pursuit", partial(
        _pursuit, saes, labels, widths, x[: cfg.pursuit_tokens], cfg.regression))
    folder.lap("experiment_9_pursuit")

    experiments["8_downstream_ce"] = folder.once(f"{markers}/8_downstream_ce", partial(
        _downstream, cfg, model, tokenizer, data, split, saes, analyses, x, reference))
    folder.lap("experiment_8_downstream")

    results = {
        "setup": {
            "model": cfg.model, "hookpoint": target, "earlier_hookpoints": earlier, "store": str(store.path),
            "context_length": data.context_length, "drop_first_positions": data.drop_first_positions,
            "exclude_special_tokens": data.exclude_special_tokens, "corpus": data.source,
            "tokens": {"sae_training": split.train[1] - split.train[0],
                       "analysis": split.analysis[1] - split.analysis[0],
                       "downstream_contexts": int(split.downstream.shape[0])},
            "reference": reference,
            "saes": {label: {"width": widths[label], "l0_k": getattr(saes[label].cfg, "k", None),
                             "training": trained[label].final if label in trained else {}} for label in labels},
        },
        "experiments": dict(sorted(experiments.items(), key=lambda item: int(item[0].split("_")[0]))),
    }
    summary = folder.write_summary(results, cfg)
    write_report(summary, folder.path)
    folder.lap("report")
    return folder.write_summary(summary, cfg)


def _synthetic(sae: SparseAutoencoder, reference: str, x: Tensor, regression: RegressionConfig) -> dict[str, Any]:
    """Experiment 5 on the reference SAE."""
    result = synthetic_error_test(sae, x, cfg=regression)
    return {
        "sae": reference, "tokens": x.shape[0], "correlations": result.correlations,
        "estimates": [dataclasses.asdict(e) for e in result.estimates],
        "points": [{"input_noise": p.input_noise, "reconstruction_noise": p.reconstruction_noise,
                    "mask_fraction": p.mask_fraction, "fvu_total": p.fvu.total, "fvu_nonlinear": p.fvu.nonlinear}
                   for p in result.points],
    }


TrainFn = Callable[[str, SAESpec, Tensor, TrainerConfig, str | None], tuple[SparseAutoencoder, TrainResult]]


def _pretrained_sources(cfg: DarkMatterConfig) -> dict[str, str]:
    """{label: source} of the pretrained SAEs: each labelled by its folder's name, or by the whole source when two
    names clash."""
    names = [Path(source).name for source in cfg.pretrained_sae]
    labels = names if len(set(names)) == len(names) else list(cfg.pretrained_sae)
    return dict(zip(labels, cfg.pretrained_sae, strict=True))


def _target_hookpoint(cfg: DarkMatterConfig, pretrained: dict[str, SparseAutoencoder]) -> str:
    """The hookpoint given (in any accepted spelling), else the one every pretrained SAE names, else the default."""
    if cfg.hookpoint:
        return canonical_hookpoint(cfg.hookpoint)
    named = {canonical_hookpoint(sae.cfg.hookpoint) for sae in pretrained.values() if sae.cfg.hookpoint}
    return named.pop() if len(named) == 1 else DEFAULT_HOOKPOINT


def _sweep(cfg: DarkMatterConfig, x_train: Tensor, train: TrainFn, pretrained: dict[str, SparseAutoencoder]
           ) -> tuple[dict[str, SparseAutoencoder], dict[str, TrainResult], dict[str, int]]:
    """(SAEs, training results, widths), keyed by label: the trained top-k sweep (one `train` per width) or the
    given pretrained SAEs (which have no training results), self-checked on the first training tokens."""
    if pretrained:
        sources, saes = _pretrained_sources(cfg), pretrained
        wrong = {label: (sae.cfg.hookpoint, sae.d_in) for label, sae in saes.items()
                 if canonical_hookpoint(sae.cfg.hookpoint or cfg.hookpoint) != cfg.hookpoint
                 or sae.d_in != x_train.shape[1]}
        if wrong:
            raise ConfigError(f"pretrained SAEs {wrong} (hookpoint, d_in) do not read {cfg.hookpoint} of width "
                              f"{x_train.shape[1]}; pass the --hookpoint and --model they were trained on")
        if cfg.self_check:
            for label, sae in saes.items():
                self_check(sae, x_train[:REFERENCE_TOKENS], source=sources[label], hookpoint=cfg.hookpoint)
        return saes, {}, {label: sae.n_latents for label, sae in saes.items()}
    saes, trained = {}, {}
    for width in cfg.widths:
        label = str(width)
        saes[label], trained[label] = train(f"{cfg.hookpoint}-w{width}", _spec(width, cfg.k), x_train, cfg.trainer,
                                            cfg.hookpoint)
    return saes, trained, {str(width): width for width in cfg.widths}


def _sweep_summaries(analyses: dict[str, ErrorAnalysis], labels: list[str], scaling: FVUScaling,
                     pairs: list[PairScaling]) -> dict[str, Any]:
    return {
        "1_error_norm_probe": {label: analyses[label].norm_probe_r2 for label in labels},
        "2_error_vector_transform": {label: {"r2": analyses[label].vector_r2, "fvu": analyses[label].vector_fvu}
                                     for label in labels},
        "3_nonlinear_fvu": {"per_sae": {label: {"total": analyses[label].fvu.total,
                                                "linear": analyses[label].fvu.linear,
                                                "nonlinear": analyses[label].fvu.nonlinear} for label in labels},
                            "scaling": scaling.summary()},
        "4_per_token_scaling": [pair.summary() for pair in pairs],
        "6_norm_prediction": {label: analyses[label].norm_prediction for label in labels},
    }


def _component_saes(sae: SparseAutoencoder, analysis: ErrorAnalysis, x: Tensor, x_train: Tensor, spec: SAESpec,
                    trainer: TrainerConfig, reference: str, train: TrainFn) -> dict[str, Any]:
    """Experiment 7: SAEs trained on the reference SAE's linear and nonlinear error over the training tokens
    (computed from x with experiment 2's fit), scored on the held-out analysis tokens."""
    linear, nonlinear = [], []
    for chunk in x_train.split(8 * ROWS):
        split = error_components(sae, analysis.fit, chunk.float())
        linear.append(split.linear.half())
        nonlinear.append(split.nonlinear.half())
    training = {"linear": torch.cat(linear), "nonlinear": torch.cat(nonlinear)}
    del linear, nonlinear
    saes, trained = {}, {}
    for name, tensor in training.items():
        saes[name], trained[name] = train(f"{reference}-{name}-error", spec, tensor, trainer, None)
    heldout = error_components(sae, analysis.fit, x[analysis.test_idx])
    scores = evaluate_component_saes(saes, {"linear": heldout.linear, "nonlinear": heldout.nonlinear})
    return {
        "sae": reference, "width": spec.n_latents, "k": spec.k, "training_tokens": trainer.total_tokens,
        "heldout": scores,
        "curves": {name: {"tokens": result.curves.get("tokens", []), "fvu": result.curves.get("fvu", [])}
                   for name, result in trained.items()},
    }


def _earlier_components(cfg: DarkMatterConfig, store: ActivationStore, split: StoreSplit, earlier: list[str],
                        sae: SparseAutoencoder, analysis: ErrorAnalysis, x: Tensor, spec: SAESpec,
                        trainer: TrainerConfig, reference: str, train: TrainFn) -> dict[str, Any]:
    """Experiment 10: SAEs trained on each earlier component, then projections from each source to the
    reference SAE's components."""
    if not earlier:
        return {"skipped": "no earlier hookpoints were given"}
    saes, trained = {}, {}
    for hookpoint in earlier:
        saes[hookpoint], trained[hookpoint] = train(f"{hookpoint}-w{spec.n_latents}", spec,
                                                    load_half(store, hookpoint, split.train), trainer, hookpoint)
    parts = error_components(sae, analysis.fit, x)
    targets = {"sae(x)": parts.reconstruction, "error": x - parts.reconstruction, "linear error": parts.linear,
               "nonlinear error": parts.nonlinear}
    sources = {hookpoint: store.load(hookpoint, *split.analysis) for hookpoint in earlier}
    return {
        "sae": reference, "width": spec.n_latents, "training_tokens": trainer.total_tokens,
        "r2": earlier_component_projections(sources, saes, targets, cfg.regression),
        "earlier_saes": {hookpoint: result.final for hookpoint, result in trained.items()},
    }


def _pursuit(saes: dict[str, SparseAutoencoder], labels: list[str], widths: dict[str, int], x: Tensor,
             regression: RegressionConfig) -> dict[str, Any]:
    shallow = [label for label in labels if isinstance(saes[label], ShallowSAE)]
    results = {label: pursuit_comparison(saes[label], x, regression) for label in shallow}
    sweep = [widths[label] for label in shallow]
    return {
        "tokens": x.shape[0],
        "per_sae": {label: result.summary() for label, result in results.items()},
        "scaling_sae": fvu_scaling(sweep, [results[label].sae for label in shallow]).summary(),
        "scaling_pursuit": fvu_scaling(sweep, [results[label].pursuit for label in shallow]).summary(),
    }


def _downstream(cfg: DarkMatterConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
                split: StoreSplit, saes: dict[str, SparseAutoencoder], analyses: dict[str, ErrorAnalysis], x: Tensor,
                reference: str) -> dict[str, Any]:
    """Experiment 8: CE with each component spliced in, next to each component's share of the error norm and of
    the variance (measured on the held-out analysis tokens)."""
    excluded = tokenizer.all_special_ids if data.exclude_special_tokens else ()
    ce = component_cross_entropy(
        model, cfg.hookpoint, split.downstream, {label: (sae, analyses[label].fit) for label, sae in saes.items()},
        reassembled={reference}, batch_size=cfg.downstream_batch_size, drop_first=data.drop_first_positions,
        exclude_token_ids=excluded, progress=True,
    )
    results = {}
    for label, sae in saes.items():
        heldout = x[analyses[label].test_idx]
        parts = error_components(sae, analyses[label].fit, heldout)
        shares = component_shares(heldout, parts.reconstruction, {"linear": parts.linear,
                                                                  "nonlinear": parts.nonlinear})
        results[label] = {**ce[label].summary(), "norm_share": shares.norm, "variance_share": shares.variance}
    return results
