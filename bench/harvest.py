"""Harvest (model forward): fp32 and bf16 tokens/s and achieved GFLOP/s against the fp32 GEMM roofline measured in
the same run, and the activation drift bf16 causes.

The forward is `capture(..., stop_early=True)` at `--hookpoints` (what `saelab harvest` and `saelab train --model`
run per batch of `--batch` contexts) on the built-in KJV corpus, tokenised by `build_contexts` with the default
position rules (BOS and the first two positions dropped). Before each timed batch the fp32 roofline is sampled (a
2048³ `torch.mm`, best of 3, same threads), so every batch's GFLOP/s (`saelab.models.flops`) is set against the
machine's ceiling under the same load (the machine is shared); medians over the batches are reported. fp32 runs
`--tokens` tokens, then `saelab.activations.harvest.harvest` over the same contexts gives the tokens/s with hooks
and store writes included; bf16 runs the first `--bf16-tokens` of them (on CPUs without avx512_bf16 / amx_bf16,
torch's bf16 GEMM is far slower than fp32, so fewer tokens keep the run short). Drift: ‖a_bf16 − a_fp32‖ / ‖a_fp32‖
of the kept rows per hookpoint (and the median of the same ratio per token); with `--sae` (an fp32-trained SAE of
one of the hookpoints), its FVU (`saelab.evaluation.evaluate_reconstruction`) on the fp32 rows and on the bf16 rows
of the same tokens.

The defaults took about 4 min on the 2-core AVX2 machine at a load average of 6-7 (other jobs running; most of it
is the bf16 forward, 5x slower than fp32 there).
Writes (or replaces) the "Harvest (model forward)" section of bench/RESULTS.md and prints one JSON line last.

Usage: .venv/bin/python bench/harvest.py [--model smollm2-135m] [--source kjv]
           [--hookpoints resid_post.3,resid_post.7,resid_post.11,resid_post.15] [--tokens 4096] [--bf16-tokens 2048]
           [--context-length 128] [--batch 8] [--roofline-side 2048] [--sae runs/demo/train/sae]
           [--out bench/RESULTS.md | --no-write]
"""

from __future__ import annotations

from saelab.runtime import configure_process

configure_process()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from end_to_end import machine  # noqa: E402
from peerbench import end_to_end_results, harvest_results  # noqa: E402

from saelab.activations.harvest import HarvestConfig, harvest  # noqa: E402
from saelab.data.tokenize import DataConfig, build_contexts, context_mask  # noqa: E402
from saelab.evaluation import evaluate_reconstruction  # noqa: E402
from saelab.models.flops import forward_flops_per_token  # noqa: E402
from saelab.models.hooks import capture  # noqa: E402
from saelab.models.loading import load_model  # noqa: E402
from saelab.saes import load_sae  # noqa: E402

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def best_gflops(fn: Callable[[], Any], flops: float, repeats: int = 3) -> float:
    """The fastest of `repeats` calls, in GFLOP/s."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def roofline(side: int) -> float:
    """The fp32 GEMM ceiling: a square `torch.mm` of `side`, large enough for the peak (2048 on CPUs)."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    return best_gflops(lambda: torch.mm(a, b), 2.0 * side**3)


def gemm_at(rows: int, d: int, width: int, dtype: torch.dtype) -> float:
    """A Linear's GEMM ([rows, d] by a [width, d] weight) in `dtype`: what the model's MLP up-projection runs."""
    x, w = torch.randn(rows, d).to(dtype), torch.randn(width, d).to(dtype)
    return best_gflops(lambda: torch.nn.functional.linear(x, w), 2.0 * rows * d * width, repeats=2)


def timed_forwards(model: torch.nn.Module, contexts: torch.Tensor, keep: torch.Tensor, hookpoints: list[str],
                   batch: int, flops_per_token: float,
                   roof_side: int) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Per batch: the roofline sampled just before, then the timed forward; and the kept rows of every hookpoint."""
    capture(model, contexts[:1], hookpoints)  # warm-up: one-time allocations and kernel choices
    samples, rows = [], {hp: [] for hp in hookpoints}
    for first in range(0, len(contexts), batch):
        ids = contexts[first : first + batch]
        roof = roofline(roof_side)
        start = time.perf_counter()
        acts = capture(model, ids, hookpoints, stop_early=True)
        seconds = time.perf_counter() - start
        gflops = flops_per_token * ids.numel() / seconds / 1e9
        samples.append({"tokens_per_s": ids.numel() / seconds, "gflops": gflops, "roofline": roof,
                        "fraction": gflops / roof})
        for hp, x in acts.items():
            rows[hp].append(x[keep[first : first + batch]].float())
    return samples, {hp: torch.cat(parts) for hp, parts in rows.items()}


def summarise(dtype: str, tokens: int, samples: list[dict[str, float]]) -> dict[str, Any]:
    def median(key: str) -> float:
        return statistics.median(s[key] for s in samples)

    return {"dtype": dtype, "tokens": tokens, "batches": len(samples), "tokens_per_s": median("tokens_per_s"),
            "gflops": median("gflops"), "roofline_fraction": median("fraction"), "roofline_gflops": median("roofline")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hookpoints", default="resid_post.3,resid_post.7,resid_post.11,resid_post.15")
    parser.add_argument("--source", default="kjv", help="text the contexts are cut from (DataConfig.source)")
    parser.add_argument("--tokens", type=int, default=4096, help="fp32 tokens (whole contexts)")
    parser.add_argument("--bf16-tokens", type=int, default=2048, help="bf16 tokens: the first of the fp32 ones")
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="contexts per forward")
    parser.add_argument("--roofline-side", type=int, default=2048, help="side of the square fp32 roofline GEMM")
    parser.add_argument("--sae", default=str(BENCH.parent / "runs" / "demo" / "train" / "sae"),
                        help="an fp32-trained SAE folder for the FVU comparison (skipped when absent)")
    parser.add_argument("--out", default=str(BENCH / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hookpoints = args.hookpoints.split(",")
    info = machine()
    model, tokenizer = load_model(args.model, "cpu", torch.float32)
    data = DataConfig(source=args.source, context_length=args.context_length, n_tokens=args.tokens)
    contexts = build_contexts(data, tokenizer)
    contexts = contexts[: max(1, args.tokens // args.context_length)]
    keep = context_mask(data, tokenizer, contexts)
    n_bf16 = max(1, min(len(contexts), args.bf16_tokens // args.context_length))
    flops_per_token = forward_flops_per_token(model, hookpoints, args.context_length)

    fp32_samples, fp32_rows = timed_forwards(model, contexts, keep, hookpoints, args.batch, flops_per_token,
                                             args.roofline_side)
    fp32 = summarise("fp32", contexts.numel(), fp32_samples)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(out_dir=str(Path(tmp) / "store"), model=args.model, hookpoints=hookpoints, data=data,
                            batch_size=args.batch)
        start = time.perf_counter()
        harvest(model, tokenizer, contexts, cfg, show_progress=False)
        fp32["harvest_tokens_per_s"] = contexts.numel() / (time.perf_counter() - start)
    d = model.config.hidden_size
    width = model.config.intermediate_size
    gemm_rows = args.batch * args.context_length
    fp32_gemm = gemm_at(gemm_rows, d, width, torch.float32)
    del model

    model, _ = load_model(args.model, "cpu", torch.bfloat16)
    bf16_keep = keep[:n_bf16]
    bf16_samples, bf16_rows = timed_forwards(model, contexts[:n_bf16], bf16_keep, hookpoints, args.batch,
                                             flops_per_token, args.roofline_side)
    bf16 = summarise("bf16", n_bf16 * args.context_length, bf16_samples)
    bf16["speedup"] = bf16["tokens_per_s"] / fp32["tokens_per_s"]
    bf16_gemm = gemm_at(gemm_rows, d, width, torch.bfloat16)
    del model

    n_rows = int(bf16_keep.sum())
    same = {hp: x[:n_rows] for hp, x in fp32_rows.items()}  # the fp32 rows of the bf16 tokens
    drift = {hp: float((bf16_rows[hp] - same[hp]).norm() / same[hp].norm()) for hp in hookpoints}
    # per token too: the aggregate is dominated by the rows of largest norm
    token_drift = {hp: float(((bf16_rows[hp] - same[hp]).norm(dim=1) / same[hp].norm(dim=1)).median())
                   for hp in hookpoints}
    fvu = None
    if Path(args.sae).is_dir():
        sae = load_sae(args.sae)
        hookpoint = sae.cfg.hookpoint
        if hookpoint in hookpoints:
            fvu = {"sae": args.sae, "hookpoint": hookpoint, "n_tokens": n_rows,
                   "fp32": evaluate_reconstruction(sae, [same[hookpoint]])["fvu"],
                   "bf16": evaluate_reconstruction(sae, [bf16_rows[hookpoint]])["fvu"]}
        else:
            print(f"--sae {args.sae} reads {hookpoint}, not one of {hookpoints}: FVU skipped", file=sys.stderr)
    else:
        print(f"no SAE at {args.sae}: FVU skipped (`make demo` trains one)", file=sys.stderr)

    isa = info.get("isa", "")
    result = {
        "rows": [fp32, bf16], "drift": drift, "token_drift_median": token_drift, "fvu": fvu,
        "flops_per_token": flops_per_token,
        "roofline_gflops": statistics.median(s["roofline"] for s in fp32_samples + bf16_samples),
        "fp32_gemm_gflops": fp32_gemm, "bf16_gemm_gflops": bf16_gemm,
        "gemm_shape": f"{gemm_rows}×{d}] by [{d}×{width}",
        "bf16_hardware": "yes" if any(flag in isa for flag in BF16_FLAGS) else "no", "threads": torch.get_num_threads(),
        "roofline_side": args.roofline_side, "machine": info,
    }
    settings = (f"{args.model}, hookpoints {', '.join(hookpoints)} (stop after the deepest); {args.source} contexts of "
                f"{args.context_length} tokens, {args.batch} per forward; {flops_per_token / 1e6:,.1f} MFLOP/token")
    notes = []
    if result["bf16_hardware"] == "no":
        notes.append(f"This CPU has no bf16 GEMM instructions: torch's bf16 GEMM runs at {bf16_gemm:,.1f} GFLOP/s "
                     f"against {fp32_gemm:,.1f} in fp32 here, so bf16 harvesting is slower ({bf16['speedup']:.2f}×); "
                     "`--model-dtype bfloat16` pays off on avx512_bf16 / AMX CPUs and GPUs.")
    if not args.no_write:
        end_to_end_results.write_section(args.out, harvest_results.render(info, settings, result, notes))
        print(f"wrote the harvest section of {args.out}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
