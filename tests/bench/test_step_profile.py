"""bench/step_profile.py profiles real training steps on a tiny SAE and lists the ops that took their time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "step_profile.py"
TINY = ["--d", "16", "--n", "256", "--k", "4", "--batch", "64", "--steps", "2", "--warmup", "1", "--rows", "40"]


def _run(*extra: str) -> dict:
    src = str(SCRIPT.parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, *extra], capture_output=True, text=True, check=True,
                          env=env, cwd=SCRIPT.parent)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_lists_the_steps_ops_by_time(precision: str) -> None:
    row = _run("--precision", precision)
    ops = row["ops"]
    assert row["step_ms"] > 0 and row["precision"] == precision and row["device"] == "cpu"
    assert 0 < len(ops) <= 40
    times = [op["ms_per_step"] for op in ops]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    assert sum(times) <= row["profiled_ms_per_step"] + 1e-6
    names = {op["op"] for op in ops}
    assert "aten::_fused_adam_" in names or "Optimizer.step#Adam.step" in names  # the optimiser step was profiled
    assert all(op["calls_per_step"] > 0 for op in ops)
    assert "launches_per_step" not in row  # CUDA-only counts
