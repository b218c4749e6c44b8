"""Initialisations shared by the SAEs: the encoder/decoder starting point and the geometric-median b_dec, and
`seeded`, which makes an SAE's construction reproducible.

The SAE constructors take a config and nothing else, so their random init draws from torch's global generator, whose
state depends on everything drawn before in the process and, with torch 2.13, even its starting seed differs from
process to process. A run is reproducible only when the SAE is built under `seeded(seed)`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[torch.Generator]:
    """Run the block with torch's global CPU generator seeded to `seed`, and restore the caller's generator state
    afterwards, so `with seeded(cfg.seed): sae = TopKSAE(cfg)` gives the same weights in every process and leaves
    the caller's own random stream where it was. Yields the (seeded) global CPU generator.

    Only the CPU generator is seeded and forked: the constructors allocate their parameters on the CPU (the trainer
    moves them afterwards), and seeding CUDA from here would change the caller's CUDA stream for good.
    """
    with torch.random.fork_rng(devices=[]):
        yield torch.default_generator.manual_seed(seed)


@torch.no_grad()
def init_dictionary(w_enc: Tensor, w_dec: Tensor | None, generator: torch.Generator | None = None) -> None:
    """Kaiming-uniform encoder rows (nn.Linear's default), and the decoder a row-normalised copy of them.

    Starting the decoder at the encoder's directions makes every latent reconstruct along what it detects, which
    avoids most early dead latents. With `w_dec=None` (tied weights) the encoder rows themselves are normalised.
    A decoder of another width than the encoder (a transcoder's, into another activation) has no such copy: its rows
    are drawn the same way on their own, then normalised. Draws from `generator` (default: torch's global one; see
    `seeded`).
    """
    bound = 1.0 / math.sqrt(w_enc.shape[1])
    w_enc.uniform_(-bound, bound, generator=generator)
    source = w_enc
    if w_dec is not None and w_dec.shape != w_enc.shape:
        source = w_dec.uniform_(-bound, bound, generator=generator)
    target = w_enc if w_dec is None else w_dec
    target.copy_(source / source.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def batch_mean(x: Tensor) -> Tensor:
    """The mean over every token of a batch [..., d] (summed in float64, returned in x's dtype): a b_dec init."""
    return x.reshape(-1, x.shape[-1]).to(torch.float64).mean(dim=0).to(x.dtype)


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, rtol: float = 1e-7) -> Tensor:
    """The point minimising Σ_i ||p_i - y|| (Weiszfeld's iteration), in float64 for a clean stop.

    Unlike the mean it ignores a few extreme activations, so b_dec starts at the bulk of the data.
    """
    pts = points.reshape(-1, points.shape[-1]).to(torch.float64)
    median = pts.mean(dim=0)
    scale = pts.norm(dim=1).mean().clamp_min(1e-12)
    for _ in range(iters):
        # Clamping keeps a median sitting on a data point from dividing by zero; it then stays on that point.
        weights = 1.0 / (pts - median).norm(dim=1).clamp_min(1e-12 * scale)
        updated = (weights[:, None] * pts).sum(dim=0) / weights.sum()
        shift = (updated - median).norm()
        median = updated
        if shift <= rtol * scale:
            break
    return median.to(points.dtype)

