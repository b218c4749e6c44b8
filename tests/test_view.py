"""`saelab view`: a real subprocess serving a run folder on 127.0.0.1, fetched over HTTP, stopped with SIGINT."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from saelab.cli import main
from saelab.report.serve import make_server


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "features" / "data").mkdir(parents=True)
    (run / "report.html").write_text('<!DOCTYPE html><title>r</title><a href="features/index.html">browse</a>')
    (run / "features" / "index.html").write_text(
        '<!DOCTYPE html><title>f</title><script src="data/index.js"></script>')
    (run / "features" / "data" / "index.js").write_text("document.title = 'loaded ' + (6 * 7);")
    return run


def _view(run: Path, **popen: object) -> subprocess.Popen:
    """`saelab view run` as its own process (this checkout's package first on its path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "saelab", "view", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def test_view_serves_the_folder_until_interrupted(tmp_path: Path, open_page) -> None:
    run = _run_folder(tmp_path)
    process = _view(run)
    try:
        first = process.stdout.readline()
        match = re.fullmatch(r"serving (.+) at (http://127\.0\.0\.1:(\d+)/) \(Ctrl-C stops\)\n", first)
        assert match and Path(match.group(1)) == run.resolve() and int(match.group(3)) > 0
        url = match.group(2)
        assert [process.stdout.readline().strip() for _ in range(2)] == [f"{url}report.html",
                                                                         f"{url}features/index.html"]
        with urllib.request.urlopen(url + "report.html", timeout=10) as response:
            assert response.status == 200 and b"features/index.html" in response.read()
        page, _ = open_page(url + "features/index.html")  # loads its data script over HTTP too
        assert page.evaluate("document.title") == "loaded 42"
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + "nothing.html", timeout=10)
        assert missing.value.code == 404
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0 and err.strip().endswith("stopped")


def test_a_missing_folder_or_busy_port_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["view", str(tmp_path / "nope")]) == 2
    assert "is not a folder; pass a run folder" in capsys.readouterr().err
    server = make_server(tmp_path)
    try:
        assert main(["view", str(tmp_path), "--port", str(server.server_address[1])]) == 2
        assert "choose another --port, or 0 for a free one" in capsys.readouterr().err
    finally:
        server.server_close()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_view_stops_even_when_started_with_sigint_ignored(tmp_path: Path, stop: signal.Signals) -> None:
    """A child started with SIGINT ignored inherits that, and Python then installs no Ctrl-C handler of its own: the
    server sets one, so SIGINT (and SIGTERM) still stop it cleanly."""
    run = _run_folder(tmp_path)
    process = _view(run, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert process.stdout.readline().startswith("serving ")
    finally:
        process.send_signal(stop)
        try:
            _, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0 and err.strip().endswith("stopped")
