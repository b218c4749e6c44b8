"""Run one benchmark worker in its own process and read its JSON line; a worker that fails says why in one line.

A row the table lacks must carry its cause: at n = 98,304 SAELens' worker needs about 24 GB (its dense
[batch, n] activations and their gradients), as much as a 24 GB machine has, and the kernel's out-of-memory
killer ends it with SIGKILL, which leaves no Python traceback behind.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1]


class WorkerFailed(RuntimeError):
    """A worker exited without its JSON line; the message is the cause, in one line."""


def machine_memory_gb() -> float | None:
    """Physical memory in GB (10^9 bytes), None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        return None


def exit_cause(returncode: int, stderr: str) -> str:
    """Why a worker failed: the signal that ended it (SIGKILL named as the out-of-memory killer's, the usual
    sender when nobody else kills it), or its last stderr line (a Python exception's own message)."""
    if returncode < 0 or returncode > 128:  # killed: by a signal directly, or through a shell (128 + signal)
        number = -returncode if returncode < 0 else returncode - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGKILL:
            memory = machine_memory_gb()
            return (f"killed by {name}, most likely by the out-of-memory killer (this machine has "
                    f"{memory:.1f} GB of memory)" if memory else f"killed by {name}, most likely out of memory")
        return f"killed by {name}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"exit status {returncode}: {lines[-1][:200]}" if lines else f"exit status {returncode}, no message"


def run_worker(python: Path | str, module: str, argv: list[str], env: dict[str, str] | None = None,
               timeout: float | None = None) -> Any:
    """The worker's last stdout line, parsed (its JSON object or list); raises WorkerFailed (after showing its
    stderr tail) when it failed, timed out or printed nothing."""
    command = f"{module} {shlex.join(argv)}"
    try:
        proc = subprocess.run([str(python), "-m", module, *argv], cwd=BENCH, capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise WorkerFailed(f"timed out after {timeout} s") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(f"{command} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        raise WorkerFailed(exit_cause(proc.returncode, proc.stderr))
    return json.loads(lines[-1])
