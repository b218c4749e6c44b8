"""The harvest benchmark on a tiny random Llama: one valid JSON line, drift of bf16 rounding size, and its
RESULTS.md section written in place and kept when bench/peers.py rewrites the file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import harvest as harvest_bench  # noqa: E402
from peerbench import end_to_end_results, harvest_results  # noqa: E402


def test_the_bench_measures_both_dtypes_and_writes_its_section(saved_tiny_llama, tmp_path, capsys) -> None:
    model, corpus = saved_tiny_llama(hidden_size=32, num_hidden_layers=2)
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\n## End to end (model -> SAEs)\n\nkept\n")
    harvest_bench.main(["--model", str(model), "--source", str(corpus), "--hookpoints", "resid_post.0,resid_post.1",
                        "--tokens", "64", "--bf16-tokens", "32", "--context-length", "16", "--batch", "2",
                        "--roofline-side", "128",
                        "--sae", str(tmp_path / "absent"), "--out", str(out)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fp32, bf16 = result["rows"]
    assert (fp32["dtype"], fp32["tokens"], fp32["batches"]) == ("fp32", 64, 2)
    assert (bf16["dtype"], bf16["tokens"], bf16["batches"]) == ("bf16", 32, 1)
    assert all(row["tokens_per_s"] > 0 and row["roofline_fraction"] > 0 for row in result["rows"])
    assert all(0 < err < 0.05 for err in result["token_drift_median"].values())  # bf16 rounding, no other computation
    assert result["fvu"] is None  # no SAE given
    text = out.read_text()
    assert "kept" in text and text.count(harvest_results.HEADING) == 1
    section = end_to_end_results.read_section(out, harvest_results.HEADING)
    assert "| fp32 | 64 |" in section and "| bf16 | 32 |" in section and "resid_post.1" in section
