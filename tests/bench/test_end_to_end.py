"""The end-to-end benchmark without the model or the peers: our streamed worker trains SAEs on a tiny random Llama
and prints a valid JSON row, and the RESULTS.md section is written in place. The sparsify worker needs
`bench/.peers-venv` (with eai-sparsify), which CI lacks: that test is skipped there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import end_to_end  # noqa: E402
from peerbench import end_to_end_results  # noqa: E402

TINY = ["--n", "32", "--k", "4", "--context-length", "16", "--batch-tokens", "32", "--tokens", "128",
        "--warmup-steps", "2"]


def _row(python: str, module: str, argv: list[str]) -> dict:
    proc = subprocess.run([python, "-m", module, *argv], cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_our_stream_worker_trains_saes_on_a_tiny_llama(saved_tiny_llama, tmp_path) -> None:
    """Case (b), an SAE per layer from one forward; the contexts must be the ones the driver tokenises."""
    model, corpus = saved_tiny_llama(hidden_size=32, num_hidden_layers=2)
    _, sha = end_to_end.tokenise(str(model), str(corpus), 16, 128, tmp_path)
    row = _row(sys.executable, "peerbench.workers.ours_stream",
               ["--model", str(model), "--source", str(corpus), "--case", "all", "--buffer-tokens", "64",
                "--expect-sha256", sha, *TINY])
    assert set(end_to_end_results.ROW_KEYS) <= set(row)
    assert row["trainer"] == "ours" and row["case"] == "all" and row["hookpoints"] == 2
    assert row["contexts_sha256"] == sha
    assert (row["d"], row["n"], row["k"], row["batch_tokens"]) == (32, 32, 4, 32)
    assert row["tokens_trained"] == 128 and row["timed_steps"] == 2
    assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0


def test_sparsify_stream_worker_when_the_peers_venv_has_it(saved_tiny_llama, tmp_path) -> None:
    python = BENCH / ".peers-venv" / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import sparsify"], capture_output=True,
                                             env=end_to_end.SPARSIFY_ENV).returncode != 0:
        pytest.skip("bench/.peers-venv with eai-sparsify is not installed (python bench/peerbench/install.py sparsify)")
    model, corpus = saved_tiny_llama(hidden_size=32, num_hidden_layers=2)
    contexts, sha = end_to_end.tokenise(str(model), str(corpus), 16, 128, tmp_path)
    proc = subprocess.run([str(python), "-m", "peerbench.workers.sparsify_stream", "--model", str(model),
                           "--contexts", str(contexts), "--case", "all", *TINY], cwd=BENCH, capture_output=True,
                          text=True, timeout=120, env=end_to_end.SPARSIFY_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["trainer"] == "sparsify" and row["hookpoints"] == 2 and row["contexts_sha256"] == sha
    assert row["tokens_per_s"] > 0


def _fixed_rows() -> list[dict]:
    base = {"n": 4096, "k": 32, "d": 576, "batch_tokens": 1024, "load_average_1min": 1.0, "timed_steps": 4}
    return [{**base, "trainer": "ours", "case": "one", "hookpoints": 1, "tokens_per_s": 300.0, "peak_rss_mb": 500.0},
            {**base, "trainer": "sparsify", "case": "one", "hookpoints": 1, "tokens_per_s": 100.0,
             "peak_rss_mb": 1000.0},
            {**base, "trainer": "ours", "case": "all", "hookpoints": 30, "tokens_per_s": 100.0, "peak_rss_mb": 900.0},
            {**base, "trainer": "sparsify", "case": "all", "hookpoints": 30, "tokens_per_s": 100.0,
             "peak_rss_mb": 1000.0}]


def test_targets_and_section_replace_only_their_own_part(tmp_path) -> None:
    rows = _fixed_rows()
    verdicts = {(t["case"], t["name"]): (t["measured"], t["met"]) for t in end_to_end_results.targets(rows)}
    assert verdicts[("one", "tokens/s ours ÷ sparsify")] == (3.0, True)
    assert verdicts[("one", "peak RSS ours ÷ sparsify")] == (0.5, True)
    assert verdicts[("all", "tokens/s ours ÷ sparsify")] == (1.0, False)
    assert verdicts[("all", "peak RSS ours ÷ sparsify")] == (0.9, False)
    machine = {"cpu": "Test CPU", "cores": "2", "isa": "avx2", "load_average": "1.00 / 1.00 / 1.00",
               "torch": "2.13.0", "date": "2026-01-01"}
    section = end_to_end_results.render(machine, "fixed settings", rows, ["ranks: not available"])
    path = tmp_path / "RESULTS.md"
    path.write_text("# Peer benchmark results\n\n## Targets\n\nkept\n\n## Notes\n\n- kept too\n")
    end_to_end_results.write_section(path, section)
    end_to_end_results.write_section(path, section)  # a rerun replaces the section, never appends a second
    text = path.read_text()
    assert text.count(end_to_end_results.HEADING) == 1
    assert text.startswith("# Peer benchmark results\n\n## Targets\n\nkept\n\n## Notes\n\n- kept too\n")
    assert "| one | ours | 1 | 300 |" in text and "Test CPU, 2 cores" in text
    assert end_to_end_results.read_section(path) == section.rstrip("\n") + "\n"
    path.write_text("# Peer benchmark results\n")  # what peers.py does: the whole file rewritten
    assert end_to_end_results.read_section(path) is None
