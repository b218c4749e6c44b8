"""The one run-folder shape: config, summary with provenance and timings, done-markers that make reruns skip."""

from __future__ import annotations

import json

import pytest

from saelab.errors import CheckpointError
from saelab.run_folder import RunFolder
from saelab.saes.spec import SAESpec


def test_config_summary_and_timings(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.save_config(SAESpec(n_latents=8))
    folder.lap("first")
    summary = folder.write_summary({"fvu": 0.25}, SAESpec(n_latents=8))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and saved["fvu"] == 0.25
    assert set(saved["timings_s"]) == {"first"} and saved["config"]["n_latents"] == 8
    assert {"versions", "git_commit"} <= set(saved["provenance"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n_latents"] == 8
    assert folder.report_path == tmp_path / "run" / "report.html"


def test_once_computes_a_stage_a_single_time(tmp_path) -> None:
    calls: list[int] = []

    def compute() -> dict[str, int]:
        calls.append(1)
        return {"value": len(calls)}

    first = RunFolder(tmp_path).once("saes/a/evaluate", compute)
    again = RunFolder(tmp_path).once("saes/a/evaluate", compute)  # a rerun: a fresh object on the same folder
    assert first == again == {"value": 1} and len(calls) == 1
    assert RunFolder(tmp_path).is_done("saes/a/evaluate") and not RunFolder(tmp_path).is_done("saes/b/evaluate")
    assert RunFolder(tmp_path).result("missing") is None


def test_a_failed_stage_leaves_no_marker(tmp_path) -> None:
    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        RunFolder(tmp_path).once("stage", fail)
    assert not RunFolder(tmp_path).is_done("stage")


def test_another_request_is_refused_but_ignored_keys_may_change(tmp_path) -> None:
    folder = RunFolder(tmp_path)
    folder.check_config({"a": 1, "note": "x"}, ignore=frozenset({"note"}))
    folder.check_config({"a": 1, "note": "y"}, ignore=frozenset({"note"}))
    with pytest.raises(CheckpointError, match="a differ"):
        folder.check_config({"a": 2, "note": "y"}, ignore=frozenset({"note"}))
