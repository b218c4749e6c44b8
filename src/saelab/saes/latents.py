"""What an SAE's encoder returns: dense latents, or the k active ones per token (`SparseLatents`)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class SparseLatents(NamedTuple):
    """k active latents per token: `values[..., k]` (>= 0 for top-k) at `indices[..., k]` (int64)."""

    values: Tensor
    indices: Tensor
    n_latents: int

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(*self.values.shape[:-1], self.n_latents)
        return dense.scatter_(-1, self.indices, self.values)


Latents = Tensor | SparseLatents


def to_dense(latents: Latents) -> Tensor:
    return latents.to_dense() if isinstance(latents, SparseLatents) else latents


class ForwardOutput(NamedTuple):
    x_hat: Tensor  # reconstruction in the normalised space
    latents: Latents
