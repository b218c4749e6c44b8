"""`saelab demo` / `make demo`: the main job on the offline default, end to end in one run folder.

SmolLM2-135M on the KJV corpus: harvest residual activations at a middle layer (the held-out contexts that follow
the training ones go to a second store), train a top-k SAE, evaluate it (FVU, L0, dead latents, CE/KL with the SAE
spliced into the model) and write `metrics.json` (also as `summary.json`), the training curves, the feature browser
(`features/index.html`, over the first `feature_tokens` training tokens) and a one-page `report.html` that shows a
dozen latents and links to the browser. Re-running the command in the same folder resumes the stores and the
training.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from saelab.activations.harvest import HarvestConfig
from saelab.activations.heldout import load_model_with_heldout
from saelab.config import Config
from saelab.data.tokenize import DataConfig
from saelab.evaluation import downstream_metrics, reconstruction_metrics
from saelab.experiments.demo.report import HEADLINE, write_report
from saelab.interp.examples import TokenText
from saelab.interp.feature_data import FeatureDataConfig
from saelab.io import atomic_write_json
from saelab.models.loading import OFFLINE_DEFAULT_MODEL
from saelab.report.run_features import summary_of, write_run_features
from saelab.run_folder import RunFolder
from saelab.saes.spec import SAESpec
from saelab.training.config import TrainerConfig
from saelab.training.entry import TrainConfig, train_from_config

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"  # the headline file `make demo` promises, the same content as summary.json


@dataclasses.dataclass
class DemoConfig(Config):
    out_dir: str = dataclasses.field(default="runs/demo", metadata={"help": "run folder"})
    model: str = dataclasses.field(default=OFFLINE_DEFAULT_MODEL, metadata={"help": "HF name, path or offline default"})
    hookpoint: str = dataclasses.field(default="resid_post.15", metadata={"help": "where the SAE reads"})
    # Positions 0-1 are dropped: BOS, and the first real token, where SmolLM2's residual stream carries rare
    # "massive activations" (norms ~20x the median) that would dominate the pooled variance and flatter FVU.
    data: DataConfig = dataclasses.field(
        default_factory=lambda: DataConfig(source="kjv", n_tokens=160_000, drop_first_positions=2)
    )
    eval_tokens: int = dataclasses.field(default=16_384, metadata={"help": "held-out tokens for reconstruction"})
    downstream_contexts: int = dataclasses.field(default=48, metadata={"help": "held-out contexts for CE/KL"})
    harvest_batch_size: int = dataclasses.field(default=16, metadata={"help": "contexts per harvest forward pass"})
    sae: SAESpec = dataclasses.field(default_factory=SAESpec)
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(total_tokens=1_200_000, batch_size=1024, lr=1e-3, warmup_steps=50,
                                              dead_window_tokens=500_000, checkpoint_every_steps=500)
    )
    feature_tokens: int = dataclasses.field(
        default=32_768, metadata={"help": "training tokens recorded for the feature browser (0: no browser)"}
    )
    features: FeatureDataConfig = dataclasses.field(default_factory=FeatureDataConfig)
    device: str = dataclasses.field(default="cpu", metadata={"help": "device the model and the SAE run on"})


def run(cfg: DemoConfig) -> dict[str, Any]:
    folder = RunFolder.start(cfg)

    harvest_cfg = HarvestConfig(model=cfg.model, hookpoints=[cfg.hookpoint], data=cfg.data,
                                batch_size=cfg.harvest_batch_size, device=cfg.device)
    model, tokenizer, split = load_model_with_heldout(folder, harvest_cfg, eval_tokens=cfg.eval_tokens,
                                                      heldout_contexts=cfg.downstream_contexts)
    train_store, eval_store = split.train_store, split.eval_store

    train_cfg = TrainConfig(store=str(train_store.path), hookpoint=cfg.hookpoint, out_dir=str(folder.path / "train"),
                            sae=cfg.sae, trainer=cfg.trainer, resume=True)
    sae, result = train_from_config(train_cfg, train_store)
    folder.lap("train")

    metrics = reconstruction_metrics(sae, eval_store, cfg.hookpoint, batch_size=4096)
    metrics["dead_fraction_training"] = result.final.get("dead_fraction")
    metrics.update(downstream_metrics(model, tokenizer, sae, cfg.hookpoint, split.contexts[: cfg.downstream_contexts],
                                      split.data, context_batch_size=8))
    folder.lap("evaluate")

    summary = {
        **{key: metrics[key] for key in HEADLINE},
        "metrics": metrics,
        "train": {"tokens": result.tokens_seen, "steps": result.steps, "completed": result.completed,
                  "final": result.final},
        "sae": {"architecture": sae.architecture, "n_latents": sae.n_latents, "d_in": sae.d_in,
                "parameters": sae.num_parameters(), "flops_per_token": sae.flops_per_token(),
                "folder": str(result.sae_dir)},
        "stores": {"train_tokens": train_store.n_tokens, "eval_tokens": eval_store.n_tokens},
    }
    features = None
    if cfg.feature_tokens > 0:
        index_path, features = write_run_features(
            sae, train_store, cfg.hookpoint, folder.path, TokenText(tokenizer), cfg=cfg.features,
            max_tokens=cfg.feature_tokens, unembedding=model.get_output_embeddings().weight,
            title=f"saelab demo: {sae.architecture} SAE on {cfg.model} {cfg.hookpoint}",
            notes=[f"Recorded over the first {cfg.feature_tokens:,} training tokens (whole contexts)."])
        summary["features"] = summary_of(features, index_path, folder.path)
        folder.lap("features")
    summary = _write_summary(folder, summary, cfg)  # the metrics survive a failing report
    write_report(summary, result.records, folder.path, folder.report_path, features)
    folder.lap("report")
    summary = _write_summary(folder, summary, cfg)
    log.info("demo finished: %s", {key: round(float(metrics[key]), 4) for key in HEADLINE})
    return summary


def _write_summary(folder: RunFolder, summary: dict[str, Any], cfg: DemoConfig) -> dict[str, Any]:
    """`summary.json` and the same dict as `metrics.json`."""
    full = folder.write_summary(summary, cfg)
    atomic_write_json(folder.file(METRICS_FILE), full)
    return full
