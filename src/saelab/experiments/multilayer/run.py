"""`saelab multilayer`: the multi-layer SAE experiment (seed 002) end to end in one run folder.

Default: the offline SmolLM2-135M, `resid_post` of every 6th layer (0, 6, 12, 18, 24: 5 x 576 = 2,880 features,
so that training fits in about half an hour on two CPU cores), per-layer normalisation, 16,384 latents, k = 128,
1.5M training tokens over a 400k-token store of the KJV text. The write-up's setting, Pythia-70M with all 6 layers,
is `--model EleutherAI/pythia-70m --layers 0,1,2,3,4,5` (its dictionary had 24,576 latents: `--sae.n-latents
24576`).

Steps: tokenise training and held-out contexts; harvest the chosen layers in one forward pass per batch (or reuse
`--store`); train the SAE (or analyse `--sae-dir`); evaluate total and per-layer FVU on held-out tokens; run every
analysis of `saelab.experiments.multilayer.analysis`; write `multilayer.json` and `report.html`. Re-running the same command
in the same folder reuses the stores and continues training from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.activations.normalize import estimate_norm_stats
from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.data.tokenize import DataConfig, build_contexts, context_mask
from saelab.errors import ConfigError
from saelab.evaluation import evaluate_reconstruction
from saelab.experiments.multilayer.analysis import (
    ActivationRates,
    LayerPairStats,
    TriggerLayers,
    activation_rates,
    banding,
    decoder_cosines,
    information_flow,
    plot_activation_rates,
    plot_banding,
    plot_bucket_counts,
    plot_by_gap,
    plot_decoder_cosines,
    plot_flow,
    trigger_layers,
)
from saelab.io import atomic_write_json
from saelab.models.hookpoints import num_layers
from saelab.models.loading import OFFLINE_DEFAULT_MODEL, load_model
from saelab.provenance import provenance
from saelab.report.html import Report
from saelab.report.plots import plot_training_curves
from saelab.run_folder import Stopwatch
from saelab.saes import MultiLayerSAE, MultiLayerSAEConfig, load_sae
from saelab.saes.multilayer import NORMALIZATIONS, layer_hookpoints, select_layers
from saelab.training.config import TrainerConfig
from saelab.training.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

GLOBAL_SCALE_TOKENS = 16_384  # tokens of the first shard the "global" scale is estimated on
# Seed 002's numbers (Pythia-70M, 6 layers x 512, 24,576 latents, k = 128), for the report's comparison.
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
    seed: int = 0

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
        default=None, metadata={"help": "reuse this training store (harvested from --data) instead of harvesting"}
    )
    sae_dir: str | None = dataclasses.field(default=None, metadata={"help": "analyse this trained multilayer SAE"})
    # Defaults sized for the 2-core CPU (about 20-25 min for SmolLM2's 5 layers); the write-up used 24,576 latents.
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(source="kjv", n_tokens=200_000))
    eval_tokens: int = dataclasses.field(default=32_768, metadata={"help": "held-out tokens for FVU and rates"})
    harvest_batch_size: int = dataclasses.field(default=16, metadata={"help": "contexts per harvest forward"})
    shard_tokens: int = dataclasses.field(default=32_768, metadata={"help": "tokens per store shard"})
    sae: MultiLayerSpec = dataclasses.field(default_factory=MultiLayerSpec)
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(total_tokens=300_000, batch_size=2048, lr=1e-3, warmup_steps=50,
                                              dead_window_tokens=500_000, checkpoint_every_steps=100)
    )
    cosine_top_n: int = dataclasses.field(default=100, metadata={"help": "most active latents for decoder cosines"})
    flow: FlowSettings = dataclasses.field(default_factory=FlowSettings)
    device: str = "cpu"

    def validate(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization={self.normalization!r} is unknown; use one of {list(NORMALIZATIONS)}")
        if self.eval_tokens < 1 or self.cosine_top_n < 1 or self.layer_stride < 1:
            raise ConfigError("eval_tokens, cosine_top_n and layer_stride must be at least 1")


CONFIG = MultiLayerConfig


def run(cfg: MultiLayerConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    cfg.save(out / "multilayer_config.json")
    watch = Stopwatch()
    lap, timings = watch.lap, watch.seconds

    model, tokenizer = load_model(cfg.model, cfg.device, torch.float32)
    layers = select_layers(num_layers(model), cfg.layers, cfg.layer_stride)
    hookpoints = layer_hookpoints(layers)
    trained = None if cfg.sae_dir is None else load_trained(cfg, hookpoints)
    lap("load_model")
    n_eval = max(-(-cfg.eval_tokens // (cfg.data.context_length - 1)), cfg.flow.contexts)
    all_data = dataclasses.replace(cfg.data, n_tokens=cfg.data.n_tokens + n_eval * cfg.data.context_length)
    contexts = build_contexts(all_data, tokenizer, show_progress=True)
    train_contexts, eval_contexts = contexts[:-n_eval], contexts[-n_eval:]
    lap("tokenize")

    def harvest_into(folder: str, ids: Tensor) -> ActivationStore:
        harvest_cfg = HarvestConfig(out_dir=str(out / folder), model=cfg.model, hookpoints=hookpoints, data=cfg.data,
                                    batch_size=cfg.harvest_batch_size, shard_tokens=cfg.shard_tokens,
                                    device=cfg.device, resume=True)
        return harvest(model, tokenizer, ids, harvest_cfg)

    eval_store = harvest_into("activations/eval", eval_contexts)
    lap("harvest_eval")
    if trained is not None:
        trained.check_input(hookpoints, widths=eval_store.dims)
        sae, training = trained, None
    else:
        train_store = ActivationStore(cfg.store) if cfg.store else harvest_into("activations/train", train_contexts)
        check_training_store(cfg, train_store, hookpoints)
        lap("harvest_train")
        sae, training = train(cfg, train_store, layers, out / "train")
    lap("train")

    metrics = evaluate_reconstruction(sae, _store_batches(eval_store, hookpoints), slices=sae.slices)
    metrics["per_layer_fvu"] = dict(zip(map(str, layers), metrics.pop("per_slice_fvu"), strict=True))
    rates = activation_rates(sae, _store_batches(eval_store, hookpoints))
    lap("evaluate")

    triggers = trigger_layers(sae, rates)
    buckets = {layer: triggers.bucket(i) for i, layer in enumerate(layers)}
    cosines = {"all": decoder_cosines(sae, rates.most_active(cfg.cosine_top_n))}
    for layer, mask in buckets.items():
        if mask.any():
            cosines[f"trigger layer {layer}"] = decoder_cosines(sae, rates.most_active(cfg.cosine_top_n, mask))
    lap("banding_and_cosines")

    flow_ids = eval_contexts[: cfg.flow.contexts, : cfg.flow.context_length]
    studied = {layer: rates.most_active(cfg.flow.latents_per_bucket, mask) for layer, mask in buckets.items()}
    flow_latents = torch.cat(list(studied.values()))
    flow = information_flow(model, sae, flow_ids, flow_latents, context_mask(cfg.data, tokenizer, flow_ids),
                            tokens_per_latent=cfg.flow.tokens_per_latent, rows_per_pass=cfg.flow.rows_per_pass,
                            seed=cfg.flow.seed, progress=True)
    flow_stats = {"all": flow.summary()}
    for layer, ids in studied.items():
        if ids.numel() and bool(torch.isin(flow.latent, ids).any()):
            flow_stats[f"trigger layer {layer}"] = flow.summary(ids)
    lap("information_flow")

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
        "timings_s": timings,
        "config": cfg.to_dict(),
        "provenance": provenance(),
    }
    figures = write_figures(out / "figures", training, rates, triggers, cosines, flow_stats)
    write_report(summary, cosines, flow_stats, figures, out / "report.html")
    lap("report")
    atomic_write_json(out / "multilayer.json", {**summary, "timings_s": timings})
    log.info("multilayer finished: FVU %.4f, per layer %s", metrics["fvu"], metrics["per_layer_fvu"])
    return summary


def layer_scales(store: ActivationStore, hookpoints: list[str], normalization: str) -> list[float]:
    """One multiplier per layer: each layer's own E||x_l|| = sqrt(d_l) scale, one E||x|| = sqrt(D) scale for the
    concatenation (estimated on the first GLOBAL_SCALE_TOKENS tokens), or 1."""
    if normalization == "per_layer":
        return [store.norm_stats(hp).scale for hp in hookpoints]
    if normalization == "global":
        sample = store.load(hookpoints, 0, min(GLOBAL_SCALE_TOKENS, store.n_tokens))
        return [estimate_norm_stats(sample).scale] * len(hookpoints)
    return [1.0] * len(hookpoints)


def check_training_store(cfg: MultiLayerConfig, store: ActivationStore, hookpoints: list[str]) -> None:
    """The store must hold the layers and come from `cfg.data` (so the held-out contexts are really held out)."""
    store.layer_slices(hookpoints)  # raises StoreError naming any missing hookpoint
    if store.model_name != cfg.model:
        raise ConfigError(f"store {store.path} holds activations of {store.model_name!r}, not of {cfg.model!r}")
    harvested = store.manifest["config"].get("data")
    if harvested != cfg.data.to_dict():
        raise ConfigError(
            f"store {store.path} was harvested with data settings {harvested}, not {cfg.data.to_dict()}; pass the "
            "data settings it was harvested with (the held-out contexts follow the training ones)"
        )


def build_sae(cfg: MultiLayerConfig, store: ActivationStore, layers: list[int]) -> MultiLayerSAE:
    """A fresh SAE over `layers` of the store, its per-layer scales taken from the store."""
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


def train(cfg: MultiLayerConfig, store: ActivationStore, layers: list[int], out: Path) -> tuple[MultiLayerSAE,
                                                                                                TrainResult]:
    hookpoints = layer_hookpoints(layers)
    trainer = Trainer(build_sae(cfg, store, layers), cfg.trainer, out)
    trainer.restore()
    # Raw activations: the SAE applies its own per-layer scales, so reconstruct() maps raw to raw.
    batches = store.batches(hookpoints, cfg.trainer.batch_size, shuffle=True, seed=cfg.trainer.seed, epochs=None)
    return trainer.sae, trainer.fit(batches)


def load_trained(cfg: MultiLayerConfig, hookpoints: list[str]) -> MultiLayerSAE:
    """The SAE of `cfg.sae_dir`, checked to read `hookpoints` normalised the `cfg.normalization` way."""
    sae = load_sae(cfg.sae_dir, device=cfg.device)
    if not isinstance(sae, MultiLayerSAE):
        raise ConfigError(f"{cfg.sae_dir} holds a {sae.architecture!r} SAE; this recipe analyses multilayer SAEs")
    sae.check_input(hookpoints, cfg.normalization)
    return sae


def _store_batches(store: ActivationStore, hookpoints: list[str], batch_size: int = 4096) -> Iterator[Tensor]:
    for start in range(0, store.n_tokens, batch_size):
        yield store.load(hookpoints, start, min(start + batch_size, store.n_tokens))


def write_figures(folder: Path, training: TrainResult | None, rates: ActivationRates, triggers: TriggerLayers,
                  cosines: dict[str, LayerPairStats], flow: dict[str, dict[str, LayerPairStats]]) -> dict[str, Path]:
    figures: dict[str, Path] = {}
    if training is not None:
        records = [json.loads(line) for line in training.metrics_path.read_text().splitlines() if line.strip()]
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
                 flow: dict[str, dict[str, LayerPairStats]], figures: dict[str, Path], path: Path) -> Path:
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
    report.key_values({"fvu (pooled, normalised space)": metrics["fvu"], "fvu_raw": metrics["fvu_raw"],
                       "l0": metrics["l0"], "dead_fraction (never fired on held-out tokens)": metrics["dead_fraction"]})
    report.table([{"layer": layer, "fvu": fvu} for layer, fvu in summary["per_layer_fvu"].items()],
                 caption="FVU per layer; the total is their mean weighted by each layer's variance")
    if "training" in figures:
        report.figure(figures["training"], "training curves")
    report.heading("Activation rates")
    report.key_values(summary["activation"])
    report.figure(figures["rates"], "per-latent activation rate on the held-out tokens (latents that fired)")
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
    report.heading("Compared with the write-up (Pythia-70M, 6 layers)")
    report.table(_comparison(summary), caption="write-up figures from seed 002; this run's in the right column")
    report.heading("Timings (s)")
    report.key_values(summary["timings_s"])
    report.heading("Config and provenance")
    report.code({"config": summary["config"], "provenance": summary["provenance"], "sae": sae})
    return report.write(path)


def _comparison(summary: dict[str, Any]) -> list[dict[str, Any]]:
    cos = summary["decoder_cosines"]["all"]
    flow = summary["information_flow"]["all"]

    def span(values: list[float | None]) -> str:
        present = [v for v in values if v is not None]
        return f"{min(present):.2f}-{max(present):.2f}" if present else "n/a"

    ours = {
        "fvu": f"{summary['fvu']:.4f} (pooled); per layer {[round(v, 3) for v in summary['per_layer_fvu'].values()]}",
        "bucket_counts_by_encoder": " / ".join(map(str, summary["triggers"]["bucket_counts_by_encoder"]))
        + f" of {summary['triggers']['n_active']} active",
        "decoder_cosine_adjacent": span(cos["adjacent"]),
        "decoder_cosine_first_last": "n/a" if cos["mean"][0][-1] is None else f"{cos['mean'][0][-1]:.2f}",
        "flow_cosine_adjacent": span(flow["cosine"]["adjacent"]),
        "flow_strength_adjacent": span(flow["strength"]["adjacent"]),
    }
    return [{"quantity": key, "write-up": WRITE_UP[key], "this run": ours[key]} for key in WRITE_UP]
