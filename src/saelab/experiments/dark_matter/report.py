"""`saelab dark-matter`'s `report.html`: one section per experiment, each with its figure, its table and the claim of
"Decomposing The Dark Matter of Sparse Autoencoders" to read it against. Built only from the run's summary (what
`summary.json` holds), so a report can be redrawn from the JSON alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saelab.report.html import Report
from saelab.report.plots import plot_heatmap, plot_lines
from saelab.run_folder import REPORT_FILE

WRITE_UP = "Decomposing The Dark Matter of Sparse Autoencoders"
# What the write-up found, per experiment.
CLAIMS = {
    "1": "Paper: a linear probe on x explains most of the variance of ||e||² for every SAE (R² very high); sparser "
         "and wider SAEs are less predictable.",
    "2": "Paper: a linear map of x predicts about half of the error vector (R² ~0.5), less for wider SAEs.",
    "3": "Paper: at fixed L0 the nonlinear FVU stays about constant across widths while the linear part shrinks; the "
         "power-law fit of the total FVU asymptotes above the flat nonlinear level.",
    "4": "Paper: per-token error norms of a larger SAE are highly predictable from a smaller SAE's (high R²); adding "
         "the smaller SAE's nonlinear-error norm lowers the remaining FVU a little further.",
    "5": "Paper: on synthetic activations the linear estimate tracks the input (dense) noise (r = 0.98) and the "
         "nonlinear estimate tracks the reconstruction (introduced) noise (r = 0.90).",
    "6": "Paper: the norms of x and Sae(x) are almost perfectly predictable from x; the nonlinear error's norm much "
         "less so than the linear error's.",
    "7": "Paper: an SAE trained on the nonlinear error converges to a worse FVU than one trained on the linear error.",
    "8": "Paper: each component closes a share of the CE gap between Sae(x) and x roughly in proportion to its "
         "share of the error norm / variance, the nonlinear part possibly slightly more.",
    "9": "Paper: gradient pursuit with each token's own L0 lowers the total FVU somewhat but the nonlinear FVU "
         "hardly at all.",
    "10": "Paper: linear maps from earlier components (previous residual, attention and MLP outputs, their SAE "
          "reconstructions and errors) explain a small part of the nonlinear error.",
}


def write_report(summary: dict[str, Any], out: Path) -> Path:
    """`out/report.html`, its figures in `out/figures`, from the summary `run` writes."""
    setup, exp = summary["setup"], summary["experiments"]
    figures = out / "figures"
    report = Report(f"Dark matter of SAEs on {setup['model']} {setup['hookpoint']}")
    report.paragraph(f'The experiments of "{WRITE_UP}"; each section quotes the write-up\'s finding ("Paper: ...") '
                     "to read the numbers against.", note=True)
    _setup(report, setup)
    labels = list(setup["saes"])
    widths = [setup["saes"][label]["width"] for label in labels]
    _probe_and_transform(report, exp, labels, widths, figures)
    _nonlinear_fvu(report, exp["3_nonlinear_fvu"], labels, figures)
    _per_token_scaling(report, exp["4_per_token_scaling"], labels, figures)
    _synthetic(report, exp["5_synthetic"], figures)
    _norm_prediction(report, exp["6_norm_prediction"], labels, widths, figures)
    _component_saes(report, exp["7_component_saes"], figures)
    _downstream(report, exp["8_downstream_ce"], labels, widths, figures)
    _pursuit(report, exp["9_gradient_pursuit"], figures)
    _earlier(report, exp["10_earlier_components"], figures)
    report.heading("Timings (s)")
    report.key_values(summary["timings_s"])
    report.heading("Config and provenance")
    report.code({"config": summary["config"], "provenance": summary["provenance"]})
    return report.write(out / REPORT_FILE)


def _claim(report: Report, number: str) -> None:
    report.paragraph(CLAIMS[number], note=True)


def _setup(report: Report, setup: dict[str, Any]) -> None:
    tokens = setup["tokens"]
    report.paragraph(
        f"Activations of {setup['hookpoint']} (and {', '.join(setup['earlier_hookpoints']) or 'no earlier components'}"
        f" for experiment 10) on {setup['corpus']!r}, contexts of {setup['context_length']} tokens with the first "
        f"{setup['drop_first_positions']} positions of each dropped (the write-up kept positions >= 200 of 1024: early "
        f"tokens are easier to reconstruct) and special tokens (BOS) "
        f"{'excluded' if setup['exclude_special_tokens'] else 'kept'}. {tokens['sae_training']:,} tokens train the "
        f"SAEs, {tokens['analysis']:,} are analysed (regressions fit on a random part, scored on the rest) and "
        f"{tokens['downstream_contexts']} held-out contexts measure the downstream loss. Reference SAE for "
        f"experiments 5, 7 and 10: {setup['reference']}."
    )
    report.heading("SAEs")
    rows = []
    for label, info in setup["saes"].items():
        final = info["training"]
        rows.append({"sae": label, "width": info["width"], "k": info["l0_k"], "training FVU": final.get("fvu"),
                     "training L0": final.get("l0"), "dead fraction": final.get("dead_fraction"),
                     "tokens": final.get("tokens")})
    report.table(rows)


def _probe_and_transform(report: Report, exp: dict[str, Any], labels: list[str], widths: list[int],
                         figures: Path) -> None:
    probe, vector = exp["1_error_norm_probe"], exp["2_error_vector_transform"]
    report.heading("(1) Error-norm probe and (2) error-vector transform")
    _claim(report, "1")
    _claim(report, "2")
    png = plot_lines({"(1) x -> ||e||²": (widths, [probe[lb] for lb in labels]),
                      "(2) x -> e": (widths, [vector[lb]["r2"] for lb in labels])},
                     figures / "probe_transform.png", xlabel="SAE width", ylabel="held-out R²", logx=True)
    report.figure(png, "held-out R² of the linear probe for ||e||² and of the linear map to e, per SAE width")
    report.table([{"sae": lb, "norm probe R²": probe[lb], "vector R² (mean per dim)": vector[lb]["r2"],
                   "vector FVU (pooled)": vector[lb]["fvu"]} for lb in labels])


def _nonlinear_fvu(report: Report, exp: dict[str, Any], labels: list[str], figures: Path) -> None:
    scaling = exp["scaling"]
    report.heading("(3) Nonlinear FVU across widths")
    _claim(report, "3")
    widths = scaling["widths"]
    series = {"total FVU": (widths, scaling["fvu_total"]), "linear part": (widths, scaling["fvu_linear"]),
              "nonlinear FVU": (widths, scaling["fvu_nonlinear"])}
    dashed = ["nonlinear level (flat)"]
    grid = np.geomspace(min(widths), max(widths) * 16, 60)
    series["nonlinear level (flat)"] = (grid, [scaling["nonlinear_level"]] * len(grid))
    law = scaling["total_power_law"]
    if law is not None:
        series["power-law fit of total"] = (grid, law["c"] + law["a"] * grid ** -law["m"])
        dashed.append("power-law fit of total")
    png = plot_lines(series, figures / "fvu_breakdown.png", xlabel="SAE width", ylabel="FVU (held out)", logx=True,
                     dashed=dashed)
    report.figure(png, "FVU breakdown: total = linear part + nonlinear FVU; fits extrapolated 16x past the sweep")
    report.table([{"sae": lb, **exp["per_sae"][lb]} for lb in labels])
    report.key_values({
        "power law c (floor)": None if law is None else law["c"], "power law a": None if law is None else law["a"],
        "power law m": None if law is None else law["m"], "nonlinear level": scaling["nonlinear_level"],
        "log-log slope, total": scaling["total_loglog_slope"],
        "log-log slope, nonlinear": scaling["nonlinear_loglog_slope"],
        "floor above nonlinear level": scaling["power_law_floor_above_nonlinear_level"],
    }, caption="FVU(width) = c + a·width^(−m) fit to the total; fewer than 3 widths: no fit")


def _per_token_scaling(report: Report, pairs: list[dict[str, Any]], labels: list[str], figures: Path) -> None:
    report.heading("(4) Per-token error-norm scaling between widths")
    _claim(report, "4")
    if not pairs:
        report.paragraph("Needs SAEs of at least two widths.")
        return
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.full((len(labels), len(labels)), np.nan)
    for pair in pairs:
        matrix[index[pair["small"]], index[pair["large"]]] = pair["r2"]
    png = plot_heatmap(matrix, figures / "per_token_scaling.png", xlabel="larger SAE", ylabel="smaller SAE",
                       xticklabels=labels, yticklabels=labels, annotate=True)
    report.figure(png, "held-out R² of ||e_large|| ~ [||e_small||, 1]")
    report.table([{"small": p["small"], "large": p["large"], "R²": p["r2"],
                   "R² with ||nonlinear_small||": p["r2_with_nonlinear"], "FVU decrease": p["fvu_decrease"],
                   "slope": p["slope"]} for p in pairs])


def _synthetic(report: Report, exp: dict[str, Any], figures: Path) -> None:
    report.heading("(5) Synthetic test")
    _claim(report, "5")
    report.paragraph(
        f"SAE {exp['sae']} on {exp['tokens']:,} tokens: x' = Sae(x); input noise (stand-in for dense error) is added "
        "before the SAE, reconstruction noise (stand-in for introduced error) after it, and the least used latents are "
        "masked (features not learned). Noise levels are variances as a fraction of Var(x'). Dense estimate: the "
        "linearly explained FVU with nothing masked; introduced estimate: the nonlinear FVU averaged over masks.",
        note=True)
    report.table([{"planted": row, "dense estimate": cols["dense"], "introduced estimate": cols["introduced"]}
                  for row, cols in exp["correlations"].items()], caption="Pearson correlation over the noise grid")
    report.table(exp["estimates"])
    series = {}
    for point in exp["points"]:
        if point["input_noise"] == 0 or point["reconstruction_noise"] == 0:
            name = f"input {point['input_noise']:g}, recon {point['reconstruction_noise']:g}"
            xs, ys = series.setdefault(name, ([], []))
            xs.append(point["mask_fraction"])
            ys.append(point["fvu_nonlinear"])
    png = plot_lines(series, figures / "synthetic.png", xlabel="fraction of latents masked", ylabel="nonlinear FVU")
    report.figure(png, "nonlinear FVU against masked latents, one line per noise setting (flat lines expected)")


def _norm_prediction(report: Report, exp: dict[str, dict[str, float]], labels: list[str], widths: list[int],
                     figures: Path) -> None:
    report.heading("(6) Norm prediction of each component")
    _claim(report, "6")
    components = list(exp[labels[0]])
    png = plot_lines({c: (widths, [exp[lb][c] for lb in labels]) for c in components},
                     figures / "norm_prediction.png", xlabel="SAE width", ylabel="held-out R² of x -> ||c||²",
                     logx=True)
    report.figure(png, "how well a linear probe on x predicts each component's squared norm")
    report.table([{"sae": lb, **exp[lb]} for lb in labels])


def _component_saes(report: Report, exp: dict[str, Any], figures: Path) -> None:
    report.heading("(7) SAEs trained on the linear vs the nonlinear error")
    _claim(report, "7")
    report.paragraph(
        f"Components of SAE {exp['sae']}'s error on the SAE training tokens; each gets a top-k SAE of width "
        f"{exp['width']}, k={exp['k']}, trained on {exp['training_tokens']:,} tokens, scored on the held-out analysis "
        "tokens (FVU against the component's own variance).", note=True)
    report.table([{"component": name, "FVU": m["fvu"], "L0": m["l0"], "dead fraction": m["dead_fraction"]}
                  for name, m in exp["heldout"].items()])
    curves = {name: (c["tokens"], c["fvu"]) for name, c in exp["curves"].items() if c["tokens"]}
    if curves:
        png = plot_lines(curves, figures / "component_sae_training.png", xlabel="tokens", ylabel="training FVU",
                         logy=True, markers=False)
        report.figure(png, "training curves of the two component SAEs")


def _downstream(report: Report, exp: dict[str, Any], labels: list[str], widths: list[int], figures: Path) -> None:
    report.heading("(8) Downstream cross entropy of each component")
    _claim(report, "8")
    rows, check = [], []
    for lb in labels:
        r = exp[lb]
        rows.append({"sae": lb, "CE clean": r["ce_clean"], "CE Sae(x)": r["ce"]["sae"],
                     "CE +linear": r["ce"]["sae+linear"], "CE +nonlinear": r["ce"]["sae+nonlinear"],
                     "CE zero-ablated": r["ce_zero_ablated"], "recovered Sae(x)": r["ce_loss_recovered"]["sae"],
                     "gap closed: linear": r["ce_gap_closed"]["linear"],
                     "norm share: linear": r["norm_share"]["linear"],
                     "variance share: linear": r["variance_share"]["linear"],
                     "gap closed: nonlinear": r["ce_gap_closed"]["nonlinear"],
                     "norm share: nonlinear": r["norm_share"]["nonlinear"],
                     "variance share: nonlinear": r["variance_share"]["nonlinear"]})
        if "sae+linear+nonlinear" in r["ce"]:
            check.append({"sae": lb, "CE clean": r["ce_clean"], "CE Sae(x) + linear + nonlinear":
                          r["ce"]["sae+linear+nonlinear"], "KL": r["kl"]["sae+linear+nonlinear"]})
    series = {}
    for part in ("linear", "nonlinear"):
        series[f"CE gap closed: {part}"] = (widths, [exp[lb]["ce_gap_closed"][part] for lb in labels])
        series[f"variance share: {part}"] = (widths, [exp[lb]["variance_share"][part] for lb in labels])
    png = plot_lines(series, figures / "downstream.png", xlabel="SAE width", ylabel="share", logx=True,
                     dashed=[name for name in series if name.startswith("variance")])
    report.figure(png, "share of the CE gap between Sae(x) and x closed by each component, against its variance share")
    report.table(rows)
    report.table(check, caption="check: Sae(x) + both components is x again, so its CE must equal the clean CE")


def _pursuit(report: Report, exp: dict[str, Any], figures: Path) -> None:
    report.heading("(9) Gradient pursuit on the frozen decoders")
    _claim(report, "9")
    sae, pursuit = exp["scaling_sae"], exp["scaling_pursuit"]
    widths = sae["widths"]
    png = plot_lines({"total, SAE encoder": (widths, sae["fvu_total"]),
                      "total, pursuit": (widths, pursuit["fvu_total"]),
                      "nonlinear, SAE encoder": (widths, sae["fvu_nonlinear"]),
                      "nonlinear, pursuit": (widths, pursuit["fvu_nonlinear"])},
                     figures / "pursuit.png", xlabel="SAE width", ylabel="FVU (held out)", logx=True)
    report.figure(png, f"experiments 2-3 redone on pursuit reconstructions ({exp['tokens']:,} tokens)")
    report.table([{"sae": lb, "FVU SAE": r["sae"]["fvu_total"], "FVU pursuit": r["pursuit"]["fvu_total"],
                   "nonlinear FVU SAE": r["sae"]["fvu_nonlinear"],
                   "nonlinear FVU pursuit": r["pursuit"]["fvu_nonlinear"],
                   "total change": r["fvu_total_change"], "nonlinear change": r["fvu_nonlinear_change"],
                   "mean L0": r["mean_l0"]} for lb, r in exp["per_sae"].items()])


def _earlier(report: Report, exp: dict[str, Any], figures: Path) -> None:
    report.heading("(10) Projections from earlier components")
    _claim(report, "10")
    if "skipped" in exp:
        report.paragraph(f"Skipped: {exp['skipped']}.")
        return
    report.paragraph(
        f"Targets: the components of SAE {exp['sae']} on x. Each earlier component has its own top-k SAE of width "
        f"{exp['width']} trained on {exp['training_tokens']:,} tokens. Cells: held-out R² (mean per dimension) of a "
        "linear map from the row's source to the column's target.", note=True)
    sources = list(exp["r2"])
    targets = list(exp["r2"][sources[0]])
    matrix = np.array([[exp["r2"][s][t] for t in targets] for s in sources])
    png = plot_heatmap(matrix, figures / "earlier_components.png", xlabel="target", ylabel="source",
                       xticklabels=targets, yticklabels=sources, annotate=True)
    report.figure(png, "held-out R² from each earlier source to each component of the SAE on x")
    report.table([{"source": s, **exp["r2"][s]} for s in sources])
    report.table([{"earlier SAE": hp, "training FVU": f.get("fvu"), "dead fraction": f.get("dead_fraction")}
                  for hp, f in exp["earlier_saes"].items()])
