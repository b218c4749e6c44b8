"""The autointerp report is drawn from a summary dict alone (as read back from `summary.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saelab.experiments.autointerp.report import timing_rows, write_report

METRICS = {"n": 4, "n_invalid": 0, "accuracy": 0.75, "balanced_accuracy": 0.75, "f1": 0.8, "auc": 0.9}


def _sae(label: str, accuracies: list[float], out: Path) -> dict[str, Any]:
    per_scorer = {"pooled": METRICS, "per_latent_mean": {"accuracy": sum(accuracies) / len(accuracies)},
                  "per_latent_accuracy": accuracies}
    return {"label": label, "scores": {"llm": {"n_latents": len(accuracies), "n_invalid_explanations": 0,
                                               "detection": per_scorer, "fuzzing": per_scorer}},
            "latent_seconds": {"explain": 1.0, "score": 2.0}, "pages": str(out / label / "pages" / "index.html")}


def test_report_from_the_summary_alone(tmp_path: Path) -> None:
    test = {"n_a": 4, "n_b": 4, "mean_a": 0.7, "mean_b": 0.5, "u": 10.0, "p_value": 0.3}
    summary = {
        "saes": [_sae("a", [0.5, 1.0], tmp_path), _sae("b", [0.25, 0.5], tmp_path)],
        "llm": {"model_id": "openai:fake", "usage": {"requests": 3}, "cache": {"replies": 3}},
        "comparison": {"llm": {s: {"per_example": test, "per_latent": test} for s in ("detection", "fuzzing")}},
        "timings_s": {"load": 1.5, "a/record": 2.5, "a/latents": 3.0, "a/pages": 0.5, "b/record": 2.0,
                      "b/latents": 3.5, "b/pages": 0.25, "compare": 0.1},
        "config": {"n_latents": 2}, "provenance": {"saelab": "test"},
    }
    path = write_report(summary, tmp_path)
    page = path.read_text()
    assert path == tmp_path / "report.html" and (tmp_path / "comparison.png").exists()
    assert "a vs b" in page and "a/pages/index.html" in page and "openai:fake" in page
    assert timing_rows(summary["saes"], summary["timings_s"])[1] == {"SAE": "b", "record": 2.0, "explain": 1.0,
                                                                     "score": 2.0, "pages": 0.25}
