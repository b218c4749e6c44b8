"""`saelab multilayer`: the "Multi-layer SAEs" experiment end to end in one run folder.

Default: the offline SmolLM2-135M, `resid_post` of every 6th layer (0, 6, 12, 18, 24: 5 x 576 = 2,880 features,
so that training fits in about half an hour on two CPU cores), per-layer normalisation, 8,192 latents, k = 128,
300k training tokens over a 200k-token store of the KJV text. The write-up's setting, Pythia-70M with all 6 layers,
is `--model EleutherAI/pythia-70m --layers 0,1,2,3,4,5` (its dictionary had 24,576 latents: `--sae.n-latents
24576`).

Steps: tokenise training and held-out contexts (the held-out ones follow the training ones); harvest the chosen
layers in one forward pass per batch (or reuse `--store`); train the SAE (or analyse `--sae-dir`); evaluate total
and per-layer FVU on held-out tokens; run every analysis of `saelab.experiments.multilayer.analysis`; write
`summary.json` and `report.html`. Re-running the same command in the same folder reuses the stores and continues
training from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.activations.harvest import HarvestConfig
from saelab.activations.heldout import harvest_with_heldout
from saelab.activations.normalize import estimate_norm_stats
from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.data.tokenize import DataConfig, context_mask
from saelab.errors import ConfigError
from saelab.evaluation import check_on_store, evaluate_reconstruction
from saelab.experiments.multilayer.analysis import activation_rates, decoder_cosines, information_flow, trigger_layers
from saelab.experiments.multilayer.report import write_figures, write_report
from saelab.interp.examples import TokenText
from saelab.interp.feature_data import FeatureDataConfig
from saelab.models.hookpoints import num_layers
from saelab.models.loading import OFFLINE_DEFAULT_MODEL, load_model
from saelab.report.run_features import summary_of, write_run_features
from saelab.run_folder import RunFolder
from saelab.saes import MultiLayerSAE, MultiLayerSAEConfig
from saelab.saes.initialization import seeded
from saelab.saes.multilayer import NORMALIZATIONS, layer_hookpoints, select_layers
from saelab.saes.self_check import SELF_CHECK_HELP
from saelab.saes.sources import SOURCE_HELP, open_sae
from saelab.training.config import TrainerConfig
from saelab.training.entry import describe_store, train
from saelab.training.trainer import TrainResult

log = logging.getLogger(__name__)

GLOBAL_SCALE_TOKENS = 16_384  # tokens of the first shard the "global" scale is estimated on
# The numbers of the write-up "Multi-layer SAEs" (Pythia-70M, 6 layers x 512, 24,576 latents, k = 128), for the
# report's comparison.
WRITE_UP = {
    "fvu": "about 0.10 (the code's FVU: mean over dimensions of per-dimension ratios)",
    "bucket_counts_by_encoder": "2428 / 163 / 183 / 38 / 338 / 15 of 3165 active latents (layers 0-5)",
    "decoder_cosine_adjacent": "0.46-0.53 (100 most active latents)",
    "decoder_cosine_first_last": "about 0.13 (layer 0 vs 5)",
    "flow_cosine_adjacent": "0.30-0.44",
    "flow_strength_adjacent": "0.52-0.87",
}


@dataclasses.dataclass
class MultiLayerSpec(Config):
    n_latents: int = dataclasses.field(default=8_192, metadata={"help": "dictionary size"})
    k: int = dataclasses.field(default=128, metadata={"help": "active latents per token"})
    encoder_init_scale: float | None = dataclasses.field(
        default=0.2, metadata={"help": "c of the encoder-scaling init (None: off)"}
    )
    post_act_bias: bool = dataclasses.field(default=False, metadata={"help": "learned per-latent bias on firing"})


@dataclasses.dataclass
class FlowSettings(Config):
    contexts: int = dataclasses.field(default=32, metadata={"help": "held-out contexts searched for firing tokens"})
    context_length: int = dataclasses.field(default=64, metadata={"help": "tokens of each context used"})
    latents_per_bucket: int = dataclasses.field(default=4, metadata={"help": "most active latents per bucket"})
    tokens_per_latent: int = dataclasses.field(default=8, metadata={"help": "random firing tokens per latent"})
    rows_per_pass: int = dataclasses.field(default=16, metadata={"help": "perturbed copies per block pass"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the firing tokens drawn per latent"})

    def validate(self) -> None:
        if min(self.contexts, self.latents_per_bucket, self.tokens_per_latent, self.rows_per_pass) < 1:
            raise ConfigError("flow.contexts, latents_per_bucket, tokens_per_latent and rows_per_pass must be >= 1")
        if self.context_length < 2:
            raise ConfigError(f"flow.context_length must be at least 2 (got {self.context_length})")


@dataclasses.dataclass
class MultiLayerConfig(Config):
    out_dir: str = dataclasses.field(default="runs/multilayer", metadata={"help": "run folder"})
    model: str = dataclasses.field(default=OFFLINE_DEFAULT_MODEL, metadata={"help": "HF name, path or offline default"})
    layers: list[int] = dataclasses.field(
        default_factory=list, metadata={"help": "sorted layer list, e.g. 0,1,2; empty: every layer-stride-th"}
    )
    layer_stride: int = dataclasses.field(default=6, metadata={"help": "every k-th layer from 0 (1 = all)"})
    normalization: str = dataclasses.field(default="per_layer", metadata={"help": "per_layer | global | none"})
    store: str | None = dataclasses.field(
        default=None,
        metadata={"help": "reuse this training store instead of harvesting (its data settings replace --data)"},
    )
    sae_dir: str | None = dataclasses.field(
        default=None, metadata={"help": f"analyse this trained multilayer SAE ({SOURCE_HELP})"}
    )
    self_check: bool = dataclasses.field(default=True, metadata={"help": SELF_CHECK_HELP + " (with --sae-dir)"})
    # Defaults sized for the 2-core CPU (about 20-25 min for SmolLM2's 5 layers); the write-up used 24,576 latents.
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(source="kjv", n_tokens=200_000))
    eval_tokens: int = dataclasses.field(default=32_768, metadata={"help": "held-out tokens for FVU and rates"})
    harvest_batch_size: int = dataclasses.field(default=16, metadata={"help": "contexts per harvest forward pass"})
    shard_tokens: int = dataclasses.field(default=32_768, metadata={"help": "tokens per store shard"})
    sae: MultiLayerSpec = dataclasses.field(default_factory=MultiLayerSpec)
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(total_tokens=300_000, batch_size=2048, lr=1e-3, warmup_steps=50,
                                              dead_window_tokens=500_000, checkpoint_every_steps=100)
    )
    cosine_top_n: int = dataclasses.field(default=100, metadata={"help": "most active latents for decoder cosines"})
    flow: FlowSettings = dataclasses.field(default_factory=FlowSettings)
    feature_tokens: int = dataclasses.field(
        default=32_768, metadata={"help": "held-out tokens recorded for the feature browser (0: no browser)"}
    )
    features: FeatureDataConfig = dataclasses.field(default_factory=FeatureDataConfig)
    device: str = dataclasses.field(default="cpu", metadata={"help": "device the model and the SAE run on"})

    def validate(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization={self.normalization!r} is unknown; use one of {list(NORMALIZATIONS)}")
        if self.eval_tokens < 1 or self.cosine_top_n < 1 or self.layer_stride < 1:
            raise ConfigError("eval_tokens, cosine_top_n and layer_stride must be at least 1")


def run(cfg: MultiLayerConfig) -> dict[str, Any]:
    folder = RunFolder.start(cfg)

    model, tokenizer = load_model(cfg.model, cfg.device, torch.float32)
    layers = select_layers(num_layers(model), cfg.layers, cfg.layer_stride)
    hookpoints = layer_hookpoints(layers)
    trained = None if cfg.sae_dir is None else load_trained(cfg, hookpoints)
    folder.lap("load_model")
    harvest_cfg = HarvestConfig(out_dir=str(folder.path / "activations"), model=cfg.model, hookpoints=hookpoints,
                                data=cfg.data, batch_size=cfg.harvest_batch_size, shard_tokens=cfg.shard_tokens,
                                device=cfg.device)
    split = harvest_with_heldout(model, tokenizer, harvest_cfg, eval_tokens=cfg.eval_tokens,
                                 heldout_contexts=cfg.flow.contexts, store=cfg.store, harvest_train=trained is None)
    eval_store = split.eval_store
    folder.lap("harvest")
    if trained is not None:
        trained.check_input(hookpoints, widths=eval_store.dims)
        check_on_store(trained, eval_store, hookpoints, str(cfg.sae_dir), cfg.self_check)
        sae, training = trained, None
    else:
        sae, training = train_multilayer(cfg, split.train_store, layers, folder.path / "train")
    folder.lap("train")

    metrics = evaluate_reconstruction(sae, _store_batches(eval_store, hookpoints), slices=sae.slices)
    metrics["per_layer_fvu"] = dict(zip(map(str, layers), metrics.pop("per_slice_fvu"), strict=True))
    rates = activation_rates(sae, _store_batches(eval_store, hookpoints))
    folder.lap("evaluate")
    features = None
    if cfg.feature_tokens > 0:
        index_path, features = write_run_features(
            sae, eval_store, hookpoints, folder.path, TokenText(tokenizer), cfg=cfg.features,
            max_tokens=cfg.feature_tokens, title=f"saelab multilayer: one SAE over layers {layers} of {cfg.model}",
            notes=["Recorded on held-out tokens. Each latent's panel shows the norm of its encoder and decoder in "
                   "every layer (the banding picture, one latent at a time)."])
        folder.lap("features")

    triggers = trigger_layers(sae, rates)
    buckets = {layer: triggers.bucket(i) for i, layer in enumerate(layers)}
    cosines = {"all": decoder_cosines(sae, rates.most_active(cfg.cosine_top_n))}
    for layer, mask in buckets.items():
        if mask.any():
            cosines[f"trigger layer {layer}"] = decoder_cosines(sae, rates.most_active(cfg.cosine_top_n, mask))
    folder.lap("banding_and_cosines")

    flow_ids = split.contexts[: cfg.flow.contexts, : cfg.flow.context_length]
    studied = {layer: rates.most_active(cfg.flow.latents_per_bucket, mask) for layer, mask in buckets.items()}
    flow_latents = torch.cat(list(studied.values()))
    flow = information_flow(model, sae, flow_ids, flow_latents, context_mask(split.data, tokenizer, flow_ids),
                            tokens_per_latent=cfg.flow.tokens_per_latent, rows_per_pass=cfg.flow.rows_per_pass,
                            seed=cfg.flow.seed, progress=True)
    flow_stats = {"all": flow.summary()}
    for layer, ids in studied.items():
        if ids.numel() and bool(torch.isin(flow.latent, ids).any()):
            flow_stats[f"trigger layer {layer}"] = flow.summary(ids)
    folder.lap("information_flow")

    summary = {
        "fvu": metrics["fvu"],
        "per_layer_fvu": metrics["per_layer_fvu"],
        "metrics": metrics,
        "activation": {"n_tokens": rates.n_tokens, "n_active": int(rates.active.sum()),
                       "n_dead": int((~rates.active).sum())},
        "triggers": triggers.to_dict(),
        "decoder_cosines": {name: stats.to_dict() for name, stats in cosines.items()},
        "information_flow": {name: {q: s.to_dict() for q, s in stats.items()} for name, stats in flow_stats.items()},
        "flow_latents": {str(layer): ids.tolist() for layer, ids in studied.items()},
        "flow_rows": int(flow.latent.numel()),
        "sae": {"n_latents": sae.n_latents, "k": sae.k, "layers": layers, "d_in": sae.d_in,
                "normalization": sae.cfg.normalization, "layer_scales": sae.cfg.layer_scales,
                "folder": str(training.sae_dir) if training else cfg.sae_dir},
        "train": None if training is None else {"tokens": training.tokens_seen, "steps": training.steps,
                                                "completed": training.completed, "final": training.final},
        "stores": {"eval_tokens": eval_store.n_tokens},
        "write_up": WRITE_UP,
    }
    if features is not None:
        summary["features"] = summary_of(features, index_path, folder.path)
    summary = folder.write_summary(summary, cfg)  # the results survive a failing report
    records = None if training is None else training.records
    figures = write_figures(folder.path / "figures", records, rates, triggers, cosines, flow_stats)
    write_report(summary, cosines, flow_stats, figures, folder.report_path, features)
    folder.lap("report")
    log.info("multilayer finished: FVU %.4f, per layer %s", metrics["fvu"], metrics["per_layer_fvu"])
    return folder.write_summary(summary, cfg)


def layer_scales(store: ActivationStore, hookpoints: list[str], normalization: str) -> list[float]:
    """One multiplier per layer: each layer's own E||x_l|| = sqrt(d_l) scale, one E||x|| = sqrt(D) scale for the
    concatenation (estimated on the first GLOBAL_SCALE_TOKENS tokens), or 1."""
    if normalization == "per_layer":
        return [store.norm_stats(hp).scale for hp in hookpoints]
    if normalization == "global":
        sample = store.load(hookpoints, 0, min(GLOBAL_SCALE_TOKENS, store.n_tokens))
        return [estimate_norm_stats(sample).scale] * len(hookpoints)
    return [1.0] * len(hookpoints)


def build_sae(cfg: MultiLayerConfig, store: ActivationStore, layers: list[int]) -> MultiLayerSAE:
    """A fresh SAE over `layers` of the store, its per-layer scales taken from the store (build it under `seeded`
    for reproducible initial weights)."""
    hookpoints = layer_hookpoints(layers)
    widths = [store.dims[hp] for hp in hookpoints]
    sae_cfg = MultiLayerSAEConfig(
        d_in=sum(widths), n_latents=cfg.sae.n_latents, k=cfg.sae.k, model_name=store.model_name, layers=layers,
        hookpoints=hookpoints, slice_widths=widths, normalization=cfg.normalization,
        layer_scales=layer_scales(store, hookpoints, cfg.normalization),
        encoder_init_scale=cfg.sae.encoder_init_scale, post_act_bias=cfg.sae.post_act_bias,
    )
    sae_cfg.validate()
    return MultiLayerSAE(sae_cfg)


def train_multilayer(cfg: MultiLayerConfig, store: ActivationStore, layers: list[int], out_dir: Path
                     ) -> tuple[MultiLayerSAE, TrainResult]:
    """A fresh SAE over `layers` (initial weights from `cfg.trainer.seed`), trained on the store's raw activations:
    the SAE applies its own per-layer scales, so reconstruct() maps raw to raw."""
    hookpoints = layer_hookpoints(layers)
    with seeded(cfg.trainer.seed):
        sae = build_sae(cfg, store, layers)
    batches = store.batches(hookpoints, cfg.trainer.batch_size, shuffle=True, seed=cfg.trainer.seed, epochs=None)
    return sae, train(sae, batches, cfg.trainer, out_dir, data=describe_store(store, hookpoints, cfg.trainer.seed))


def load_trained(cfg: MultiLayerConfig, hookpoints: list[str]) -> MultiLayerSAE:
    """The SAE of `cfg.sae_dir`, checked to read `hookpoints` normalised the `cfg.normalization` way."""
    sae = open_sae(cfg.sae_dir, device=cfg.device)
    if not isinstance(sae, MultiLayerSAE):
        raise ConfigError(f"{cfg.sae_dir} holds a {sae.architecture!r} SAE; this experiment analyses multilayer SAEs")
    sae.check_input(hookpoints, cfg.normalization)
    return sae


def _store_batches(store: ActivationStore, hookpoints: list[str], batch_size: int = 4096) -> Iterator[Tensor]:
    for start in range(0, store.n_tokens, batch_size):
        yield store.load(hookpoints, start, min(start + batch_size, store.n_tokens))
