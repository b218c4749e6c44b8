"""One shape for every run folder, whatever produced it.

- `config.json`: the config the run was started with (every field, so the command can be replayed);
- `summary.json`: the headline results, with the timings of each stage, the config and the provenance (versions,
  git commit) that produced them;
- `report.html`: the human-readable page, where the run writes one;
- `done/<stage>.json`: a done-marker per finished stage, holding that stage's result. A rerun in the same folder
  reads the marker instead of redoing the stage, so an interrupted run resumes at the first unfinished stage.

Stage names may contain `/` (e.g. `saes/shallow-k16/evaluate`); markers are written atomically, so a marker that
exists is complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from saelab.config import Config
from saelab.errors import CheckpointError
from saelab.io import atomic_write_json
from saelab.provenance import provenance

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
DONE_DIR = "done"

T = TypeVar("T")


class RunFolder:
    """A run folder: its config, summary, report path, done-markers and stage timings (`lap`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    @classmethod
    def start(cls, cfg: Config) -> RunFolder:
        """The run folder `cfg.out_dir`, with `cfg` saved as its `config.json` (how every command opens its folder)."""
        folder = cls(cfg.out_dir)
        folder.save_config(cfg)
        return folder

    # ---- files ---------------------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE

    def save_config(self, cfg: Config | dict[str, Any]) -> None:
        data = cfg.to_dict() if isinstance(cfg, Config) else cfg
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, data)

    def check_config(self, request: dict[str, Any], ignore: frozenset[str] = frozenset(), record: bool = True) -> None:
        """Refuse a folder whose `config.json` records another request (keys in `ignore` may differ), then record
        this one (unless `record` is False: a process that only reads the folder). Protects a resumable folder
        from silently answering a different question with old results."""
        if self.config_path.exists():
            saved = json.loads(self.config_path.read_text())
            differ = sorted(k for k in saved.keys() | request.keys()
                            if k not in ignore and _jsonable(saved.get(k)) != _jsonable(request.get(k)))
            if differ:
                raise CheckpointError(
                    f"{self.path} holds a run of another request ({', '.join(differ)} differ, see "
                    f"{self.config_path}); delete that folder to redo it, or choose another output folder"
                )
        if record:
            self.save_config(request)

    def write_summary(self, summary: dict[str, Any], cfg: Config | None = None) -> dict[str, Any]:
        """Write `summary.json`: `summary` plus the stage timings, the config (when given) and the provenance."""
        full = {**summary, "timings_s": dict(self.timings)}
        if cfg is not None:
            full["config"] = cfg.to_dict()
        full.setdefault("provenance", provenance())
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.summary_path, full)
        return full

    def read_summary(self) -> dict[str, Any] | None:
        return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else None

    # ---- done-markers --------------------------------------------------------------------------------------
    def marker(self, stage: str) -> Path:
        return self.path / DONE_DIR / f"{stage}.json"

    def is_done(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def result(self, stage: str) -> Any:
        """What the finished `stage` recorded (None for a stage not done)."""
        path = self.marker(stage)
        return json.loads(path.read_text()) if path.exists() else None

    def mark_done(self, stage: str, result: Any = None) -> None:
        atomic_write_json(self.marker(stage), result)

    def once(self, stage: str, compute: Callable[[], T]) -> T:
        """`compute()` the first time; afterwards the JSON result its done-marker recorded."""
        if self.is_done(stage):
            return self.result(stage)
        value = compute()
        self.mark_done(stage, value)
        return value

    # ---- timings -------------------------------------------------------------------------------------------
    def lap(self, stage: str) -> float:
        """Record the wall time since the previous lap (or since the folder was opened) under `stage`."""
        now = time.perf_counter()
        self.timings[stage] = round(now - self._last, 2)
        self._last = now
        log.info("%s done in %.1fs", stage, self.timings[stage])
        return self.timings[stage]


def _jsonable(value: Any) -> Any:
    """Compare values as JSON would store them (tuples become lists)."""
    return json.loads(json.dumps(value))
