"""bench/train_throughput.py runs end to end on a tiny SAE and prints its one JSON line, in both modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"
TINY = ["--d", "16", "--n", "128", "--k", "4", "--batch", "64", "--steps", "2", "--warmup", "1"]


def _run(*extra: str) -> dict:
    src = str(SCRIPT.parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, *extra], capture_output=True, text=True, check=True,
                          env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fp32_ratio_line() -> None:
    row = _run()
    assert row["train_tokens_per_s"] > 0 and row["encode_tokens_per_s"] > 0 and row["ratio"] > 0


def test_bf16_exact_line_reports_certification_and_no_mismatch() -> None:
    row = _run("--precision", "bf16-exact", "--force")
    assert row["bf16_path_ran"] is True
    assert row["selection_mismatches"] == 0 and row["tokens_compared"] == 3 * 64
    assert 0 <= row["certified_fraction"] <= 1
    assert row["speedup"] > 0 and row["fp32_train_tokens_per_s"] > 0
