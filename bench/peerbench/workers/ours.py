"""Our trainer: `saelab.training.Trainer.fit` over the shared batches, then our encode-only pass over the same.

`--arch deep|multilayer` measures the same fast path as the sparse layer of a deep SAE (dense widths 2×d_in) or of
a multi-layer SAE (two equal layer slices); their encode-only pass includes whatever their `encode` does. The top-k
SAE's worker also times the bare encoder GEMM (`gemm_only`), the floor under any exact top-k trainer's step.
Those passes run after training, and the row's peak RSS is taken before them: it compares training with training
(the peers' workers run nothing else), not with buffers only the extra measurements allocate.
The trainer runs with the peers' settings: constant lr, no warm-up, decay, clipping, AuxK or checkpoints.

`--precision bf16-exact` (row "ours-bf16") trains the top-k SAE with the trainer's certified bf16 selection, which
runs fp32 where the CPU has no fast bf16 (the row says whether the bf16 path ran, and its certified fraction); its
encode-only pass runs that selection too, and its GEMM-only pass the bf16 GEMM where that path runs;
`--precision autocast` (row "ours-autocast") trains under torch.autocast(bfloat16) (fp32 master weights and Adam).
"""

from __future__ import annotations  # noqa: I001 (common configures the process before torch loads)

from peerbench.workers.common import (  # configures the process
    Activations, StepClock, fvu, parse_args, peak_rss_mb, report,
)

import statistics  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from train_throughput import encode_only, gemm_only, timed  # noqa: E402

from saelab.saes import SparseAutoencoder, TopKSAE, TopKSAEConfig, certified  # noqa: E402
from saelab.saes.deep import DeepSAE, DeepSAEConfig  # noqa: E402
from saelab.saes.initialization import seeded  # noqa: E402
from saelab.saes.multilayer import MultiLayerSAE, MultiLayerSAEConfig  # noqa: E402
from saelab.training import Trainer, TrainerConfig  # noqa: E402

ARCHS = ("topk", "deep", "multilayer")
PRECISIONS = {"fp32": "ours", "bf16-exact": "ours-bf16", "autocast": "ours-autocast"}  # -> the row's name


def build_sae(arch: str, d: int, n: int, k: int) -> SparseAutoencoder:
    if arch == "deep":
        return DeepSAE(DeepSAEConfig(d_in=d, n_latents=n, k=k))
    if arch == "multilayer":
        half = d // 2
        return MultiLayerSAE(MultiLayerSAEConfig(
            d_in=d, n_latents=n, k=k, layers=[0, 1], hookpoints=["resid_post.0", "resid_post.1"],
            slice_widths=[half, d - half], layer_scales=[1.0, 1.0],
        ))
    return TopKSAE(TopKSAEConfig(d_in=d, n_latents=n, k=k))


def pop_flag(argv: list[str], flag: str, default: str) -> str:
    """The value of `flag` (ours only), removed from argv so that the shared parser stays the peers' interface."""
    if flag not in argv:
        return default
    at = argv.index(flag)
    value = argv[at + 1]
    del argv[at : at + 2]
    return value


def main() -> None:
    import sys

    arch, precision = pop_flag(sys.argv, "--arch", "topk"), pop_flag(sys.argv, "--precision", "fp32")
    if arch not in ARCHS:
        raise SystemExit(f"--arch {arch!r}: use one of {ARCHS}")
    if precision not in PRECISIONS:
        raise SystemExit(f"--precision {precision!r}: use one of {list(PRECISIONS)}")
    args = parse_args(__doc__.split("\n\n")[0])
    data = Activations(args)
    with seeded(args.seed):  # the same init in every run, as the peers' workers seed theirs
        sae = build_sae(arch, data.d, args.n, args.k).to(data.device)
    encode_s: list[float] = []
    gemm_s: list[float] = []

    mode = "bf16-exact" if precision == "bf16-exact" else "fp32"
    with certified.selection_precision(mode):
        exact = certified.active(data.device)  # the bf16 path runs here

    def encode(x: Tensor) -> None:  # in the row's own precision: bf16-exact's encode and GEMM run in bf16
        with certified.selection_precision(mode):
            encode_s.append(timed(lambda: encode_only(sae, x), data.device)[0])
        if arch == "topk":
            dtype = torch.bfloat16 if exact else torch.float32
            gemm_s.append(timed(lambda: gemm_only(sae, x, dtype), data.device)[0])

    clock = StepClock(data, args)
    cfg = TrainerConfig(
        total_tokens=clock.count * args.batch, batch_size=args.batch, lr=args.lr, warmup_steps=0, decay_fraction=0.0,
        grad_clip_norm=None, checkpoint_every_steps=None, log_every_steps=10**9, progress=False, seed=args.seed,
        device=args.device, precision="bf16-exact" if precision == "bf16-exact" else "fp32",
        autocast_dtype="bfloat16" if precision == "autocast" else None,
    )
    with tempfile.TemporaryDirectory() as out, certified.counted() as selection:
        Trainer(sae, cfg, out).fit(clock)
    eval_fvu = fvu(sae.reconstruct, data)
    training_peak = peak_rss_mb()
    for step in range(clock.count):  # the same batches, in order, each pass timed as the steps were
        encode(data[step])
    extra: dict[str, float | str | bool] = {}
    if precision == "bf16-exact":
        extra = {"bf16_hardware": certified.bf16_gemm_available(data.device), "bf16_path_ran": selection.tokens > 0}
        if selection.tokens:
            extra["certified_fraction"] = round(selection.certified / selection.tokens, 4)
    timed_steps = slice(clock.warmup, clock.warmup + clock.steps)
    encode_tps = args.batch / statistics.median(encode_s[timed_steps])
    gemm = {"gemm_median_tokens_per_s": round(args.batch / statistics.median(gemm_s[timed_steps]), 1)} if gemm_s else {}
    name = "ours" if arch == "topk" else f"ours-{arch}"
    if precision != "fp32":
        name = PRECISIONS[precision]
    report(name, args, data, clock, eval_fvu, training_peak, encode_median_tokens_per_s=round(encode_tps, 1),
           **gemm, **extra)


if __name__ == "__main__":
    main()
