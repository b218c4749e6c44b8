"""The demo's one-page report: headline metrics, downstream losses and training curves of the one SAE."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from saelab.interp.feature_data import FeatureData
from saelab.report.html import Report
from saelab.report.plots import plot_training_curves
from saelab.report.run_features import add_features_section

HEADLINE = ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_divergence")


def write_report(summary: dict[str, Any], records: Sequence[Mapping[str, Any]], folder: Path, path: Path,
                 features: FeatureData | None = None) -> Path:
    """`training_curves.png` in `folder` (from the trainer's log `records`) and the report at `path`, with a
    Features section linking to the browser when `features` is given."""
    curves_png = plot_training_curves(records, folder / "training_curves.png")
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
    if features is not None:
        add_features_section(report, features, summary["features"]["index"])
    report.heading("Training curves")
    report.figure(curves_png, "loss, FVU, L0 and dead fraction against tokens seen")
    report.heading("All metrics")
    report.key_values({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    report.heading("Timings (s)")
    report.key_values(summary["timings_s"])
    report.heading("Config and provenance")
    report.code({"config": cfg, "provenance": summary["provenance"], "sae": summary["sae"]})
    return report.write(path)
