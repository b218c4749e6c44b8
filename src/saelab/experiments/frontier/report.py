"""The frontier run's report: the table, the NMSE-vs-k frontier and dead/CE plots, and a plain verdict on whether
the deep SAEs beat the shallow one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saelab.report.html import Report
from saelab.report.plots import plot_lines

COLUMNS = ("architecture", "k", "n_latents", "dense_widths", "parameters", "flops_per_token", "nmse", "l0",
           "dead % (train)", "dead % (eval)", "ce_loss_recovered", "ce_delta", "kl", "train_s")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per SAE, in the report's column order."""
    return [
        {
            "architecture": r["architecture"],
            "k": r["k"],
            "n_latents": r["n_latents"],
            "dense_widths": "-".join(str(w) for w in r["dense_widths"]) or "none",
            "parameters": r["parameters"],
            "flops_per_token": r["flops_per_token"],
            "nmse": r["nmse"],
            "l0": r["l0"],
            "dead % (train)": 100 * r["dead_fraction_train"] if r["dead_fraction_train"] is not None else None,
            "dead % (eval)": 100 * r["dead_fraction_eval"],
            "ce_loss_recovered": r["downstream"]["ce_loss_recovered"],
            "ce_delta": r["downstream"]["ce_delta"],
            "kl": r["downstream"]["kl_divergence"],
            "train_s": r["train"]["seconds"],
        }
        for r in rows
    ]


def series(rows: Sequence[dict[str, Any]], value: str) -> dict[str, tuple[list[float], list[float]]]:
    """architecture -> (ks, values) of one table column, ordered by k."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for row in sorted(rows, key=lambda r: r["k"]):
        if row[value] is None:
            continue
        ks, values = out.setdefault(row["architecture"], ([], []))
        ks.append(row["k"])
        values.append(row[value])
    return out


def verdict(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per architecture: NMSE / shallow NMSE at each k, and the ks where it is lower (deep beats shallow)."""
    shallow = {r["k"]: r["nmse"] for r in rows if r["architecture"] == "shallow"}
    result: dict[str, Any] = {}
    for row in rows:
        if row["architecture"] == "shallow" or row["k"] not in shallow:
            continue
        entry = result.setdefault(row["architecture"], {"nmse_ratio_to_shallow": {}, "beats_shallow_at_k": []})
        ratio = row["nmse"] / shallow[row["k"]]
        entry["nmse_ratio_to_shallow"][str(row["k"])] = ratio
        if ratio < 1.0:
            entry["beats_shallow_at_k"].append(row["k"])
    return result


def verdict_text(result: dict[str, Any]) -> list[str]:
    lines = []
    for architecture, entry in result.items():
        ratios = ", ".join(f"{ratio:.3f} at k={k}" for k, ratio in entry["nmse_ratio_to_shallow"].items())
        wins = entry["beats_shallow_at_k"]
        outcome = ("lower NMSE than shallow at every k" if len(wins) == len(entry["nmse_ratio_to_shallow"])
                   else f"lower NMSE than shallow at k={wins}" if wins else "no lower NMSE than shallow at any k")
        lines.append(f"{architecture}: {outcome} (NMSE / shallow NMSE: {ratios}).")
    return lines


def write_report(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the plots and `report.html` into `out`; returns the verdict."""
    cfg, rows = summary["config"], summary["rows"]
    table = table_rows(rows)
    result = verdict(rows)
    ks = {"xlabel": "k (active latents)", "logx": True, "xticks": sorted(cfg["ks"])}
    nmse_png = plot_lines(series(table, "nmse"), out / "frontier_nmse.png", ylabel="NMSE (FVU in the SAE's space)",
                          title="Reconstruction-sparsity frontier", **ks)
    dead_png = plot_lines(series(table, "dead % (train)"), out / "frontier_dead.png", ylabel="dead latents (%)",
                          title="Dead latents in the last training window", **ks)
    ce_png = plot_lines(series(table, "ce_loss_recovered"), out / "frontier_ce.png", ylabel="CE loss recovered",
                        title="SAE spliced into the model", **ks)

    report = Report(f"Deep vs shallow SAEs: {cfg['model']} {cfg['hookpoint']}")
    trainer = cfg["trainer"]
    report.paragraph(
        f"Every SAE was trained on {trainer['total_tokens']:,} tokens (batch {trainer['batch_size']}, lr "
        f"{trainer['lr']}, {trainer['optimizer']}, activation decay {trainer['activation_decay']}, loss "
        f"{trainer['loss']}) from one store of {summary['stores']['train_tokens']:,} tokens, preprocessing "
        f"{cfg['preprocessing']!r}; sparse width {cfg['n_latents']:,} (matched variants: lower, for equal parameters); "
        f"dense widths {cfg['dense_multiples']} × d_in mirrored (shallow: none, every Linear with its own bias as in "
        f"the write-up's code); resampling for depths {cfg['resample_depths']}. "
        f"Evaluated on {summary['stores']['eval_tokens']:,} held-out tokens and "
        f"{summary['stores']['downstream_contexts']} held-out contexts."
    )
    report.heading("Verdict")
    for line in verdict_text(result) or ["No shallow SAE in this run to compare with."]:
        report.paragraph(line)
    report.heading("Frontier")
    report.table(table, COLUMNS)
    report.paragraph(
        "nmse: pooled FVU on held-out tokens in the SAE's (preprocessed) space, the write-up's normalized MSE; "
        "dead % (train): no activation in the trainer's last dead window; dead % (eval): never active on the "
        "held-out tokens; ce_loss_recovered against zero ablation; ce_delta: CE spliced − CE clean; kl: "
        "KL(clean || spliced) per token; flops_per_token counts one forward pass.", note=True)
    report.figure(nmse_png, "NMSE against k, one line per architecture")
    report.figure(dead_png, "dead latents against k")
    report.figure(ce_png, "CE loss recovered against k")
    report.heading("Downstream baseline")
    report.key_values(summary["baseline"])
    report.heading("Config and provenance")
    report.code({"config": cfg, "provenance": summary["provenance"], "stores": summary["stores"],
                 "seconds": summary["seconds"]})
    report.write(out / "report.html")
    return result
