"""`saelab frontier`: the reconstruction-sparsity frontier of the "Deep SAEs" write-up, shallow vs deep, on one
store.

On the same stored activations and token budget, with the write-up's recipe (`DEEP_SAE_RECIPE`, token_l2
preprocessing), train for every k: the shallow SAE (no dense layers), the deep SAEs of each depth (the first `depth`
of `dense_multiples`, mirrored) at the same sparse width, and a parameter-matched variant of the chosen depths (its
sparse width lowered until its parameter count matches the shallow SAE's). Each is evaluated on held-out tokens
(NMSE = pooled FVU in the SAE's space, L0, dead latents) and spliced into the model (CE loss recovered, KL), and
the run folder gets `summary.json`, the plots and `report.html`.

`--architectures` sets which families are compared at each k on the same store and budget: "deep" is the sweep
above (shallow, deep, parameter-matched); "topk", "batchtopk", "matryoshka" (BatchTopK selection, prefixes at 1/16
and 1/4 of the width) select k latents per token (on average over the batch for the last two), and "jumprelu"
trains with its L0 steered to k (target-L0 mode), so every row sits at the same sparsity.

Everything is resumable: the stores resume, each SAE trains in its own folder `saes/<variant>/` (checkpoints) and
is trained and evaluated once (done-markers `done/saes/<variant>/train.json` and `.../evaluate.json`). `--store`
reuses a harvested store; the held-out contexts are then the ones following it in the same corpus.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from saelab.activations.harvest import HarvestConfig
from saelab.activations.heldout import HeldOutSplit, load_model_with_heldout
from saelab.activations.store import ActivationStore
from saelab.config import PresetConfig
from saelab.data.tokenize import DataConfig
from saelab.errors import ConfigError
from saelab.evaluation import downstream_metrics, reconstruction_metrics
from saelab.experiments.frontier.report import write_report
from saelab.metrics import ce_loss_recovered
from saelab.models.loading import OFFLINE_DEFAULT_MODEL
from saelab.run_folder import RunFolder
from saelab.saes import SparseAutoencoder, create_sae, load_sae
from saelab.saes.spec import SAESpec
from saelab.training.config import DEEP_SAE_RECIPE, TrainerConfig
from saelab.training.entry import TrainConfig, train_from_config
from saelab.training.trainer import FINAL_SAE_DIR

log = logging.getLogger(__name__)

BASELINE_STAGE = "downstream_baseline"  # clean and zero-ablated CE, the same for every SAE


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
    harvest_batch_size: int = dataclasses.field(default=16, metadata={"help": "contexts per harvest forward pass"})
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
    architectures: list[str] = dataclasses.field(
        default_factory=lambda: ["deep"],
        metadata={"help": "families compared at each k: deep (the shallow/deep sweep), topk, batchtopk, jumprelu "
                          "(L0 steered to k), matryoshka"},
    )
    preprocessing: str = dataclasses.field(default="token_l2", metadata={"help": "SAE input preprocessing"})
    trainer: TrainerConfig = dataclasses.field(default_factory=_default_trainer)
    shuffle_seed: int = dataclasses.field(default=0, metadata={"help": "seed of the store's batch order"})
    device: str = dataclasses.field(default="cpu", metadata={"help": "device the model and the SAEs run on"})

    def validate(self) -> None:
        unknown = sorted(set(self.architectures) - set(FAMILIES))
        if not self.architectures or unknown:
            raise ConfigError(f"architectures={self.architectures}: choose from {list(FAMILIES)}")
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


FAMILIES = ("deep", "topk", "batchtopk", "jumprelu", "matryoshka")


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
    deep = "deep" in cfg.architectures
    widths = {depth: matched_width(cfg, d_in, depth) for depth in cfg.matched_depths} if deep else {}
    variants = []
    for k in cfg.ks:
        variants += [Variant(name, 0, k, cfg.n_latents, False) for name in cfg.architectures if name != "deep"]
        for depth in cfg.depths if deep else ():
            resample = depth in cfg.resample_depths
            variants.append(Variant(architecture_name(depth), depth, k, cfg.n_latents, resample))
            if depth in widths:
                variants.append(Variant(architecture_name(depth, True), depth, k, widths[depth], resample))
    return variants


def stage(variant: Variant, step: str) -> str:
    """The done-marker of one step ("train", "evaluate") of one SAE."""
    return f"saes/{variant.name}/{step}"


def sae_spec(cfg: FrontierConfig, variant: Variant) -> SAESpec:
    """What `saelab train` builds for one variant: a deep SAE of its depth, or a family at sparsity k."""
    if variant.architecture not in FAMILIES[1:]:
        return SAESpec(architecture="deep", n_latents=variant.n_latents, k=variant.k,
                       preprocessing=cfg.preprocessing, encoder_multiples=cfg.dense_multiples[: variant.depth])
    extra: dict[str, Any] = {"k": variant.k}
    if variant.architecture == "jumprelu":
        extra = {"target_l0": float(variant.k)}
    if variant.architecture == "matryoshka":
        extra["prefixes"] = [max(variant.k, variant.n_latents // 16), max(variant.k, variant.n_latents // 4)]
    return SAESpec.from_dict({"architecture": variant.architecture, "n_latents": variant.n_latents,
                              "preprocessing": cfg.preprocessing, **extra})


def train_variant(cfg: FrontierConfig, folder: RunFolder, variant: Variant, store: ActivationStore
                  ) -> SparseAutoencoder:
    """Train one SAE in `saes/<name>/` (resuming its checkpoints), or load it once its train stage is done."""
    sae_folder = folder.path / "saes" / variant.name
    if folder.is_done(stage(variant, "train")):
        return load_sae(sae_folder / FINAL_SAE_DIR, device=cfg.device, preprocessing=cfg.preprocessing)
    spec = sae_spec(cfg, variant)
    trainer = dataclasses.replace(cfg.trainer, device=cfg.device,
                                  resample_every_steps=cfg.trainer.resample_every_steps if variant.resample else None)
    train_cfg = TrainConfig(store=str(store.path), hookpoint=cfg.hookpoint, out_dir=str(sae_folder), sae=spec,
                            trainer=trainer, resume=True, shuffle_seed=cfg.shuffle_seed)
    sae, result = train_from_config(train_cfg, store)
    folder.mark_done(stage(variant, "train"), {
        "seconds": folder.lap(f"{variant.name}/train"), "tokens": result.tokens_seen, "steps": result.steps,
        "completed": result.completed, "final": result.final,
    })
    return sae


def evaluate_variant(cfg: FrontierConfig, folder: RunFolder, variant: Variant, sae: SparseAutoencoder,
                     shared: HeldOutSplit, model: nn.Module, tokenizer) -> dict[str, Any]:
    """Held-out reconstruction and downstream metrics of one SAE, computed once (its evaluate stage).

    The clean and zero-ablated CE are the same for every SAE, so they are measured once (the downstream_baseline
    stage) and CE loss recovered is formed from them."""

    def evaluate() -> dict[str, Any]:
        sae.eval()
        metrics = reconstruction_metrics(sae, shared.eval_store, cfg.hookpoint, batch_size=4096)
        need_baseline = not folder.is_done(BASELINE_STAGE)
        contexts = shared.contexts[: cfg.downstream_contexts]
        downstream = downstream_metrics(model, tokenizer, sae, cfg.hookpoint, contexts, shared.data,
                                        context_batch_size=8, mean_ablation=False, zero_ablation=need_baseline)
        if need_baseline:
            folder.mark_done(BASELINE_STAGE, {key: downstream[key] for key in ("ce_clean", "ce_zero_ablated")})
        baseline = folder.result(BASELINE_STAGE)
        downstream["ce_loss_recovered"] = ce_loss_recovered(baseline["ce_clean"], downstream["ce_spliced"],
                                                            baseline["ce_zero_ablated"])
        train = folder.result(stage(variant, "train"))
        return {
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

    result = folder.once(stage(variant, "evaluate"), evaluate)
    folder.lap(f"{variant.name}/evaluate")
    return result


def run(cfg: FrontierConfig) -> dict[str, Any]:
    folder = RunFolder.start(cfg)
    harvest_cfg = HarvestConfig(model=cfg.model, hookpoints=[cfg.hookpoint], data=cfg.data,
                                batch_size=cfg.harvest_batch_size, device=cfg.device)
    model, tokenizer, shared = load_model_with_heldout(folder, harvest_cfg, eval_tokens=cfg.eval_tokens,
                                                       heldout_contexts=cfg.downstream_contexts, store=cfg.store)
    variants = plan_variants(cfg, shared.train_store.dims[cfg.hookpoint])
    rows = []
    for index, variant in enumerate(variants, start=1):
        log.info("[%d/%d] %s", index, len(variants), variant.name)
        sae = train_variant(cfg, folder, variant, shared.train_store)
        rows.append(evaluate_variant(cfg, folder, variant, sae, shared, model, tokenizer))
    summary = {
        "rows": rows,
        "baseline": folder.result(BASELINE_STAGE),
        "stores": {"train": str(shared.train_store.path), "train_tokens": shared.train_store.n_tokens,
                   "eval": str(shared.eval_store.path), "eval_tokens": shared.eval_store.n_tokens,
                   "downstream_contexts": cfg.downstream_contexts},
        "seconds": round(sum(folder.timings.values()), 1),
    }
    summary = folder.write_summary(summary, cfg)
    summary["verdict"] = write_report(summary, folder.path)
    folder.lap("report")
    return folder.write_summary(summary, cfg)
