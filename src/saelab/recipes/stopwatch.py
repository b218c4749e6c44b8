"""Wall time per recipe stage, logged as each stage ends and saved with the results."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Stopwatch:
    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> float:
        """Record the time since the previous lap under `stage`."""
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now
        log.info("%s done in %.1fs", stage, self.seconds[stage])
        return self.seconds[stage]
