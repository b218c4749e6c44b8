"""End to end, model -> trained SAEs: saelab's streamed training against sparsify's own training loop.

Both start from the same local model folder (default: the offline SmolLM2-135M, `load_model("smollm2-135m")`'s
cache), the same contexts (the built-in KJV corpus, tokenised once here by `saelab.data.tokenize.build_contexts`
into `--tokens / --context-length` contexts; ours re-packs them through `saelab train`'s own path and the worker
checks that their sha256 matches), the same k, latents, batch in tokens and token budget, Adam at the same lr,
fp32, every position trained on. Each trainer runs in its own process (`peerbench.workers.ours_stream`:
`train_streamed`, what `saelab train --model` runs; `peerbench.workers.sparsify_stream`: `sparsify.Trainer.fit`
in `bench/.peers-venv`), in two cases: (a) one SAE on resid_post.L (sparsify: `layers.L`); (b) one SAE per layer,
all fed by one forward pass per batch. Reported per run: tokens/s (model forward + training over the steps after
the warm-up) and peak RSS (ru_maxrss of the worker process); targets: ours ≥ 1.5× sparsify's tokens/s at ≤ 0.6×
its peak RSS. When `src/saelab/training/distributed.py` exists, ours is also run as `saelab train` on 1 rank and
as `torchrun --nproc-per-node 2 -m saelab train` on 2.

Writes (or replaces) the "End to end (model -> SAEs)" section of bench/RESULTS.md and prints one JSON line last.
The defaults (4 timed steps of 1,024 tokens after 2 warm-up steps, per run) took 11.5 min for the four trainer
runs on the 2-core AVX2 machine at a load average of 4-8 (other jobs running), plus 6.5 min for the four rank runs
(`--no-ranks` skips them, `--rank-cases one` keeps the cheap half); an idle machine needs well under 10 min.

Usage: .venv/bin/python bench/end_to_end.py [--cases one,all] [--n 4096] [--k 32] [--layer 15] [--tokens 6144]
           [--batch-tokens 1024] [--context-length 128] [--buffer-tokens 2048] [--warmup-steps 2] [--rounds 1]
           [--no-sparsify] [--no-ranks] [--rank-cases one,all] [--model smollm2-135m]
           [--out bench/RESULTS.md | --no-write]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from peerbench import end_to_end_results  # noqa: E402
from peerbench.launch import WorkerFailed, run_worker  # noqa: E402

PEERS_PYTHON = BENCH / ".peers-venv" / "bin" / "python"
DISTRIBUTED = REPO / "src" / "saelab" / "training" / "distributed.py"
SPARSIFY_ENV = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}  # no CUDA: its eager decoder, not the Triton one
WORKERS = {"ours": "peerbench.workers.ours_stream", "sparsify": "peerbench.workers.sparsify_stream"}


def machine() -> dict[str, str]:
    """CPU model, cores, the vector and matrix ISA flags the CPU has (lscpu: avx2, avx512*, amx*; bf16 GEMM needs
    avx512_bf16 or amx_bf16) and torch's capability, load, torch, date."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        isa = sorted({word for word in flags.replace(",", " ").split()
                      if word == "avx2" or word.startswith(("avx512", "amx"))})
    except (OSError, subprocess.CalledProcessError):
        isa = []
    return {"cpu": cpu, "cores": str(os.cpu_count()),
            "isa": f"{' '.join(isa) or 'no avx2/avx512/amx'} (torch uses {torch.backends.cpu.get_cpu_capability()})",
            "load_average": " / ".join(f"{v:.2f}" for v in os.getloadavg()), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def model_folder(name: str) -> str:
    """The local folder both trainers load: the offline default's cache folder, or the path given."""
    from saelab.models.loading import OFFLINE_DEFAULT_MODEL, offline_model_dir

    if name == OFFLINE_DEFAULT_MODEL:
        return str(offline_model_dir())
    if not Path(name).is_dir():
        raise SystemExit(f"--model {name}: give {OFFLINE_DEFAULT_MODEL!r} or a local model folder (save_pretrained)")
    return str(Path(name).resolve())


def data_config(source: str, context_length: int, tokens: int):  # -> DataConfig
    """The contexts both trainers see: `tokens / context_length` packed contexts, BOS first, every position kept."""
    from saelab.data.tokenize import DataConfig

    return DataConfig(source=source, context_length=context_length, n_tokens=tokens, prepend_bos=True,
                      exclude_special_tokens=False)


def tokenise(model: str, source: str, context_length: int, tokens: int, out_dir: str | Path) -> tuple[Path, str]:
    """Tokenise once: the contexts as an int64 `.npy` in `out_dir`, and their sha256 (as `train_streamed` hashes)."""
    import numpy as np
    from transformers import AutoTokenizer

    from saelab.data.tokenize import build_contexts

    contexts = build_contexts(data_config(source, context_length, tokens), AutoTokenizer.from_pretrained(model))
    path = Path(out_dir) / "contexts.npy"
    np.save(path, contexts.numpy())
    return path, hashlib.sha256(contexts.numpy().tobytes()).hexdigest()


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a trainer's rounds: median tokens/s, largest peak RSS, mean load."""
    row = dict(runs[0])
    row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    row["load_average_1min"] = round(statistics.mean(r["load_average_1min"] for r in runs), 2)
    row["rounds"] = len(runs)
    return row


def rank_runs(args: argparse.Namespace, model: str, layers: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Ours as `saelab train --config` on 1 rank and under `torchrun --nproc-per-node 2`: whole-command tokens/s."""
    from saelab.saes.spec import SAESpec
    from saelab.training.config import TrainerConfig
    from saelab.training.entry import TrainConfig

    rows = []
    for case, case_layers in layers.items():
        for ranks in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(
                    model=model, hookpoints=[f"resid_post.{layer}" for layer in case_layers], out_dir=f"{tmp}/run",
                    buffer_tokens=args.buffer_tokens, contexts_per_forward=args.batch_tokens // args.context_length,
                    data=data_config(args.source, args.context_length, args.tokens),
                    sae=SAESpec(architecture="topk", n_latents=args.n, k=args.k),
                    trainer=TrainerConfig(total_tokens=args.tokens, batch_size=args.batch_tokens, lr=args.lr,
                                          warmup_steps=0, decay_fraction=0.0, grad_clip_norm=None,
                                          checkpoint_every_steps=None, log_every_steps=10**9, progress=False),
                )
                cfg.save(f"{tmp}/train.json")
                launch = ([sys.executable, "-m", "saelab"] if ranks == 1 else
                          [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "saelab"])
                # A fresh parent per run, so RUSAGE_CHILDREN's ru_maxrss is this command's largest process alone.
                probe = ("import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                         "print(json.dumps({'rc': rc, 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, "-c", probe, *launch, "train", "--config", f"{tmp}/train.json"],
                                      cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
                wall = time.perf_counter() - started
                result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {"rc": -1}
                if result["rc"] != 0:
                    print(f"{ranks}-rank saelab train failed (rc {result['rc']}):\n{proc.stderr[-3000:]}",
                          file=sys.stderr)
                    continue
                rows.append({"case": case, "ranks": ranks, "tokens": args.tokens, "wall_s": round(wall, 2),
                             "tokens_per_s": round(args.tokens / wall, 2),
                             "peak_rss_mb": round(result["rss"] / 1024, 1)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (the offline cache) or a local folder")
    parser.add_argument("--source", default="kjv", help="corpus (saelab.data.corpora)")
    parser.add_argument("--cases", default="one,all", help="one: an SAE on --layer; all: one SAE per layer")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n", type=int, default=4096, help="latents per SAE")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=1024, help="tokens per step (whole contexts)")
    parser.add_argument("--tokens", type=int, default=6144, help="token budget per run, warm-up included")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--buffer-tokens", type=int, default=2048,
                        help="ours: shuffle buffer per hookpoint; the warm-up and budget should be whole buffers")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rounds", type=int, default=1, help="runs per trainer and case, alternating")
    parser.add_argument("--ours-python", default=sys.executable, help="python that runs our worker")
    parser.add_argument("--peers-python", default=str(PEERS_PYTHON), help="python with eai-sparsify")
    parser.add_argument("--no-sparsify", action="store_true")
    parser.add_argument("--no-ranks", action="store_true", help="skip the 1 vs 2 ranks runs")
    parser.add_argument("--rank-cases", default=None, help="cases of the rank runs (default: --cases)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per worker run")
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    steps = args.tokens // args.batch_tokens
    if args.batch_tokens % args.context_length or args.tokens % args.batch_tokens or not 0 < args.warmup_steps < steps:
        raise SystemExit("--batch-tokens must be whole contexts, --tokens whole batches, and --warmup-steps leave "
                         "at least one timed step")
    block = max(1, args.buffer_tokens // args.batch_tokens)
    if args.warmup_steps % block or steps % block:
        print(f"warning: ours computes its forwards {block} steps at a time (--buffer-tokens); with "
              f"--warmup-steps {args.warmup_steps} and {steps} steps the timed window holds a partial block",
              file=sys.stderr)
    args.out = str(Path(args.out).resolve())
    return args


def main() -> None:
    args = parse_args()
    model = model_folder(args.model)
    cases = [c for c in args.cases.split(",") if c]
    from transformers import AutoConfig

    n_layers = int(AutoConfig.from_pretrained(model).num_hidden_layers)
    layers = {"one": [args.layer], "all": list(range(n_layers))}
    layers = {case: layers[case] for case in cases}
    trainers = ["ours"]
    notes: list[str] = []
    if not args.no_sparsify:
        probe = subprocess.run([args.peers_python, "-c", "import sparsify"], capture_output=True, env=SPARSIFY_ENV) \
            if Path(args.peers_python).exists() else None
        if probe is None or probe.returncode != 0:
            notes.append(f"sparsify not measured: {args.peers_python} cannot import it "
                         "(`python3 bench/peerbench/install.py sparsify` builds bench/.peers-venv)")
            print(notes[-1], file=sys.stderr)
        else:
            trainers.append("sparsify")

    with tempfile.TemporaryDirectory() as tmp:
        contexts, sha = tokenise(model, args.source, args.context_length, args.tokens, tmp)
        common = ["--model", model, "--layer", str(args.layer), "--n", str(args.n), "--k", str(args.k),
                  "--context-length", str(args.context_length), "--batch-tokens", str(args.batch_tokens),
                  "--tokens", str(args.tokens), "--warmup-steps", str(args.warmup_steps), "--lr", str(args.lr)]
        extra = {"ours": ["--source", args.source, "--buffer-tokens", str(args.buffer_tokens), "--expect-sha256", sha],
                 "sparsify": ["--contexts", str(contexts)]}
        python = {"ours": args.ours_python, "sparsify": args.peers_python}
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {(c, t): [] for c in cases for t in trainers}
        for r in range(args.rounds):
            for i, case in enumerate(cases):
                shift = (r + i) % len(trainers)
                for trainer in trainers[shift:] + trainers[:shift]:  # alternate who goes first
                    try:
                        row = run_worker(python[trainer], WORKERS[trainer],
                                         [*common, "--case", case, *extra[trainer]], env=SPARSIFY_ENV,
                                         timeout=args.timeout)
                    except WorkerFailed as exc:
                        notes.append(f"{trainer}, case {case}, round {r + 1}: the worker failed ({exc})")
                        continue
                    print(json.dumps(row), flush=True)
                    runs[(case, trainer)].append(row)
    rows = [combine(rs) for rs in runs.values() if rs]

    rank_rows: list[dict[str, Any]] = []
    if args.no_ranks:
        notes.append("1 vs 2 ranks: not run (--no-ranks)")
    elif not DISTRIBUTED.exists():
        notes.append("1 vs 2 ranks: not available (src/saelab/training/distributed.py does not exist yet)")
        print(notes[-1], file=sys.stderr)
    else:
        rank_cases = [c for c in (args.rank_cases or args.cases).split(",") if c]
        rank_rows = rank_runs(args, model, {case: ({"one": [args.layer], "all": list(range(n_layers))})[case]
                                            for case in rank_cases})

    info = machine()
    steps = args.tokens // args.batch_tokens
    settings = (f"model {Path(model).name} ({model}), fp32; corpus {args.source}, {args.tokens // args.context_length} "
                f"contexts of {args.context_length} tokens (sha256 {sha[:12]}), every position trained on; TopK SAEs, "
                f"n={args.n:,}, k={args.k}, batch {args.batch_tokens:,} tokens, Adam lr {args.lr} "
                f"(ours constant, sparsify its linear decay); "
                f"{steps - args.warmup_steps} timed steps after {args.warmup_steps} warm-up steps per run, "
                f"{args.rounds} round(s); ours: shuffle buffer {args.buffer_tokens:,} tokens per hookpoint; "
                f"(a) layer {args.layer}, (b) all {n_layers} layers")
    notes = [*notes,
             "ours stops each forward after the deepest hookpoint; sparsify runs the whole model (lm_head included) "
             "under its hooks, as its loop does.",
             "sparsify on CPU: built as sparsify.Trainer(cfg, dataset, model) with the model on CPU (its CLI pins "
             "cuda:{rank}); SPARSIFY_DISABLE_TRITON=1 (eager decoder); its tqdm replaced by a silent one that stamps "
             "step ends; nothing else patched."]
    verdicts = end_to_end_results.targets(rows)
    if not args.no_write:
        end_to_end_results.write_section(args.out, end_to_end_results.render(info, settings, rows, notes, rank_rows))
        print(f"wrote the end-to-end section of {args.out}", file=sys.stderr)
    for t in verdicts:
        state = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"case {t['case']}: {t['name']} = {t['measured']} (required {t['required']}): {state}", file=sys.stderr)
    print(json.dumps({"machine": info, "settings": settings, "rows": rows, "ranks": rank_rows, "targets": verdicts,
                      "targets_met": all(t["met"] for t in verdicts) if verdicts else None, "notes": notes}),
          flush=True)


if __name__ == "__main__":
    main()
