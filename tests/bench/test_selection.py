"""bench/selection.py: fp32 against bf16-exact on one SAE and batch (forced where the CPU has no fast bf16)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import selection  # noqa: E402

from saelab.saes import create_sae, native  # noqa: E402


@pytest.mark.skipif(native.library() is None, reason="no C compiler: exact selection needs the kernels")
def test_compare_reports_the_same_selection_and_the_certified_fraction(monkeypatch) -> None:
    monkeypatch.setenv("SAELAB_FORCE_BF16_EXACT", "1")
    torch.manual_seed(0)
    sae = create_sae("topk", d_in=64, n_latents=512, k=8)
    row = selection.compare(sae, torch.randn(300, 64))
    assert row["same_selection"] is True and row["bf16_path_ran"] is True
    assert 0.9 <= row["certified_fraction"] <= 1 and row["fp32_s"] > 0 and row["bf16_exact_s"] > 0
