"""The autointerp run's report: score tables per SAE and explainer, the comparison tests and plot, timings, LLM usage.

Built from the run's summary alone (as written to `summary.json`), so a report can be redrawn without rerunning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from saelab.interp.scorers import SCORERS
from saelab.report.html import Report
from saelab.report.plots import plot_groups
from saelab.run_folder import REPORT_FILE

METRICS = ("accuracy", "balanced_accuracy", "f1", "auc", "n", "n_invalid")


def score_rows(saes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per SAE, explainer and scorer: metrics pooled over every answer, and per-latent mean accuracy."""
    rows = []
    for sae in saes:
        for explainer, entry in sae["scores"].items():
            for scorer in SCORERS:
                pooled = entry[scorer]["pooled"]
                rows.append({
                    "SAE": sae["label"], "explainer": explainer, "scorer": scorer, "latents": entry["n_latents"],
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


def timing_rows(saes: list[dict[str, Any]], timings: dict[str, float]) -> list[dict[str, Any]]:
    """Per SAE, the seconds of this run's stages (explaining and scoring split out of the latents stage)."""
    return [
        {"SAE": sae["label"], "record": timings.get(f"{sae['label']}/record"), **sae["latent_seconds"],
         "pages": timings.get(f"{sae['label']}/pages")}
        for sae in saes
    ]


def write_report(summary: dict[str, Any], out: Path) -> Path:
    """The report (and `comparison.png` when two SAEs were compared) in `out` from the run's `summary`."""
    saes = summary["saes"]
    labels = [sae["label"] for sae in saes]
    llm = summary["llm"]
    report = Report("saelab autointerp: " + " vs ".join(labels))
    report.paragraph(
        f"Explainer and scorer: {llm['model_id']}. Detection: does the latent fire in this window (activating "
        "windows from activation quartiles vs random silent windows). Fuzzing: are the marked tokens the activating "
        "ones (correct vs wrongly placed marks). Invalid replies count as wrong answers; the baseline explanation is "
        "the latent's most frequent activating tokens."
    )
    report.heading("Scores")
    report.table(score_rows(saes))
    if "comparison" in summary:
        report.heading("Comparison (two-sided Mann-Whitney U)")
        report.table(comparison_rows(summary["comparison"], labels))
        groups = {scorer: {sae["label"]: sae["scores"].get("llm", {}).get(scorer, {}).get("per_latent_accuracy", [])
                           for sae in saes}
                  for scorer in SCORERS}
        png = plot_groups(groups, out / "comparison.png", ylabel="per-latent accuracy",
                          title="autointerp accuracy per latent (LLM explanations)")
        report.figure(png, "per-latent accuracy of each SAE's LLM explanations, by scorer (box: quartiles, ▲: mean)")
    report.heading("Feature pages")
    for sae in saes:
        if "pages" in sae:
            report.link(os.path.relpath(sae["pages"], out), f"{sae['label']}: pages of the scored latents")
        if "browser" in sae:
            report.link(os.path.relpath(sae["browser"], out), f"{sae['label']}: feature browser of every latent",
                        after=" (explanations and scores as sortable columns)")
    timings = summary.get("timings_s", {})
    report.heading("Timings (s, this run)")
    report.table(timing_rows(saes, timings))
    shared = {stage: seconds for stage, seconds in timings.items() if "/" not in stage}
    if shared:
        report.key_values(shared, caption="stages shared by the SAEs: loading the store, subject model and chat "
                                          "client; the comparison")
    report.heading("LLM usage")
    report.key_values(llm["usage"], caption="this run: requests sent, requests answered from the cache, tokens spent")
    report.key_values(llm["cache"], caption="the reply cache: replies held and the tokens they cost, over all runs")
    report.heading("Config and provenance")
    report.code({"config": summary["config"], "provenance": summary["provenance"]})
    return report.write(out / REPORT_FILE)
