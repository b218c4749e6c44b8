"""What every trainer worker shares: arguments, identical activations, the step clock, FVU and the JSON line.

Each worker imports this module first: `configure_process()` must run before torch loads its OpenMP runtime, and
every trainer gets the same process settings (malloc tuning, passive OpenMP waits), so no library is measured
under a handicap ours is spared.
"""

from __future__ import annotations

from saelab.runtime import configure_process

MALLOC_TUNED = configure_process()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from saelab.metrics import fraction_of_variance_unexplained  # noqa: E402


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--d", type=int, default=768, help="ignored with --store (the store's width is used)")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default=None, help="train on this activation store's first hookpoint")
    parser.add_argument("--eval-rows", type=int, default=4096, help="rows held out for FVU")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


class Activations:
    """Batches every trainer sees identically: synthetic Gaussian (two fixed-seed batches, alternated) or the
    store's rows normalised to E||x|| = sqrt(d), read in order, with the last `eval_rows` held out for FVU."""

    def __init__(self, args: argparse.Namespace) -> None:
        gen = torch.Generator().manual_seed(args.seed)
        if args.store is None:
            self.train = torch.randn(2 * args.batch, args.d, generator=gen)
            self.eval = torch.randn(args.eval_rows, args.d, generator=gen)
        else:
            from saelab.activations.store import ActivationStore

            store = ActivationStore(args.store)
            rows = store.load(store.hookpoints[0], normalize=True)
            if rows.shape[0] < args.eval_rows + args.batch:
                raise SystemExit(f"store {args.store} has {rows.shape[0]} rows; need eval_rows + one batch")
            self.train, self.eval = rows[: -args.eval_rows], rows[-args.eval_rows :]
        self.batch = args.batch
        self.device = torch.device(args.device)
        self.train, self.eval = self.train.to(self.device), self.eval.to(self.device)

    @property
    def d(self) -> int:
        return self.train.shape[1]

    def __getitem__(self, step: int) -> Tensor:
        per_epoch = self.train.shape[0] // self.batch
        start = (step % per_epoch) * self.batch
        return self.train[start : start + self.batch]


class StepClock:
    """Yields warmup + steps + 1 batches and times what the consumer does between two pulls: one training step each.

    Every trainer trains on all of them (the same token budget); the last step is left untimed because a trainer's
    own loop (ours: `Trainer.fit`) stops on its token budget without pulling again.

    Driving a trainer's own loop this way (ours: `Trainer.fit`) times everything that loop does per step.
    """

    def __init__(self, data: Activations, args: argparse.Namespace) -> None:
        self.data = data
        self.warmup, self.steps = args.warmup, args.steps
        self.count = args.warmup + args.steps + 1
        self.step_s: list[float] = []

    def _now(self) -> float:
        if self.data.device.type == "cuda":
            torch.cuda.synchronize(self.data.device)
        return time.perf_counter()

    def __iter__(self) -> Iterator[Tensor]:
        for step in range(self.count):
            x = self.data[step]
            start = self._now()
            yield x
            self.step_s.append(self._now() - start)

    def timed(self) -> list[float]:
        """Seconds of the steps after warmup."""
        return self.step_s[self.warmup : self.warmup + self.steps]


def drive(step: Callable[[Tensor], None], clock: StepClock) -> None:
    """The peers' loop: one call of their training step per batch."""
    for x in clock:
        step(x)


def fvu(reconstruct: Callable[[Tensor], Tensor], data: Activations) -> float:
    with torch.no_grad():
        return float(fraction_of_variance_unexplained(data.eval, reconstruct(data.eval)))


def peak_rss_mb() -> float:
    """The process's resident-set high-water mark so far (ru_maxrss), in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def report(trainer: str, args: argparse.Namespace, data: Activations, clock: StepClock, eval_fvu: float,
           training_peak_rss_mb: float | None = None, **extra: float | str | bool) -> dict:
    """Print and return the worker's JSON line. `training_peak_rss_mb`: the peak taken after training and its
    FVU, for a worker that measures more afterwards (default: the peak now)."""
    timed = clock.timed()
    if not timed:
        raise SystemExit(f"no timed steps: steps={args.steps} after warmup={args.warmup}")
    result = {
        "trainer": trainer,
        "d": data.d, "n": args.n, "k": args.k, "batch": args.batch, "steps": len(timed), "warmup": args.warmup,
        "data": "synthetic" if args.store is None else f"store:{args.store}",
        "tokens_trained": clock.count * args.batch,
        "median_tokens_per_s": round(args.batch / statistics.median(timed), 1),
        "min_tokens_per_s": round(args.batch / max(timed), 1),
        "peak_rss_mb": peak_rss_mb() if training_peak_rss_mb is None else training_peak_rss_mb,
        "fvu": round(eval_fvu, 5),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "threads": torch.get_num_threads(),
        "malloc_tuned": MALLOC_TUNED,
        "torch": torch.__version__,
        **({"peak_cuda_mb": round(torch.cuda.max_memory_allocated(data.device) / 2**20, 1)}
           if data.device.type == "cuda" else {}),
        **extra,
    }
    print(json.dumps(result), flush=True)
    return result
