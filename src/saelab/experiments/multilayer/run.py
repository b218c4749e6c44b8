"""`saelab multilayer`: the "Multi-layer SAEs" experiment end to end in one run folder, over two layer sets.

The write-up (Pythia-70M, all 6 layers) compares truly adjacent layers. A run trains and analyses two SAEs of the
same size on the same tokens: one over every `--layer-stride`-th layer (default 0, 6, 12, 18, 24 of the offline
SmolLM2-135M: a view over the whole depth, whose "adjacent" pairs are six blocks apart) into the run folder, and one
over `--adjacent-layers` (default 0-5: as many consecutive layers as Pythia-70M has) into `OUT_DIR/adjacent`; the
first set's summary.json and report.html put both sets' figures side by side with the write-up's. `--adjacent-layers
''` runs the first set alone (as `--sae-dir` requires). The write-up's own setting is `--model EleutherAI/pythia-70m
--layers 0,1,2,3,4,5 --adjacent-layers '' --budget full`.

Budgets (`--budget`; any flag given beside it wins):
- small (the defaults): 4,096 latents, k = 128, per-layer normalisation, a 65,536-token store of the KJV text,
  150k training tokens (about 2.3 epochs), 16,384 held-out tokens, for each layer set. Each run records the seconds
  of its steps in summary.json (`timings_s`).
- full: the write-up's dictionary, 24,576 latents, over a 920k-token store (nearly all of the KJV text; the corpus
  holds 991k tokens, and the 65,536 held-out tokens follow the training ones), 2M training tokens (roughly 6 x the
  latents and 13 x the tokens of small per set). Measured with `--trainer.precision bf16-exact` on a 2-core Zen 4
  (AVX512-BF16): harvest 24 min; per set 37-44 min of training (2M tokens at 750-900 tokens/s) and 5-6 min of
  analyses: about 2 h end to end.

Steps: tokenise training and held-out contexts (the held-out ones follow the training ones); harvest the layers of
both sets in one forward pass per batch into one store (or reuse `--store`); per set, train the SAE (or analyse
`--sae-dir`); evaluate total and per-layer FVU on held-out tokens, both saelab's pooled FVU and the write-up's
per-dimension mean; run every analysis of `saelab.experiments.multilayer.analysis`; write `summary.json` and
`report.html`, then the set's done-marker. Re-running the same command in the same folder reuses the stores, skips
finished sets and continues training from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from saelab.activations.harvest import HarvestConfig
from saelab.activations.heldout import HeldOutSplit, harvest_with_heldout
from saelab.activations.normalize import estimate_norm_stats
from saelab.activations.store import ActivationStore
from saelab.config import BudgetConfig, Config
from saelab.data.tokenize import DataConfig, context_mask
from saelab.errors import ConfigError
from saelab.evaluation import check_on_store, evaluate_reconstruction
from saelab.experiments.multilayer.analysis import activation_rates, decoder_cosines, information_flow, trigger_layers
from saelab.experiments.multilayer.report import ADJACENT_FOLDER, side_by_side, write_figures, write_report
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

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LAYER_SET_STAGE = "layer_set"  # done-marker of a layer set whose summary and report are written
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
    n_latents: int = dataclasses.field(default=4_096, metadata={"help": "dictionary size"})
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
class MultiLayerConfig(BudgetConfig):
    BUDGETS = {
        "small": {},
        # the KJV text holds 991k tokens: 920k training and 65,536 held-out ones are nearly all of it
        "full": {"sae": {"n_latents": 24_576}, "data": {"n_tokens": 920_000}, "eval_tokens": 65_536,
                 "trainer": {"total_tokens": 2_000_000, "checkpoint_every_steps": 200}},
    }

    out_dir: str = dataclasses.field(default="runs/multilayer", metadata={"help": "run folder"})
    model: str = dataclasses.field(default=OFFLINE_DEFAULT_MODEL, metadata={"help": "HF name, path or offline default"})
    layers: list[int] = dataclasses.field(
        default_factory=list, metadata={"help": "sorted layer list, e.g. 0,1,2; empty: every layer-stride-th"}
    )
    layer_stride: int = dataclasses.field(default=6, metadata={"help": "every k-th layer from 0 (1 = all)"})
    adjacent_layers: list[int] = dataclasses.field(
        default_factory=lambda: [0, 1, 2, 3, 4, 5],
        metadata={"help": "second layer set, trained and analysed the same way into OUT_DIR/adjacent and reported "
                          "beside the first (consecutive layers, as the write-up's); empty: the first set only"},
    )
    normalization: str = dataclasses.field(default="per_layer", metadata={"help": "per_layer | global | none"})
    store: str | None = dataclasses.field(
        default=None,
        metadata={"help": "reuse this training store instead of harvesting (its data settings replace --data)"},
    )
    sae_dir: str | None = dataclasses.field(
        default=None, metadata={"help": f"analyse this trained multilayer SAE ({SOURCE_HELP})"}
    )
    self_check: bool = dataclasses.field(default=True, metadata={"help": SELF_CHECK_HELP + " (with --sae-dir)"})
    # Defaults (the "small" budget) sized so both layer sets fit about half an hour on two CPU cores.
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(source="kjv", n_tokens=65_536))
    eval_tokens: int = dataclasses.field(default=16_384, metadata={"help": "held-out tokens for FVU and rates"})
    harvest_batch_size: int = dataclasses.field(default=16, metadata={"help": "contexts per harvest forward pass"})
    shard_tokens: int = dataclasses.field(default=32_768, metadata={"help": "tokens per store shard"})
    sae: MultiLayerSpec = dataclasses.field(default_factory=MultiLayerSpec)
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(total_tokens=150_000, batch_size=2048, lr=1e-3, warmup_steps=50,
                                              dead_window_tokens=500_000, checkpoint_every_steps=100)
    )
    cosine_top_n: int = dataclasses.field(default=100, metadata={"help": "most active latents for decoder cosines"})
    flow: FlowSettings = dataclasses.field(default_factory=FlowSettings)
    feature_tokens: int = dataclasses.field(
        default=16_384, metadata={"help": "held-out tokens recorded for the feature browser (0: no browser)"}
    )
    features: FeatureDataConfig = dataclasses.field(default_factory=FeatureDataConfig)
    device: str = dataclasses.field(default="cpu", metadata={"help": "device the model and the SAE run on"})

    def validate(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization={self.normalization!r} is unknown; use one of {list(NORMALIZATIONS)}")
        if self.eval_tokens < 1 or self.cosine_top_n < 1 or self.layer_stride < 1:
            raise ConfigError("eval_tokens, cosine_top_n and layer_stride must be at least 1")
        if self.sae_dir is not None and self.adjacent_layers:
            raise ConfigError("--sae-dir analyses one trained SAE, but --adjacent-layers asks for a second layer set "
                              "to be trained; pass --adjacent-layers '' with --sae-dir")


def run(cfg: MultiLayerConfig) -> dict[str, Any]:
    folder = RunFolder.start(cfg)

    model, tokenizer = load_model(cfg.model, cfg.device, torch.float32)
    layers = select_layers(num_layers(model), cfg.layers, cfg.layer_stride)
    adjacent = select_layers(num_layers(model), cfg.adjacent_layers) if cfg.adjacent_layers else []
    trained = None if cfg.sae_dir is None else load_trained(cfg, layer_hookpoints(layers))
    folder.lap("load_model")
    harvest_cfg = HarvestConfig(out_dir=str(folder.path / "activations"), model=cfg.model,
                                hookpoints=layer_hookpoints(sorted({*layers, *adjacent})), data=cfg.data,
                                batch_size=cfg.harvest_batch_size, shard_tokens=cfg.shard_tokens, device=cfg.device)
    split = harvest_with_heldout(model, tokenizer, harvest_cfg, eval_tokens=cfg.eval_tokens,
                                 heldout_contexts=cfg.flow.contexts, store=cfg.store, harvest_train=trained is None)
    folder.lap("harvest")
    inputs = SetInputs(model, tokenizer, split)
    compared = None
    if adjacent:
        set_cfg = cfg.replace(out_dir=str(folder.path / ADJACENT_FOLDER), layers=adjacent, adjacent_layers=[])
        compared = analyse_layer_set(set_cfg, RunFolder.start(set_cfg), adjacent, inputs, None, None)
        folder.lap("adjacent_set")
    return analyse_layer_set(cfg, folder, layers, inputs, trained, compared)


@dataclasses.dataclass
class SetInputs:
    """What every layer set of one run shares: the model and the harvested stores (holding all sets' layers)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    split: HeldOutSplit


def analyse_layer_set(cfg: MultiLayerConfig, folder: RunFolder, layers: list[int], inputs: SetInputs,
                      trained: MultiLayerSAE | None, compared: dict[str, Any] | None) -> dict[str, Any]:
    """Train (or take `trained`), evaluate and analyse one SAE over `layers` into `folder`: its summary.json, report
    and figures, then its done-marker (holding the config); a folder marked done for the same config returns its
    summary without redoing anything. `compared` is the second set's summary, shown side by side with this one."""
    request = json.loads(json.dumps(cfg.to_dict()))
    if folder.result(LAYER_SET_STAGE) == request:
        return folder.read_summary()
    model, tokenizer, split = inputs.model, inputs.tokenizer, inputs.split
    hookpoints = layer_hookpoints(layers)
    eval_store = split.eval_store
    if trained is not None:
        trained.check_input(hookpoints, widths=eval_store.dims)
        check_on_store(trained, eval_store, hookpoints, str(cfg.sae_dir), cfg.self_check)
        sae, training = trained, None
    else:
        sae, training = train_multilayer(cfg, split.train_store, layers, folder.path / "train")
    folder.lap("train")

    metrics = evaluate_reconstruction(sae, _store_batches(eval_store, hookpoints), slices=sae.slices)
    metrics["per_layer_fvu"] = dict(zip(map(str, layers), metrics.pop("per_slice_fvu"), strict=True))
    metrics["per_layer_fvu_per_dim"] = dict(zip(map(str, layers), metrics.pop("per_slice_fvu_per_dim"), strict=True))
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
        "fvu_per_dim": metrics["fvu_per_dim"],
        "per_layer_fvu_per_dim": metrics["per_layer_fvu_per_dim"],
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
    if compared is not None:
        summary[ADJACENT_FOLDER] = {key: value for key, value in compared.items()
                                    if key not in ("config", "provenance", "write_up")}
        summary["side_by_side"] = side_by_side(summary, compared)
    if features is not None:
        summary["features"] = summary_of(features, index_path, folder.path)
    summary = folder.write_summary(summary, cfg)  # the results survive a failing report
    records = None if training is None else training.records
    figures = write_figures(folder.path / "figures", records, rates, triggers, cosines, flow_stats)
    write_report(summary, cosines, flow_stats, figures, folder.report_path, features)
    folder.lap("report")
    log.info("multilayer layers %s finished: FVU %.4f (per-dimension mean %.4f), per layer %s", layers,
             metrics["fvu"], metrics["fvu_per_dim"], metrics["per_layer_fvu"])
    summary = folder.write_summary(summary, cfg)
    folder.mark_done(LAYER_SET_STAGE, request)
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
