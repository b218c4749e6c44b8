"""Training metrics: one JSON object per log step in `metrics.jsonl` (always), mirrored to W&B when asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError
from saelab.io import atomic_write_text


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (one per log step: step, tokens, loss, fvu, l0, dead_fraction, ...); the one
    place that file is parsed."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """With `write=False` (a non-primary process of a sharded run) it leaves the file (and W&B) alone."""

    def __init__(self, path: Path, wandb_project: str | None = None, wandb_run_name: str | None = None,
                 wandb_config: dict[str, Any] | None = None, write: bool = True) -> None:
        self.path = Path(path)
        self.write = write
        self._wandb_args = (wandb_project, wandb_run_name, wandb_config)
        self._wandb: Any = None
        if wandb_project is not None:
            try:
                import wandb  # noqa: F401  (checked now so a missing package fails before training starts)
            except ImportError:
                raise ConfigError(
                    "wandb_project is set but wandb is not installed; `pip install saelab[wandb]` or unset it"
                ) from None

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def keep_until(self, step: int) -> list[dict[str, Any]]:
        """Drop records after `step` (a resumed run re-logs them); returns the kept ones."""
        if not self.write:
            return []
        kept = [r for r in self.records() if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def log(self, record: dict[str, Any]) -> None:
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._wandb_args[0] is not None:
            self._wandb_run().log(record, step=record["step"])

    def _wandb_run(self) -> Any:
        if self._wandb is None:
            import wandb

            project, name, config = self._wandb_args
            self._wandb = wandb.init(project=project, name=name, config=config, dir=str(self.path.parent))
        return self._wandb

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
