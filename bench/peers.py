"""Our top-k trainer against sparsify, SAELens and dictionary_learning, measured in the same run; writes RESULTS.md.

Every trainer runs in its own process (`peerbench.workers.*`, inside `bench/.peers-venv` so all share one torch)
on identical activations, with the same d, n, k, batch, fp32, Adam and lr; runs alternate across trainers, with
the order rotated each round, so machine drift hits all alike. Quality: FVU on held-out real activations after
the same token budget. Harvesting and evaluation costs run in the project's own venv (`peerbench.model_costs`).

Warm-up: `--warmup` steps at the widest size and proportionally more at narrower ones (at most 8x): a trainer's
first steps page-fault its heap up to its high-water mark, which at n = 4,096 took 4 steps (measured with
getrusage), so one warm-up step would leave those faults in the timed steps of the fast sizes only. At n = 98,304
it takes 2: our second step still faulted 768 MB (196,608 pages) in and ran 4.3 s against 3.3 s for the third,
so the default is 2 at the widest size.

Usage: python bench/peers.py [--sizes 4096,24576,98304] [--steps 3] [--warmup 2] [--rounds 3] [--quick]
                             [--skip-install]
                             [--peers sparsify,saelens,dictionary_learning] [--store DIR] [--no-costs] [--out FILE]
(`make bench-peers` runs it with the defaults; `--quick` is a smoke test: n=4,096 only, few steps.)

`--device cuda` runs on a GPU machine instead: ours (fp32, bf16-exact, autocast) and sparsify's GPU path, with the
Python running this script (which must have sparsify importable), and replaces only the CUDA section of `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from peerbench import cuda_results, end_to_end_results, harvest_results, install, results
from peerbench.launch import WorkerFailed, run_worker

BENCH = Path(__file__).resolve().parent
# Real SmolLM2 resid_post.15 activations: the frontier recipe's reduced store if present, else `make demo`'s.
STORES = [BENCH.parent / "runs" / run / "activations" / "train" for run in ("frontier-reduced", "demo")]
DEFAULT_STORE = next((store for store in STORES if store.exists()), STORES[0])
WORKERS = {
    "ours": "peerbench.workers.ours",
    "sparsify": "peerbench.workers.sparsify",
    "saelens": "peerbench.workers.saelens",
    "dictionary_learning": "peerbench.workers.dictionary_learning",
}
KEPT_SECTIONS = (end_to_end_results.HEADING, harvest_results.HEADING, cuda_results.HEADING)  # written by other runs
PEERS = [name for name in WORKERS if name != "ours"]
# Rows of our worker beside the plain top-k one: other SAE architectures on the same fast path, and other precisions
OURS_VARIANTS = {
    "ours-deep": ["--arch", "deep"],
    "ours-multilayer": ["--arch", "multilayer"],
    "ours-bf16": ["--precision", "bf16-exact"],
    "ours-autocast": ["--precision", "autocast"],
}


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a trainer's rounds: median of medians, worst min, largest RSS, mean load."""
    row = dict(runs[0])
    for key in ("median_tokens_per_s", "encode_median_tokens_per_s", "fvu"):
        if key in row:
            row[key] = statistics.median(r[key] for r in runs)
    row["min_tokens_per_s"] = min(r["min_tokens_per_s"] for r in runs)
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    row["load_average_1min"] = round(statistics.mean(r["load_average_1min"] for r in runs), 2)
    return row


def measure(python: Path, trainers: list[str], argv: list[str], rounds: int,
            failures: list[str] | None = None) -> list[dict[str, Any]]:
    """Each trainer `rounds` times, alternating, the order rotated every round. A trainer whose worker failed gets
    one line in `failures`: how many rounds failed, and why (`launch.exit_cause`)."""
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in trainers}
    failed: dict[str, list[str]] = {t: [] for t in trainers}
    for r in range(rounds):
        for trainer in trainers[r % len(trainers):] + trainers[: r % len(trainers)]:
            module, extra = (WORKERS["ours"], OURS_VARIANTS[trainer]) if trainer in OURS_VARIANTS else (
                WORKERS[trainer], [])
            try:
                result = run_worker(python, module, [*argv, *extra])
            except WorkerFailed as exc:
                failed[trainer].append(str(exc))
                continue
            print(json.dumps(result), flush=True)
            runs[trainer].append(result)
    if failures is not None:
        failures += [failure_note(trainer, argv, causes, rounds) for trainer, causes in failed.items() if causes]
    return [combine(rs) for rs in runs.values() if rs]


def failure_note(trainer: str, argv: list[str], causes: list[str], rounds: int) -> str:
    """One line for RESULTS.md: which worker failed, at which size, in how many rounds, why, and what the row is."""
    size = f" at n = {int(argv[argv.index('--n') + 1]):,}" if "--n" in argv else ""
    data = " (quality run)" if "--store" in argv else ""
    ok = rounds - len(causes)
    row = "it has no row (not measured)" if ok <= 0 else f"its row is from the other {ok} round(s)"
    return (f"{trainer}{size}{data}: the worker failed in {len(causes)} of {rounds} round(s) "
            f"({'; '.join(dict.fromkeys(causes))}); {row}.")


def warmup_steps(widest: int, n: int, sizes: list[int]) -> int:
    """`widest` warm-up steps at the widest size, proportionally more at narrower ones, at most 8x (see above)."""
    return widest * min(8, max(1, max(sizes) // n))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with paths made absolute: the workers run in the bench folder, not the caller's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,24576,98304")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps at the widest size (see above)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="n=4,096 only, 3 steps, 1 warm-up")
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated, from " + ", ".join(PEERS))
    parser.add_argument("--store", default=str(DEFAULT_STORE), help="real activations for the quality run")
    parser.add_argument("--quality-steps", type=int, default=8)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--no-costs", action="store_true", help="skip the SmolLM2 harvesting/evaluation costs")
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"), help="where the table is written")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU rows only, into the CUDA section of --out (see above)")
    args = parser.parse_args(argv)
    args.store, args.out = str(Path(args.store).resolve()), str(Path(args.out).resolve())
    return args


def main() -> None:
    args = parse_args()
    if args.quick:
        args.sizes, args.steps, args.warmup, args.quality_steps = "4096", 3, 1, 4
    sizes = [int(s) for s in args.sizes.split(",")]
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise SystemExit(f"--peers: no worker for {sorted(unknown)}; choose from {PEERS}")
    common = ["--k", str(args.k), "--batch", str(args.batch), "--lr", str(args.lr)]
    warmups = {n: warmup_steps(args.warmup, n, sizes) for n in sizes}
    if args.device == "cuda":
        cuda_section(args, sizes, common, warmups)
        return
    python = install.venv_python() if args.skip_install else install.install(peers)

    speed: list[dict[str, Any]] = []
    failures: list[str] = []
    for n in sizes:
        argv = [*common, "--warmup", str(warmups[n]), "--d", str(args.d), "--n", str(n), "--steps", str(args.steps)]
        speed += measure(python, ["ours", *peers, "ours-deep", "ours-multilayer", "ours-bf16"], argv, args.rounds,
                         failures)
    quality: list[dict[str, Any]] = []
    if not Path(args.store).exists():
        print(f"no activation store at {args.store}: quality (FVU) rows skipped; `make demo` writes one",
              file=sys.stderr)
    else:
        argv = [*common, "--warmup", str(args.warmup), "--n", str(sizes[0]), "--steps", str(args.quality_steps),
                "--store", args.store]
        quality = measure(python, ["ours", *peers, "ours-bf16", "ours-autocast"], argv, 1, failures)
    costs: list[dict[str, Any]] = []
    if not args.no_costs:
        try:
            costs = run_worker(sys.executable, "peerbench.model_costs", [])
        except WorkerFailed as exc:
            failures.append(f"Harvesting and evaluation costs: the worker failed ({exc}); not measured.")

    pins = ", ".join(install.PEER_PINS[p] for p in peers)
    warmup_text = " / ".join(f"{warmups[n]} (n={n:,})" for n in sizes)
    settings = (f"{pins}; TopK, d={args.d} (quality: the store's width), k={args.k}, batch {args.batch}, fp32, "
                f"Adam lr {args.lr}; {args.steps} timed steps after {warmup_text} warm-up, {args.rounds} alternating "
                f"rounds; quality: {args.quality_steps} steps on {args.store}")
    text = results.render(results.machine_info(), settings, speed, quality, costs, sizes, failures)
    # the sections of bench/end_to_end.py and bench/harvest.py survive a rerun
    kept = [end_to_end_results.read_section(args.out, heading) for heading in KEPT_SECTIONS]
    Path(args.out).write_text(text)
    for section in kept:
        if section is not None:
            end_to_end_results.write_section(args.out, section)
    print(text)


def cuda_section(args: argparse.Namespace, sizes: list[int], common: list[str], warmups: dict[int, int]) -> None:
    """The GPU rows, measured as the CPU ones are, written into the CUDA section of `args.out`."""
    import datetime

    import torch

    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for n in sizes:
        argv = [*common, "--warmup", str(warmups[n]), "--d", str(args.d), "--n", str(n), "--steps", str(args.steps),
                "--device", "cuda"]
        rows += measure(Path(sys.executable), cuda_results.TRAINERS, argv, args.rounds, failures)
    gpu = {"gpu": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    settings = (f"{install.PEER_PINS['sparsify']}; TopK, d={args.d}, k={args.k}, batch {args.batch}, Adam lr "
                f"{args.lr}; {args.steps} timed steps after " + " / ".join(f"{warmups[n]} (n={n:,})" for n in sizes)
                + f" warm-up, {args.rounds} alternating rounds, synthetic activations")
    section = cuda_results.render(gpu, settings, rows, sizes, failures)
    end_to_end_results.write_section(args.out, section)
    print(section)


if __name__ == "__main__":
    main()
