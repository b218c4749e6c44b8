"""Normalisation statistics of one hookpoint's activations: the single definition the store records and applies.

Residual-stream norms differ by orders of magnitude between models and layers, so hyperparameters (learning rate,
initial decoder norms) only transfer if the SAE sees activations on a common scale. The convention (as in SAELens)
is a scalar `scale` with E||scale * x|| = sqrt(d): one number, so directions and sparsity structure are untouched.
The per-dimension mean is recorded too, for callers that centre (e.g. to initialise a decoder bias).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.errors import DataError


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Statistics of one hookpoint, estimated on `n_tokens` tokens."""

    scale: float
    mean_norm: float
    mean: Tensor
    n_tokens: int

    def apply(self, x: Tensor) -> Tensor:
        """Raw activations -> normalised (E||x|| = sqrt(d))."""
        return x * self.scale

    def invert(self, x: Tensor) -> Tensor:
        """Normalised -> raw, e.g. before splicing a reconstruction back into the model."""
        return x / self.scale

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "mean_norm": self.mean_norm,
            "n_tokens": self.n_tokens,
            "mean": [float(v) for v in self.mean.tolist()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormStats:
        return cls(
            scale=float(data["scale"]),
            mean_norm=float(data["mean_norm"]),
            mean=torch.tensor(data["mean"], dtype=torch.float32),
            n_tokens=int(data["n_tokens"]),
        )


def estimate_norm_stats(x: np.ndarray | Tensor, chunk_rows: int = 8192) -> NormStats:
    """Estimate NormStats from `x[n, d]`, accumulating in float64 chunks so an fp16 shard needs little memory."""
    n, d = x.shape
    if n == 0:
        raise DataError("cannot estimate normalisation from zero tokens; harvest more contexts or keep more positions")
    norm_sum = 0.0
    vec_sum = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, chunk_rows):
        chunk = torch.as_tensor(np.asarray(x[start : start + chunk_rows])).to(torch.float64)
        norm_sum += float(chunk.norm(dim=1).sum())
        vec_sum += chunk.sum(dim=0)
    mean_norm = norm_sum / n
    if not math.isfinite(mean_norm) or mean_norm <= 0.0:
        raise DataError(
            f"activations have mean norm {mean_norm}, so no scale can normalise them; "
            "check the hookpoint (is it always zero?) and the model weights"
        )
    return NormStats(
        scale=math.sqrt(d) / mean_norm,
        mean_norm=mean_norm,
        mean=(vec_sum / n).to(torch.float32),
        n_tokens=n,
    )
