"""`saelab demo` / `make demo`: the main job on the offline default, end to end in one run folder.

SmolLM2-135M on the KJV corpus: harvest residual activations at a middle layer (held-out contexts go to a second
store), train a top-k SAE, evaluate it (FVU, L0, dead latents, CE/KL with the SAE spliced into the model) and write
`metrics.json`, the training curves and a one-page `report.html`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.config import Config
from saelab.data.tokenize import DataConfig, build_contexts
from saelab.evaluation import downstream_metrics, reconstruction_metrics
from saelab.io import atomic_write_json
from saelab.models.loading import OFFLINE_DEFAULT_MODEL, load_model
from saelab.provenance import provenance
from saelab.report.html import Report
from saelab.report.plots import plot_training_curves
from saelab.run_folder import Stopwatch
from saelab.training.config import TrainerConfig
from saelab.training.entry import SAESpec, TrainConfig, train_sae

log = logging.getLogger(__name__)

HEADLINE = ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_divergence")


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
    harvest_batch_size: int = 16
    sae: SAESpec = dataclasses.field(default_factory=SAESpec)
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(total_tokens=1_200_000, batch_size=1024, lr=1e-3, warmup_steps=50,
                                              dead_window_tokens=500_000, checkpoint_every_steps=500)
    )
    device: str = "cpu"


CONFIG = DemoConfig


def run(cfg: DemoConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    cfg.save(out / "demo_config.json")
    watch = Stopwatch()
    lap, timings = watch.lap, watch.seconds

    model, tokenizer = load_model(cfg.model, cfg.device, torch.float32)
    lap("load_model")
    eval_contexts_needed = -(-cfg.eval_tokens // (cfg.data.context_length - 1))
    n_eval = max(eval_contexts_needed, cfg.downstream_contexts)
    all_data = dataclasses.replace(cfg.data, n_tokens=cfg.data.n_tokens + n_eval * cfg.data.context_length)
    contexts = build_contexts(all_data, tokenizer, show_progress=True)
    train_contexts, eval_contexts = contexts[:-n_eval], contexts[-n_eval:]
    lap("tokenize")

    def harvest_into(folder: str, ids: torch.Tensor):
        harvest_cfg = HarvestConfig(
            out_dir=str(out / folder), model=cfg.model, hookpoints=[cfg.hookpoint], data=cfg.data,
            batch_size=cfg.harvest_batch_size, device=cfg.device, resume=True,
        )
        return harvest(model, tokenizer, ids, harvest_cfg)

    train_store = harvest_into("activations/train", train_contexts)
    eval_store = harvest_into("activations/eval", eval_contexts[:eval_contexts_needed])
    lap("harvest")

    train_cfg = TrainConfig(store=str(out / "activations/train"), hookpoint=cfg.hookpoint, out_dir=str(out / "train"),
                            sae=cfg.sae, trainer=cfg.trainer, resume=True)
    sae, result = train_sae(train_cfg, train_store)
    lap("train")

    metrics = reconstruction_metrics(sae, eval_store, cfg.hookpoint, batch_size=4096)
    metrics["dead_fraction_training"] = result.final.get("dead_fraction")
    metrics.update(downstream_metrics(model, tokenizer, sae, cfg.hookpoint, eval_contexts[: cfg.downstream_contexts],
                                      cfg.data, context_batch_size=8))
    lap("evaluate")

    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines() if line.strip()]
    curves_png = plot_training_curves(records, out / "training_curves.png")
    summary = {
        **{key: metrics[key] for key in HEADLINE},
        "metrics": metrics,
        "train": {"tokens": result.tokens_seen, "steps": result.steps, "completed": result.completed,
                  "final": result.final},
        "sae": {"architecture": sae.architecture, "n_latents": sae.n_latents, "d_in": sae.d_in,
                "parameters": sae.num_parameters(), "flops_per_token": sae.flops_per_token(),
                "folder": str(result.sae_dir)},
        "stores": {"train_tokens": train_store.n_tokens, "eval_tokens": eval_store.n_tokens},
        "timings_s": timings,
        "config": cfg.to_dict(),
        "provenance": provenance(),
    }
    atomic_write_json(out / "metrics.json", summary)
    write_report(summary, curves_png, out / "report.html")
    lap("report")
    atomic_write_json(out / "metrics.json", {**summary, "timings_s": timings})
    log.info("demo finished: %s", {key: round(float(metrics[key]), 4) for key in HEADLINE})
    return summary


def write_report(summary: dict[str, Any], curves_png: Path, path: Path) -> Path:
    cfg = summary["config"]
    metrics = summary["metrics"]
    report = Report(f"saelab demo: top-k SAE on {cfg['model']} {cfg['hookpoint']}")
    report.paragraph(
        f"{summary['sae']['n_latents']} latents, k={cfg['sae']['k']}, trained on {summary['train']['tokens']:,} "
        f"tokens ({summary['stores']['train_tokens']:,} stored, corpus {cfg['data']['source']!r}, positions below "
        f"{cfg['data']['drop_first_positions']} and special tokens excluded); evaluated on "
        f"{summary['stores']['eval_tokens']:,} held-out tokens and {cfg['downstream_contexts']} held-out contexts."
    )
    report.heading("Headline metrics")
    report.key_values({key: summary[key] for key in HEADLINE})
    report.paragraph(
        "fvu: pooled fraction of variance unexplained in the SAE's input space; l0: mean active latents per token; "
        "dead_fraction: latents that never fire on the held-out tokens; ce_loss_recovered: (CE_zero-ablated − "
        "CE_spliced) / (CE_zero-ablated − CE_clean); kl_divergence: KL(clean || spliced) per token.", note=True)
    report.heading("Downstream loss")
    report.table([{"model": name, "next-token CE": metrics.get(f"ce_{name}")}
                  for name in ("clean", "spliced", "zero_ablated", "mean_ablated") if f"ce_{name}" in metrics])
    report.heading("Training curves")
    report.figure(curves_png, "loss, FVU, L0 and dead fraction against tokens seen")
    report.heading("All metrics")
    report.key_values({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    report.heading("Timings (s)")
    report.key_values(summary["timings_s"])
    report.heading("Config and provenance")
    report.code({"config": cfg, "provenance": summary["provenance"], "sae": summary["sae"]})
    return report.write(path)
