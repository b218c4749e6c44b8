"""Top-k SAE training throughput against an encode-only pass of the same SAE (a figure, not a test).

A top-k training step cannot cost less than one dense encoder GEMM; with a sparse backward nothing else need cost
as much, so `ratio = train / encode` says how close the step is to that floor (target >= 0.85).

Measured: the full step (forward through the fast path, MSE loss, backward, decoder gradient projection, fused
Adam, decoder renormalisation) and the encode-only pass (chunked GEMM + top-k + clamp, no autograd), alternating
step by step so machine drift hits both alike; figures are medians over `--steps`. Synthetic Gaussian activations.
On CPU the JSON also gives the ratio of process CPU time (`cpu_ratio`): on a shared, oversubscribed machine wall
times swing with other people's work, while the CPU time each step needs is steadier.

Process settings for stable figures (both applied before anything large is allocated):
- glibc malloc keeps freed large buffers instead of unmapping them and page-faulting them back every step
  (`mallopt`; the same as running with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>);
- OMP_WAIT_POLICY=PASSIVE unless already set: on a shared, oversubscribed machine OpenMP threads spinning at
  barriers for a descheduled partner slow some small parallel ops (e.g. the index sort in the sparse backward)
  by up to 100x. Set OMP_WAIT_POLICY=ACTIVE to measure without it.

`--autocast bfloat16` runs both under torch.autocast (the trainer's `autocast_dtype`): on a GPU the encoder GEMM then
runs in bf16; parameters, gradients and Adam stay fp32.

`--precision bf16-exact` times the trainer's bf16-exact selection (`saelab.saes.certified`) against fp32 instead: two
SAEs from the same init trained side by side, step by step, on the same batches, and before each step both
selections of the bf16-exact SAE's weights compared token by token (`selection_mismatches` counts tokens whose
positive latents differ, `value_mismatches` tokens whose selected values differ in any bit: both must be 0). Where
the device has no fast bf16 the trainer runs fp32 for bf16-exact and `speedup` is about 1; `--force` runs the bf16
path anyway (emulated, slower) to measure `certified_fraction`.

Usage: python bench/train_throughput.py [--d 768 --n 24576 --k 32 --batch 4096 --steps 8 --warmup 2 --device cpu
                                        --autocast bfloat16 | --precision bf16-exact [--force]]
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import os

from saelab.runtime import configure_process

MALLOC_TUNED = configure_process()  # before torch loads its OpenMP runtime

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from saelab.saes import TopKSAE, TopKSAEConfig, certified  # noqa: E402
from saelab.saes.kernels import (  # noqa: E402
    chunk_spans,
    default_chunk_rows,
    gemm_buffer,
    latent_major,
    pre_activations,
)
from saelab.training.constraints import normalize_decoder, project_out_parallel_grad  # noqa: E402
from saelab.training.optim import adam  # noqa: E402


def make_optimizer(sae: TopKSAE, lr: float) -> tuple[torch.optim.Optimizer, bool]:
    """The trainer's Adam (fused where the backend has it), and whether it is fused."""
    optimizer = adam(sae.parameters(), lr)
    return optimizer, bool(optimizer.defaults.get("fused"))


def precision(device: torch.device, autocast: str | None) -> contextlib.AbstractContextManager[object]:
    """What the trainer's `autocast_dtype` wraps: forward and loss only."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, autocast))


def train_step(sae: TopKSAE, optimizer: torch.optim.Optimizer, x: Tensor, autocast: str | None = None) -> None:
    with precision(x.device, autocast):
        x_hat, _ = sae(x)
        loss = (x_hat - x).pow(2).sum(dim=-1).mean()
    loss.backward()
    decoders = sae.decoder_matrices()  # the trainer's unit-norm constraint, by its own functions
    project_out_parallel_grad(decoders, "per_unit")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    normalize_decoder(decoders, "per_unit")


def encode_only(sae: TopKSAE, x: Tensor, autocast: str | None = None) -> None:
    with torch.no_grad(), precision(x.device, autocast):
        sae.encode(x)


def gemm_only(sae: TopKSAE, x: Tensor, dtype: torch.dtype = torch.float32) -> None:
    """The bare encoder GEMM (no bias) in the fast path's chunks and orientation: what any exact top-k trainer must
    spend (in bf16 with `dtype`, the casts included, as bf16-exact selection runs it)."""
    weight, n = sae.W_enc.detach().to(dtype), sae.n_latents
    x = x.to(dtype)
    with torch.no_grad():
        spans = chunk_spans(x.shape[0], default_chunk_rows(n, weight.element_size()))
        buffer = gemm_buffer(spans[0][1], n, x, bias_in_gemm=False)  # the kernel's own: no second one in peak memory
        by_latent = latent_major(x.device, n, sae.k)
        for start, stop in spans:
            pre_activations(x[start:stop], weight, None, buffer, by_latent)


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=24_576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], default=None)
    parser.add_argument("--precision", choices=list(certified.PRECISIONS), default="fp32")
    parser.add_argument("--force", action="store_true", help="bf16-exact on a device without fast bf16 (emulated)")
    args = parser.parse_args()
    if args.precision == "bf16-exact":
        compare_precisions(args)
        return

    malloc_tuned = MALLOC_TUNED
    device = torch.device(args.device)
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=args.d, n_latents=args.n, k=args.k)).to(device)
    batches = torch.randn(2, args.batch, args.d, device=device)
    optimizer, fused = make_optimizer(sae, args.lr)

    train_s, encode_s, train_cpu, encode_cpu = [], [], [], []
    for step in range(args.warmup + args.steps):
        x = batches[step % 2]
        t_train, c_train = timed(lambda x=x: train_step(sae, optimizer, x, args.autocast), device)
        t_encode, c_encode = timed(lambda x=x: encode_only(sae, x, args.autocast), device)
        if step >= args.warmup:
            train_s.append(t_train)
            encode_s.append(t_encode)
            train_cpu.append(c_train)
            encode_cpu.append(c_encode)
            print(f"step {step - args.warmup + 1}/{args.steps}: train {t_train:.3f} s, encode {t_encode:.3f} s")

    train_tps = args.batch / statistics.median(train_s)
    encode_tps = args.batch / statistics.median(encode_s)
    result = {
        "train_tokens_per_s": round(train_tps, 1),
        "encode_tokens_per_s": round(encode_tps, 1),
        "ratio": round(train_tps / encode_tps, 4),
        "best_train_tokens_per_s": round(args.batch / min(train_s), 1),
        "best_encode_tokens_per_s": round(args.batch / min(encode_s), 1),
        "d": args.d,
        "n": args.n,
        "k": args.k,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": str(device),
        "autocast": args.autocast,
        "threads": torch.get_num_threads(),
        "fused_adam": fused,
        "malloc_tuned": malloc_tuned,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if device.type == "cpu":
        result["cpu_ratio"] = round(statistics.median(encode_cpu) / statistics.median(train_cpu), 4)
    print(
        f"train {train_tps:,.0f} tokens/s, encode-only {encode_tps:,.0f} tokens/s, ratio {train_tps / encode_tps:.3f}"
    )
    print(json.dumps(result))


def compare_precisions(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    fp32 = TopKSAE(TopKSAEConfig(d_in=args.d, n_latents=args.n, k=args.k)).to(device)
    exact = TopKSAE(TopKSAEConfig(d_in=args.d, n_latents=args.n, k=args.k)).to(device)
    exact.load_state_dict(fp32.state_dict())
    opt_fp32, fused = make_optimizer(fp32, args.lr)
    opt_exact, _ = make_optimizer(exact, args.lr)
    batches = torch.randn(2, args.batch, args.d, device=device)
    hardware = certified.bf16_gemm_available(device)
    force = args.force or None

    def exact_step(x: Tensor) -> None:
        with certified.selection_precision("bf16-exact", force=force):
            train_step(exact, opt_exact, x)

    fp32_s, exact_s, mismatches, value_mismatches, tokens, certified_tokens = [], [], 0, 0, 0, 0
    for step in range(args.warmup + args.steps):
        x = batches[step % 2]
        with torch.no_grad():  # the same weights selected both ways
            ref = exact.encode(x)
            with certified.selection_precision("bf16-exact", force=force), certified.counted() as selection:
                got = exact.encode(x)
            tokens, certified_tokens = tokens + selection.tokens, certified_tokens + selection.certified
            mismatches += sum(
                set(i[v > 0].tolist()) != set(j[w > 0].tolist())
                for v, i, w, j in zip(ref.values, ref.indices, got.values, got.indices, strict=True)
            )
            dense = [torch.zeros(x.shape[0], args.n, device=device).scatter(1, s.indices, s.values) for s in (ref, got)]
            value_mismatches += int((dense[0] != dense[1]).any(dim=1).sum())
        t_fp32, _ = timed(lambda x=x: train_step(fp32, opt_fp32, x), device)
        t_exact, _ = timed(lambda x=x: exact_step(x), device)
        if step >= args.warmup:
            fp32_s.append(t_fp32)
            exact_s.append(t_exact)
            print(f"step {step - args.warmup + 1}/{args.steps}: fp32 {t_fp32:.3f} s, bf16-exact {t_exact:.3f} s")
    fp32_tps, exact_tps = args.batch / statistics.median(fp32_s), args.batch / statistics.median(exact_s)
    result = {
        "train_tokens_per_s": round(exact_tps, 1),
        "fp32_train_tokens_per_s": round(fp32_tps, 1),
        "speedup": round(exact_tps / fp32_tps, 4),
        "certified_fraction": round(certified_tokens / tokens, 4) if tokens else None,
        "selection_mismatches": mismatches,
        "value_mismatches": value_mismatches,
        "tokens_compared": (args.warmup + args.steps) * args.batch,
        "bf16_hardware": hardware,
        "bf16_path_ran": tokens > 0,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "d": args.d, "n": args.n, "k": args.k, "batch": args.batch, "steps": args.steps, "device": str(device),
        "threads": torch.get_num_threads(), "fused_adam": fused,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    print(f"bf16-exact {exact_tps:,.0f} tokens/s, fp32 {fp32_tps:,.0f} tokens/s, speedup {exact_tps / fp32_tps:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
