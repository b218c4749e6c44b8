"""The autointerp run's report: score tables per SAE and explainer, the comparison tests and plot, LLM usage."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from saelab.interp.compare import latent_scores
from saelab.interp.scorers import SCORERS
from saelab.report.html import Report
from saelab.report.plots import plot_groups

METRICS = ("accuracy", "balanced_accuracy", "f1", "auc", "n", "n_invalid")


def score_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per SAE, explainer and scorer: metrics pooled over every answer, and per-latent mean accuracy."""
    rows = []
    for run in runs:
        for explainer, entry in run["scores"].items():
            for scorer in SCORERS:
                pooled = entry[scorer]["pooled"]
                rows.append({
                    "SAE": run["label"], "explainer": explainer, "scorer": scorer, "latents": entry["n_latents"],
                    "invalid explanations": entry["n_invalid_explanations"],
                    **{metric: pooled[metric] for metric in METRICS},
                    "per-latent mean accuracy": entry[scorer]["per_latent_mean"]["accuracy"],
                })
    return rows


def comparison_rows(comparison: dict[str, Any], labels: list[str]) -> list[dict[str, Any]]:
    rows = []
    for explainer, per_scorer in comparison.items():
        for scorer, tests in per_scorer.items():
            for level, test in tests.items():
                rows.append({
                    "explainer": explainer, "scorer": scorer, "over": level.replace("_", " "),
                    f"mean {labels[0]}": test["mean_a"], f"mean {labels[1]}": test["mean_b"],
                    "n a": test["n_a"], "n b": test["n_b"], "U": test["u"], "p-value": test["p_value"],
                })
    return rows


def write_report(summary: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> Path:
    labels = [run["label"] for run in runs]
    llm = summary["llm"]
    report = Report("saelab autointerp: " + " vs ".join(labels))
    report.paragraph(
        f"Explainer and scorer: {llm['model_id']}. Detection: does the latent fire in this window (activating "
        "windows from activation quartiles vs random silent windows). Fuzzing: are the marked tokens the activating "
        "ones (correct vs wrongly placed marks). Invalid replies count as wrong answers; the baseline explanation is "
        "the latent's most frequent activating tokens."
    )
    report.heading("Scores")
    report.table(score_rows(runs))
    if "comparison" in summary:
        report.heading("Comparison (two-sided Mann-Whitney U)")
        report.table(comparison_rows(summary["comparison"], labels))
        groups = {scorer: {run["label"]: latent_scores(run["results"], "llm", scorer, "accuracy") for run in runs}
                  for scorer in SCORERS}
        png = plot_groups(groups, out / "comparison.png", ylabel="per-latent accuracy",
                          title="autointerp accuracy per latent (LLM explanations)")
        report.figure(png, "per-latent accuracy of each SAE's LLM explanations, by scorer (box: quartiles, ▲: mean)")
    report.heading("Feature pages")
    for run in runs:
        if "pages" in run:
            report.paragraph(f"{run['label']}: {os.path.relpath(run['pages'], out)}")
    report.heading("Timings (s, this run)")
    report.table([{"SAE": run["label"], **run["seconds"]} for run in runs])
    report.heading("LLM usage")
    report.key_values(llm["usage"], caption="this run: requests sent, requests answered from the cache, tokens spent")
    report.key_values(llm["cache"], caption="the reply cache: replies held and the tokens they cost, over all runs")
    report.heading("Config and provenance")
    report.code({"config": summary["config"], "provenance": summary["provenance"]})
    return report.write(out / "report.html")
