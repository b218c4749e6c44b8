"""Workers that fail: the cause in one line (a real SIGKILL, a real exception), and the note RESULTS.md carries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
from peerbench import results  # noqa: E402
from peerbench.launch import WorkerFailed, exit_cause, run_worker  # noqa: E402

KILLED = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"  # what the out-of-memory killer does
RAISES = "import sys\nprint('partial output')\nraise RuntimeError('no activations at /nowhere')\n"
PRINTS = "import json\nprint(json.dumps({'trainer': 'fake', 'n': 64}))\n"


@pytest.fixture
def fake_workers(tmp_path, monkeypatch) -> str:
    for name, body in (("killed_worker", KILLED), ("raising_worker", RAISES), ("printing_worker", PRINTS)):
        (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return str(tmp_path)


def test_exit_cause_names_the_signal_or_the_last_error_line() -> None:
    for code in (-9, 137):  # killed directly, or reported through a shell as 128 + 9
        cause = exit_cause(code, "")
        assert cause.startswith("killed by SIGKILL, most likely by the out-of-memory killer") and "GB" in cause
    assert exit_cause(-15, "") == "killed by SIGTERM"
    assert exit_cause(1, "Traceback (most recent call last):\n  ...\nValueError: bad n\n\n") == (
        "exit status 1: ValueError: bad n")
    assert exit_cause(2, "") == "exit status 2, no message"


def test_run_worker_reads_the_json_line_or_raises_the_cause(fake_workers) -> None:
    assert run_worker(sys.executable, "printing_worker", []) == {"trainer": "fake", "n": 64}
    with pytest.raises(WorkerFailed, match="killed by SIGKILL"):
        run_worker(sys.executable, "killed_worker", ["--n", "64"])
    with pytest.raises(WorkerFailed, match=r"^exit status 1: RuntimeError: no activations at /nowhere$"):
        run_worker(sys.executable, "raising_worker", [])


def test_a_failed_trainer_gets_a_note_and_no_row(fake_workers, monkeypatch) -> None:
    monkeypatch.setitem(peers.WORKERS, "saelens", "killed_worker")
    failures: list[str] = []
    rows = peers.measure(Path(sys.executable), ["saelens"], ["--n", "98304"], 2, failures)
    assert rows == [] and len(failures) == 1
    assert failures[0].startswith("saelens at n = 98,304: the worker failed in 2 of 2 round(s) (killed by SIGKILL")
    assert failures[0].endswith("); it has no row (not measured).")
    assert peers.failure_note("saelens", ["--n", "4096", "--store", "s"], ["exit status 1: X"], 3) == (
        "saelens at n = 4,096 (quality run): the worker failed in 1 of 3 round(s) (exit status 1: X); its row is "
        "from the other 2 round(s).")
    machine = {"cpu": "Test CPU", "cores": "2", "load_average": "1.00 / 1.00 / 1.00", "torch": "2.13.0",
               "date": "2026-01-01"}
    text = results.render(machine, "fixed", [], [], [], [98304], failures)
    assert f"- {failures[0]}" in text.split("## Notes", 1)[1]
