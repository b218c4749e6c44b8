"""Is one SAE's autointerp score significantly different from another's? Two-sided Mann-Whitney U tests.

As in the deep-SAE write-up, over per-example 0/1 correctness (every scored window of every latent pooled); and,
as a check that is not dominated by a few latents with many examples, over per-latent scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | None]:
    """U of `a` against `b` (ties half), two-sided p-value, and both samples' sizes and means."""
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    result: dict[str, float | int | None] = {
        "n_a": len(a_arr), "n_b": len(b_arr),
        "mean_a": float(a_arr.mean()) if len(a_arr) else None,
        "mean_b": float(b_arr.mean()) if len(b_arr) else None,
        "u": None, "p_value": None,
    }
    if len(a_arr) and len(b_arr):
        test = mannwhitneyu(a_arr, b_arr, alternative="two-sided")
        result["u"] = float(test.statistic)
        # All values equal (e.g. every answer correct in both): no evidence of a difference.
        result["p_value"] = float(test.pvalue) if math.isfinite(test.pvalue) else 1.0
    return result


def compare_results(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], explainer: str, scorers: Sequence[str],
    per_latent_metric: str = "accuracy",
) -> dict[str, dict[str, Any]]:
    """Per scorer, tests over per-example correctness and over per-latent `per_latent_metric` of `explainer`'s
    explanations. `a` and `b` are per-latent results as written by the autointerp experiment."""
    out = {}
    for scorer in scorers:
        out[scorer] = {
            "per_example": mann_whitney(example_correctness(a, explainer, scorer),
                                        example_correctness(b, explainer, scorer)),
            "per_latent": mann_whitney(latent_scores(a, explainer, scorer, per_latent_metric),
                                       latent_scores(b, explainer, scorer, per_latent_metric)),
        }
    return out


def example_correctness(results: Sequence[dict[str, Any]], explainer: str, scorer: str) -> list[float]:
    return [
        float(answer["correct"])
        for result in results
        for answer in result["scores"].get(explainer, {}).get(scorer, {}).get("answers", [])
    ]


def latent_scores(results: Sequence[dict[str, Any]], explainer: str, scorer: str, metric: str) -> list[float]:
    values = (result["scores"].get(explainer, {}).get(scorer, {}).get("metrics", {}).get(metric) for result in results)
    return [float(v) for v in values if v is not None]
