"""Where a top-k training step spends its time: the step `train_throughput` times, under torch.profiler (a figure for
whoever optimises the step next, not a test).

The profiler records `--steps` steps after `--warmup` untimed ones; the table lists the ops with the most self time
per step, on the device the step runs on (CUDA kernel time on a GPU, CPU time otherwise), and the JSON line the step's
median wall time (measured without the profiler, before it) and the same ops. On a GPU, where the step's cost is
often launches and host waits rather than arithmetic, `launches_per_step` counts the CUDA kernels of one step and
`host_syncs_per_step` the calls that wait for the device (`HOST_SYNCS`): each costs a round trip the GPU idles
through.

`--precision` picks the selection as the trainer does: fp32 (exact, the default), bf16-exact, or autocast (the GEMM
under bf16 autocast, no exactness).

Usage: python bench/step_profile.py [--n 4096 --k 32 --d 768 --batch 4096 --steps 3 --warmup 3 --device cuda
                                     --precision fp32|bf16-exact|autocast --rows 25]
The last line of stdout is one JSON object.
"""

from __future__ import annotations

from saelab.runtime import configure_process

configure_process()  # before torch loads its OpenMP runtime

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from train_throughput import make_optimizer, timed, train_step  # noqa: E402

from saelab.saes import TopKSAE, TopKSAEConfig, certified  # noqa: E402

PRECISIONS = ("fp32", "bf16-exact", "autocast")
HOST_SYNCS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def self_us(event: Any, cuda: bool) -> float:
    """An op's own time in microseconds: its CUDA kernels' when `cuda`, else its CPU time."""
    return float(event.self_device_time_total if cuda else event.self_cpu_time_total)


def op_table(events: Any, cuda: bool, steps: int, rows: int) -> list[dict[str, Any]]:
    """The `rows` ops with the most self time (`self_us`), per step, in milliseconds."""
    ranked = sorted((e for e in events if self_us(e, cuda) > 0), key=lambda e: self_us(e, cuda), reverse=True)
    return [{"op": e.key, "ms_per_step": round(self_us(e, cuda) / 1e3 / steps, 3), "calls_per_step": e.count / steps}
            for e in ranked[:rows]]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--rows", type=int, default=25, help="ops listed")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=args.d, n_latents=args.n, k=args.k)).to(device)
    optimizer, _ = make_optimizer(sae, args.lr)
    batches = torch.randn(2, args.batch, args.d, device=device)
    autocast = "bfloat16" if args.precision == "autocast" else None
    selection = "bf16-exact" if args.precision == "bf16-exact" else "fp32"

    def step(i: int) -> None:
        with certified.selection_precision(selection):
            train_step(sae, optimizer, batches[i % 2], autocast)

    wall = [timed(lambda i=i: step(i), device)[0] for i in range(args.warmup + args.steps)][args.warmup :]
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for i in range(args.steps):
            step(i)
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    table = op_table(events, cuda, args.steps, args.rows)
    result: dict[str, Any] = {
        "step_ms": round(statistics.median(wall) * 1e3, 3),
        "profiled_ms_per_step": round(sum(self_us(e, cuda) for e in events) / 1e3 / args.steps, 3),
        "ops": table,
        "n": args.n, "k": args.k, "d": args.d, "batch": args.batch, "steps": args.steps, "device": str(device),
        "precision": args.precision, "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        result["launches_per_step"] = len(kernels) / args.steps
        result["host_syncs_per_step"] = sum(e.count for e in events if e.key in HOST_SYNCS) / args.steps
    print(f"step {result['step_ms']:.2f} ms (median of {args.steps}, unprofiled); "
          f"self {'CUDA' if cuda else 'CPU'} time per step:")
    for row in table:
        print(f"  {row['ms_per_step']:9.3f} ms  {row['calls_per_step']:7.1f} calls  {row['op']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
