"""Are two identical top-k SAE training runs bit-identical? A diagnostic, not a test.

Trains a `TopKSAE` with the one `Trainer` twice on the same synthetic activations (sparse combinations of random
unit directions plus noise, drawn from a fixed seed) and prints the sha256 of each run's final
`sae_weights.safetensors`; where they differ, the first step whose logged loss differs (every step is logged). Runs
go both in one process (one after the other, which is what catches state carried between runs: the global RNG,
cached workspaces) and in two fresh subprocesses.

`--bisect` instead checks each stage for bitwise repeatability on one process: SAE construction under a seed, the
geometric-median init, the forward (top-k selection and reconstruction), the loss (with `--l1`, its L1 term too),
every gradient, and the Adam step, each run several times from the same inputs.

`--init global` builds the SAE from torch's global RNG as an unseeded caller does (the old behaviour); the default
`seeded` builds it under `saelab.saes.initialization.seeded(seed)`. `SAELAB_NATIVE=0` in the environment selects the
torch top-k path; the thread count is torch's default unless `--threads` is given.

Usage: python bench/determinism.py [--d 256 --n 4096 --k 32 --batch 1024 --steps 50 --init seeded|global
                                    --mode both|inprocess|subprocess --bisect --threads N
                                    --auxk 0.03 --dead-window 4096 --l1 1e-3]
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def synthetic_batches(d: int, batch: int, steps: int, seed: int = 1234) -> Iterator[Tensor]:
    """Tokens that are sums of 8 of 2,048 random unit directions (log-normal magnitudes), plus an offset and noise:
    enough structure that the SAE's selection changes step by step as it learns, the regime where an unstable
    kernel would show."""
    gen = torch.Generator().manual_seed(seed)
    n_atoms, active = 2048, 8
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=gen), dim=1)
    offset = torch.randn(d, generator=gen)
    for _ in range(steps):
        idx = torch.randint(0, n_atoms, (batch, active), generator=gen)
        mags = torch.exp(0.5 * torch.randn(batch, active, generator=gen))
        x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=mags, mode="sum")
        yield x + offset + 0.05 * torch.randn(batch, d, generator=gen)


def build_sae(args: argparse.Namespace) -> Any:
    from saelab.saes import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=args.d, n_latents=args.n, k=args.k)
    if args.init == "global":
        return TopKSAE(cfg)
    from saelab.saes.initialization import seeded

    with seeded(args.seed):
        return TopKSAE(cfg)


def trainer_config(args: argparse.Namespace) -> Any:
    from saelab.training.config import TrainerConfig

    return TrainerConfig(
        total_tokens=args.batch * args.steps, batch_size=args.batch, warmup_steps=5, log_every_steps=1,
        checkpoint_every_steps=None, progress=False, seed=args.seed, auxk_coefficient=args.auxk,
        l1_coefficient=args.l1, dead_window_tokens=args.dead_window or 10_000_000,
    )


def train_once(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """One run into `out_dir`: the weights' sha256 and every step's logged loss (exact, as JSON floats)."""
    from saelab.training.trainer import Trainer

    trainer = Trainer(build_sae(args), trainer_config(args), out_dir)
    result = trainer.fit(synthetic_batches(args.d, args.batch, args.steps))
    weights = (result.sae_dir / "sae_weights.safetensors").read_bytes()
    return {"sha256": hashlib.sha256(weights).hexdigest(), "loss": result.curves["loss"], "fvu": result.curves["fvu"]}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    first = next((i + 1 for i, (x, y) in enumerate(zip(a["loss"], b["loss"], strict=True)) if x != y), None)
    out: dict[str, Any] = {"identical": a["sha256"] == b["sha256"], "sha256": [a["sha256"], b["sha256"]],
                           "first_step_loss_differs": first}
    if first is not None:
        out["loss_at_first_difference"] = [a["loss"][first - 1], b["loss"][first - 1]]
        out["final_fvu"] = [a["fvu"][-1], b["fvu"][-1]]
    return out


def child_args(args: argparse.Namespace) -> list[str]:
    return ["--d", str(args.d), "--n", str(args.n), "--k", str(args.k), "--batch", str(args.batch), "--steps",
            str(args.steps), "--init", args.init, "--seed", str(args.seed), "--auxk", str(args.auxk), "--l1",
            str(args.l1), "--dead-window", str(args.dead_window)] + (
        ["--threads", str(args.threads)] if args.threads else [])


def run_subprocess(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *child_args(args), "--child", str(out_dir)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- bisection: each stage twice from identical inputs ------------------------------------------------------


def _same(a: Tensor, b: Tensor) -> bool:
    """Bit for bit (so -0.0 != 0.0 and NaN payloads count), not merely numerically equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def bisect(args: argparse.Namespace) -> dict[str, Any]:
    from saelab.saes.kernels import release_workspace
    from saelab.saes.losses import l1_penalty, reconstruction_loss

    report: dict[str, Any] = {}
    first, second = build_sae(args), build_sae(args)
    report["init_weights"] = all(_same(p, q) for p, q in zip(first.parameters(), second.parameters(), strict=True))
    x = next(synthetic_batches(args.d, args.batch, 1))
    sae = first
    x_n, _ = sae.normalize(x)
    sae.init_b_dec_geometric_median(x_n)
    median = sae.b_dec.detach().clone()
    sae.init_b_dec_geometric_median(x_n)
    report["geometric_median"] = _same(median, sae.b_dec.detach())

    def step() -> dict[str, Tensor]:
        sae.zero_grad(set_to_none=True)
        x_hat, latents = sae(x_n)
        loss = reconstruction_loss(x_n, x_hat, "fvu")
        if args.l1:
            loss = loss + args.l1 * l1_penalty(latents, sae.decoder_norms())
        loss.backward()
        out = {"indices": latents.indices.clone(), "values": latents.values.detach().clone(),
               "x_hat": x_hat.detach().clone(), "loss": loss.detach().clone()}
        out.update({f"grad.{name}": p.grad.clone() for name, p in sae.named_parameters()})
        return out

    runs = [step() for _ in range(3)]
    release_workspace()
    runs.append(step())  # a fresh workspace buffer (another address) must not change anything
    for key in runs[0]:
        report[key] = all(_same(runs[0][key], r[key]) for r in runs[1:])
    if not report["indices"]:
        report["indices_same_set"] = all(
            torch.equal(runs[0]["indices"].sort(1).values, r["indices"].sort(1).values) for r in runs[1:])

    params = {name: p.detach().clone() for name, p in sae.named_parameters()}
    grads = runs[0]
    after = []
    for _ in range(2):
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(params[name])
                p.grad = grads[f"grad.{name}"].clone()
        opt = torch.optim.Adam(list(sae.parameters()), lr=1e-3, fused=True)
        opt.step()
        opt.step()
        after.append({name: p.detach().clone() for name, p in sae.named_parameters()})
    report["adam_step"] = all(_same(after[0][n], after[1][n]) for n in after[0])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--auxk", type=float, default=0.0, help="AuxK coefficient (exercises the dead-latent path)")
    parser.add_argument("--dead-window", type=int, default=0, help="dead after this many silent tokens (0: 10M)")
    parser.add_argument("--l1", type=float, default=0.0, help="L1 coefficient (its sparse path gathers per latent)")
    parser.add_argument("--init", choices=("seeded", "global"), default="seeded")
    parser.add_argument("--mode", choices=("both", "inprocess", "subprocess"), default="both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    parser.add_argument("--bisect", action="store_true")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from saelab.saes import native

    if args.child is not None:
        print(json.dumps(train_once(args, args.child)))
        return
    keys = ("d", "n", "k", "batch", "steps", "init", "auxk", "l1", "dead_window")
    setting = {"threads": torch.get_num_threads(), "native": native.library() is not None,
               **{key: getattr(args, key) for key in keys}}
    result: dict[str, Any] = {"setting": setting}
    if args.bisect:
        result["bisect"] = bisect(args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            if args.mode in ("both", "inprocess"):
                result["inprocess"] = compare(train_once(args, root / "a"), train_once(args, root / "b"))
            if args.mode in ("both", "subprocess"):
                result["subprocess"] = compare(run_subprocess(args, root / "c"), run_subprocess(args, root / "d"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
