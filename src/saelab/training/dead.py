"""Dead latents: tracked in tokens (so the window means the same at every batch size) and optionally resampled.

Resampling works for any SAE that says which parameters hold per-latent slices, via the optional method
`latent_parameters() -> dict[str, int]` (parameter name -> the dimension indexed by latent), e.g.
`{"W_enc": 0, "b_enc": 0, "W_dec": 0}` for a shallow SAE, or the sparse layer's Linear weights and bias for a
deep one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.metrics import dead_fraction, dead_mask
from saelab.saes.base import SparseAutoencoder
from saelab.training.optim import reset_moments


class DeadLatentTracker:
    """Tokens since each latent last fired. A latent that fires anywhere in a batch counts as having fired at its
    end, so the window is resolved to one batch."""

    def __init__(self, n_latents: int, window_tokens: int, device: torch.device | str = "cpu") -> None:
        self.window_tokens = window_tokens
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.long, device=device)

    def update(self, counts: Tensor, n_tokens: int) -> None:
        """`counts`: per-latent activation counts of one batch of `n_tokens` tokens."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(counts > 0, 0)

    def dead_mask(self) -> Tensor:
        return dead_mask(self.tokens_since_fired, self.window_tokens)

    def dead_fraction(self) -> float:
        return dead_fraction(~self.dead_mask())

    def revive(self, mask: Tensor) -> None:
        """Give latents (e.g. just resampled ones) a fresh window."""
        self.tokens_since_fired.masked_fill_(mask, 0)


@torch.no_grad()
def resample_latents(
    sae: SparseAutoencoder, dead: Tensor, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> int:
    """Re-initialise the latents in the boolean mask `dead` and zero their Adam moments; returns how many.

    Multi-dimensional slices (encoder rows, decoder directions) get fresh Gaussian directions scaled to the mean
    norm of the live latents' slices of the same parameter, so a revived latent starts at the trained scale;
    per-latent vectors (biases) are zeroed. The trainer renormalises decoders afterwards as after any step.
    """
    index = dead.nonzero().squeeze(1)
    if index.numel() == 0:
        return 0
    params = dict(sae.named_parameters())
    for name, dim in sae.latent_parameters().items():
        param = params[name]
        if param.ndim == 1:
            param.index_fill_(dim, index, 0.0)
        else:
            param.index_copy_(dim, index, _fresh_slices(param, dim, dead, index.numel(), generator))
        reset_moments(optimizer, param, index, dim)
    return index.numel()


def _fresh_slices(param: Tensor, dim: int, dead: Tensor, count: int, generator: torch.Generator) -> Tensor:
    moved = param.movedim(dim, 0)
    norms = moved.reshape(moved.shape[0], -1).norm(dim=1)
    alive = ~dead.to(norms.device)
    target = norms[alive].mean() if bool(alive.any()) else norms.mean()
    fresh = torch.randn((count, *moved.shape[1:]), generator=generator, dtype=param.dtype).to(param.device)
    fresh_norms = fresh.reshape(count, -1).norm(dim=1).clamp_min(1e-12)
    fresh = fresh * (target / fresh_norms).view(count, *([1] * (fresh.ndim - 1)))
    return fresh.movedim(0, dim)
