"""bench/interop.py without the peers: refusals need no peer, and the fixture rows match the peers' outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import interop  # noqa: E402


def test_refused_cells_say_why_and_call_no_peer(tmp_path: Path) -> None:
    sae = interop._randomised(interop.ARCHITECTURES["deep"], 0)
    cell = interop.round_trip("deep", sae, "saelens", torch.zeros(4, interop.D), "/nonexistent/python", tmp_path)
    assert cell["result"] == "refused" and "no SAELens equivalent" in cell["why"]
    assert list(tmp_path.iterdir()) == []


def test_fixture_rows_are_read_within_float_rounding() -> None:
    cell = interop.read_fixture("sparsify_topk/layers.1")
    assert (cell["format"], cell["result"]) == ("sparsify", "read")
    assert max(cell["peer_to_saelab"].values()) < 1e-5
    assert "peer->saelab" in interop._table([cell])
