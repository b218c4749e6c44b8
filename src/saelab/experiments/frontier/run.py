"""`saelab frontier`: the deep-SAE write-up's reconstruction-sparsity frontier, shallow vs deep, on one store.

On the same stored activations and token budget, with the write-up's recipe (`DEEP_SAE_RECIPE`, token_l2
preprocessing), train for every k: the shallow SAE (no dense layers), the deep SAEs of each depth (the first `depth`
of `dense_multiples`, mirrored) at the same sparse width, and a parameter-matched variant of the chosen depths (its
sparse width lowered until its parameter count matches the shallow SAE's). Each is evaluated on held-out tokens
(NMSE = pooled FVU in the SAE's space, L0, dead latents) and spliced into the model (CE loss recovered, KL), and
the run folder gets `frontier.json`, the plots and `report.html`.

Everything is resumable: the stores resume, each SAE trains in its own folder (checkpoints; skipped once
`train.json` is written) and is evaluated once (`metrics.json`). `--store` reuses a harvested store; the held-out
contexts are then the ones following it in the same corpus.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.activations.store import ActivationStore
from saelab.config import PresetConfig
from saelab.data.corpora import iter_documents
from saelab.data.tokenize import DataConfig, pack_contexts
from saelab.errors import ConfigError, StoreError
from saelab.evaluation import downstream_metrics, reconstruction_metrics
from saelab.experiments.frontier.report import write_report
from saelab.io import atomic_write_json
from saelab.metrics import ce_loss_recovered
from saelab.models.loading import OFFLINE_DEFAULT_MODEL, load_model
from saelab.provenance import provenance
from saelab.saes import SparseAutoencoder, create_sae, load_sae
from saelab.training.config import DEEP_SAE_RECIPE, TrainerConfig
from saelab.training.entry import SAESpec, TrainConfig, train_sae

log = logging.getLogger(__name__)

BASELINE_FILE = "downstream_baseline.json"


def _default_trainer() -> TrainerConfig:
    """The recipe at the offline default's budget (everything in under 30 minutes on 2 cores): 250k tokens per SAE
    in batches of 1024 (245 steps), the dead window scaled down from 1.5M tokens to 100k, and a constant lr of 1e-3
    instead of 2e-4, which is far from converged after a few hundred steps."""
    budget = {"total_tokens": 250_000, "batch_size": 1024, "lr": 1e-3, "dead_window_tokens": 100_000,
              "resample_every_steps": 25, "checkpoint_every_steps": 100}
    return TrainerConfig.from_dict({**DEEP_SAE_RECIPE, **budget})


@dataclasses.dataclass
class FrontierConfig(PresetConfig):
    """Every field is a flag; `--preset writeup` switches to the write-up's setting (needs network for the model and
    C4; meant for a GPU: `--device cuda`)."""

    PRESETS = {
        "writeup": {
            "model": "gpt2",
            "hookpoint": "resid_post.8",
            "data": {"source": "hf:allenai/c4:en:train", "n_tokens": 4_000_000},
            "n_latents": 12288,
            "ks": [64, 128, 256],
            "downstream_contexts": 128,
            "eval_tokens": 65536,
            "trainer": {**DEEP_SAE_RECIPE, "total_tokens": 40_000_000, "batch_size": 4096,
                        "checkpoint_every_steps": 1000},
        }
    }

    preset: str | None = dataclasses.field(
        default=None, metadata={"help": "writeup = GPT-2 small, resid_post.8, 12,288 latents, k 64/128/256, C4"}
    )
    out_dir: str = dataclasses.field(default="runs/frontier", metadata={"help": "run folder"})
    model: str = dataclasses.field(default=OFFLINE_DEFAULT_MODEL, metadata={"help": "HF name, path or offline default"})
    hookpoint: str = dataclasses.field(default="resid_post.15", metadata={"help": "where every SAE reads"})
    store: str | None = dataclasses.field(
        default=None, metadata={"help": "reuse this harvested store for training (default: harvest `data`)"}
    )
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(source="kjv", n_tokens=200_000))
    eval_tokens: int = dataclasses.field(
        default=16_384, metadata={"help": "held-out tokens for NMSE, L0 and dead latents"}
    )
    downstream_contexts: int = dataclasses.field(default=16, metadata={"help": "held-out contexts for CE and KL"})
    harvest_batch_size: int = 16
    n_latents: int = dataclasses.field(default=4608, metadata={"help": "sparse width shared by every SAE"})
    ks: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64], metadata={"help": "k values"})
    dense_multiples: list[float] = dataclasses.field(
        default_factory=lambda: [2.0, 4.0], metadata={"help": "dense widths (× d_in); depth L uses the first L"}
    )
    depths: list[int] = dataclasses.field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "dense layers per side (0 = shallow)"}
    )
    matched_depths: list[int] = dataclasses.field(
        default_factory=lambda: [1], metadata={"help": "depths also trained parameter-matched to the shallow SAE"}
    )
    resample_depths: list[int] = dataclasses.field(
        default_factory=lambda: [0], metadata={"help": "depths with dead-latent resampling (write-up: shallow only)"}
    )
    preprocessing: str = dataclasses.field(default="token_l2", metadata={"help": "SAE input preprocessing"})
    trainer: TrainerConfig = dataclasses.field(default_factory=_default_trainer)
    shuffle_seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"ks={self.ks} must name at least one k >= 1")
        if not self.depths or not all(0 <= d <= len(self.dense_multiples) for d in self.depths):
            raise ConfigError(
                f"depths={self.depths} must be between 0 and len(dense_multiples)={len(self.dense_multiples)}"
            )
        for name in ("matched_depths", "resample_depths"):
            stray = sorted(set(getattr(self, name)) - set(self.depths))
            if stray:
                raise ConfigError(f"{name} has depths {stray} that are not in depths={self.depths}")
        if 0 in self.matched_depths:
            raise ConfigError("matched_depths cannot hold 0: the shallow SAE is what the others are matched to")


CONFIG = FrontierConfig


@dataclasses.dataclass(frozen=True)
class Variant:
    """One SAE of the frontier."""

    architecture: str  # "shallow", "deep-1", "deep-1-matched", ...
    depth: int
    k: int
    n_latents: int
    resample: bool

    @property
    def name(self) -> str:
        return f"{self.architecture}-k{self.k}"


def architecture_name(depth: int, matched: bool = False) -> str:
    return ("shallow" if depth == 0 else f"deep-{depth}") + ("-matched" if matched else "")


def matched_width(cfg: FrontierConfig, d_in: int, depth: int) -> int:
    """The sparse width at which a deep SAE of `depth` has as many parameters as the shallow one at `n_latents`.

    Parameter counts are affine in the width, so two sizes built on the meta device (no memory) give the line.
    """

    def count(depth_: int, width: int) -> int:
        with torch.device("meta"):
            return create_sae("deep", d_in=d_in, n_latents=width, k=1,
                              encoder_multiples=cfg.dense_multiples[:depth_]).num_parameters()

    target = count(0, cfg.n_latents)
    at_one, slope = count(depth, 1), count(depth, 2) - count(depth, 1)
    width = 1 + round((target - at_one) / slope)
    if width < max(cfg.ks):
        raise ConfigError(
            f"a {architecture_name(depth)} SAE matched to the shallow one's {target:,} parameters would have "
            f"{width} latents, fewer than k={max(cfg.ks)}; raise n_latents or drop {depth} from matched_depths"
        )
    return width


def plan_variants(cfg: FrontierConfig, d_in: int) -> list[Variant]:
    widths = {depth: matched_width(cfg, d_in, depth) for depth in cfg.matched_depths}
    variants = []
    for k in cfg.ks:
        for depth in cfg.depths:
            resample = depth in cfg.resample_depths
            variants.append(Variant(architecture_name(depth), depth, k, cfg.n_latents, resample))
            if depth in widths:
                variants.append(Variant(architecture_name(depth, True), depth, k, widths[depth], resample))
    return variants


@dataclasses.dataclass
class FrontierData:
    """What every SAE of the frontier shares: its training store, the held-out store and contexts, and the data
    rules (positions kept) they were made with."""

    train_store: ActivationStore
    eval_store: ActivationStore
    contexts: Tensor  # held-out contexts for CE/KL
    data: DataConfig


def prepare_data(cfg: FrontierConfig, model: nn.Module, tokenizer) -> FrontierData:
    """Harvest (or reuse) the training store and harvest the held-out one.

    The held-out contexts are the ones that follow the training contexts in the same corpus, packed by the same
    rules; with `--store` they are checked to continue exactly that store's contexts."""
    store = ActivationStore(cfg.store) if cfg.store else None
    data = cfg.data
    if store is not None:
        if cfg.hookpoint not in store.hookpoints or store.model_name != cfg.model:
            raise ConfigError(
                f"store {store.path} holds {store.hookpoints} of model {store.model_name!r}, not {cfg.hookpoint} of "
                f"{cfg.model!r}; pass --model/--hookpoint to match it or harvest a new store"
            )
        if not store.manifest.get("config"):
            raise StoreError(f"store {store.path} records no harvest config; harvest it with `saelab harvest`")
        data = HarvestConfig.from_dict(store.manifest["config"]).data
    n_eval = data.replace(n_tokens=cfg.eval_tokens).n_contexts()
    n_train = store.contexts().shape[0] if store is not None else data.n_contexts()
    contexts = pack_contexts(iter_documents(data.source, text_field=data.text_field), tokenizer, data.context_length,
                             n_train + max(n_eval, cfg.downstream_contexts), data.prepend_bos, show_progress=True)
    if store is not None and not torch.equal(contexts[:n_train], store.contexts()):
        raise ConfigError(
            f"store {store.path}: its contexts are not the first {n_train} of its corpus {data.source!r}, so no "
            "held-out text can be chosen; harvest the training store with `saelab frontier` or `saelab harvest`"
        )
    held = contexts[n_train:]

    def harvest_into(folder: str, ids: Tensor) -> ActivationStore:
        harvest_cfg = HarvestConfig(out_dir=str(Path(cfg.out_dir) / "activations" / folder), model=cfg.model,
                                    hookpoints=[cfg.hookpoint], data=data, batch_size=cfg.harvest_batch_size,
                                    device=cfg.device, resume=True)
        return harvest(model, tokenizer, ids, harvest_cfg)

    train_store = store if store is not None else harvest_into("train", contexts[:n_train])
    return FrontierData(train_store, harvest_into("eval", held[:n_eval]), held[: cfg.downstream_contexts], data)


def train_variant(cfg: FrontierConfig, variant: Variant, store: ActivationStore) -> SparseAutoencoder:
    """Train one SAE in `saes/<name>/` (resuming its checkpoints), or load it once `train.json` says it is done."""
    folder = Path(cfg.out_dir) / "saes" / variant.name
    if (folder / "train.json").exists():
        return load_sae(folder / "sae", device=cfg.device, preprocessing=cfg.preprocessing)
    spec = SAESpec(architecture="deep", n_latents=variant.n_latents, k=variant.k, preprocessing=cfg.preprocessing,
                   encoder_multiples=cfg.dense_multiples[: variant.depth])
    trainer = dataclasses.replace(cfg.trainer, device=cfg.device,
                                  resample_every_steps=cfg.trainer.resample_every_steps if variant.resample else None)
    train_cfg = TrainConfig(store=str(store.path), hookpoint=cfg.hookpoint, out_dir=str(folder), sae=spec,
                            trainer=trainer, resume=True, shuffle_seed=cfg.shuffle_seed)
    started = time.perf_counter()
    sae, result = train_sae(train_cfg, store)
    atomic_write_json(folder / "train.json", {
        "seconds": round(time.perf_counter() - started, 1), "tokens": result.tokens_seen, "steps": result.steps,
        "completed": result.completed, "final": result.final,
    })
    return sae


def evaluate_variant(cfg: FrontierConfig, variant: Variant, sae: SparseAutoencoder, shared: FrontierData,
                     model: nn.Module, tokenizer) -> dict[str, Any]:
    """Held-out reconstruction and downstream metrics of one SAE, cached in its folder's `metrics.json`.

    The clean and zero-ablated CE are the same for every SAE, so they are measured once (`downstream_baseline.json`)
    and CE loss recovered is formed from them."""
    folder = Path(cfg.out_dir) / "saes" / variant.name
    if (folder / "metrics.json").exists():
        return json.loads((folder / "metrics.json").read_text())
    sae.eval()
    metrics = reconstruction_metrics(sae, shared.eval_store, cfg.hookpoint, batch_size=4096)
    baseline_path = Path(cfg.out_dir) / BASELINE_FILE
    need_baseline = not baseline_path.exists()
    downstream = downstream_metrics(model, tokenizer, sae, cfg.hookpoint, shared.contexts, shared.data,
                                    context_batch_size=8, mean_ablation=False, zero_ablation=need_baseline)
    if need_baseline:
        atomic_write_json(baseline_path, {key: downstream[key] for key in ("ce_clean", "ce_zero_ablated")})
    baseline = json.loads(baseline_path.read_text())
    downstream["ce_loss_recovered"] = ce_loss_recovered(baseline["ce_clean"], downstream["ce_spliced"],
                                                        baseline["ce_zero_ablated"])
    train = json.loads((folder / "train.json").read_text())
    result = {
        **{field.name: getattr(variant, field.name) for field in dataclasses.fields(variant)},
        "dense_widths": [round(m * sae.d_in) for m in cfg.dense_multiples[: variant.depth]],
        "parameters": sae.num_parameters(),
        "flops_per_token": sae.flops_per_token(),
        "nmse": metrics["fvu"],
        "l0": metrics["l0"],
        "dead_fraction_eval": metrics["dead_fraction"],
        "dead_fraction_train": train["final"].get("dead_fraction"),
        "reconstruction": metrics,
        "downstream": downstream,
        "train": train,
    }
    atomic_write_json(folder / "metrics.json", result)
    return result


def run(cfg: FrontierConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    cfg.save(out / "frontier_config.json")
    started = time.perf_counter()
    model, tokenizer = load_model(cfg.model, cfg.device, torch.float32)
    shared = prepare_data(cfg, model, tokenizer)
    variants = plan_variants(cfg, shared.train_store.dims[cfg.hookpoint])
    rows = []
    for index, variant in enumerate(variants, start=1):
        log.info("[%d/%d] %s", index, len(variants), variant.name)
        sae = train_variant(cfg, variant, shared.train_store)
        rows.append(evaluate_variant(cfg, variant, sae, shared, model, tokenizer))
    summary = {
        "rows": rows,
        "baseline": json.loads((out / BASELINE_FILE).read_text()),
        "stores": {"train": str(shared.train_store.path), "train_tokens": shared.train_store.n_tokens,
                   "eval": str(shared.eval_store.path), "eval_tokens": shared.eval_store.n_tokens,
                   "downstream_contexts": len(shared.contexts)},
        "seconds": round(time.perf_counter() - started, 1),
        "config": cfg.to_dict(),
        "provenance": provenance(),
    }
    summary["verdict"] = write_report(summary, out)
    atomic_write_json(out / "frontier.json", summary)
    return summary
