"""What both end-to-end workers (`ours_stream`, `sparsify_stream`) share: process settings, flags, the step clock
and the JSON line. Imported first by each, so `configure_process()` runs before torch loads its OpenMP runtime and
both trainers get the same process settings (malloc tuning, passive OpenMP waits).

Timing: a clock records the moment each training step (model forward, when the step needed one, plus the SAEs'
optimiser steps) finished; tokens/s is the tokens of the steps after the first `--warmup-steps` divided by the time
from the end of the last warm-up step to the end of the last step. Every forward pass the timed steps needed falls
inside that window, for both trainers (ours runs its forwards a shuffle block at a time, so the warm-up and the
budget should be whole blocks: `bench/end_to_end.py` checks that).
"""

from __future__ import annotations

from saelab.runtime import configure_process

MALLOC_TUNED = configure_process()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from peerbench.end_to_end_results import ROW_KEYS  # noqa: E402


def parse_args(description: str, extra: dict[str, dict[str, Any]] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="local model folder (save_pretrained layout)")
    parser.add_argument("--case", choices=("one", "all"), default="one",
                        help="one: an SAE on --layer's residual output; all: one SAE per layer, one forward")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n", type=int, default=4096, help="latents per SAE")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=1024, help="tokens per training step (whole contexts)")
    parser.add_argument("--tokens", type=int, default=6144, help="token budget: tokens trained on, warm-up included")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args()
    if args.batch_tokens % args.context_length or args.tokens % args.batch_tokens:
        raise SystemExit("--batch-tokens must be whole contexts and --tokens whole batches")
    if not 0 < args.warmup_steps < args.tokens // args.batch_tokens:
        steps = args.tokens // args.batch_tokens
        raise SystemExit(f"--warmup-steps {args.warmup_steps} leaves no timed step of {steps}")
    return args


def num_layers(model_dir: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_dir).num_hidden_layers)


def layers(args: argparse.Namespace) -> list[int]:
    return [args.layer] if args.case == "one" else list(range(num_layers(args.model)))


class StepClock:
    """`tick()` when a step has finished; `rate()` the tokens/s after the warm-up (see the module docstring)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.started = time.perf_counter()

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def timed(self, warmup: int) -> tuple[int, float]:
        if len(self.ends) <= warmup:
            raise SystemExit(f"only {len(self.ends)} steps ran; need more than the {warmup} warm-up steps")
        return len(self.ends) - warmup, self.ends[-1] - self.ends[warmup - 1]


def report(trainer: str, args: argparse.Namespace, clock: StepClock, d: int, hookpoints: list[str],
           **extra: Any) -> dict[str, Any]:
    """Print and return the worker's JSON line (`ROW_KEYS`, then `extra`)."""
    import transformers

    steps, seconds = clock.timed(args.warmup_steps)
    row = {
        "trainer": trainer, "case": args.case, "hookpoints": len(hookpoints), "d": d, "n": args.n, "k": args.k,
        "context_length": args.context_length, "batch_tokens": args.batch_tokens,
        "tokens_trained": len(clock.ends) * args.batch_tokens, "warmup_steps": args.warmup_steps,
        "timed_steps": steps, "timed_s": round(seconds, 3),
        "tokens_per_s": round(steps * args.batch_tokens / seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "wall_s": round(time.perf_counter() - clock.started, 2),
        "load_average_1min": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "malloc_tuned": MALLOC_TUNED,
        **extra,
    }
    assert set(ROW_KEYS) <= set(row)
    print(json.dumps(row), flush=True)
    return row
