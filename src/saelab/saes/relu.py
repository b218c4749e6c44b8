"""The ReLU SAE: dense latents, sparsity from an L1 penalty that the trainer adds (see `decoder_norms`)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.saes.base import SAEConfig, register
from saelab.saes.shallow import ShallowSAE


@dataclasses.dataclass
class ReluSAEConfig(SAEConfig):
    # Decoder = encoder transpose (one matrix); the MNIST feature-connector SAEs did better tied.
    tied: bool = False


@register
class ReluSAE(ShallowSAE):
    """z = ReLU((x - b_dec) @ W_enc.T + b_enc); x_hat = z @ W_dec + b_dec (W_dec = W_enc when tied)."""

    architecture = "relu"
    config_class = ReluSAEConfig
    cfg: ReluSAEConfig

    def __init__(self, cfg: ReluSAEConfig):
        super().__init__(cfg, tied=cfg.tied)

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))

    def flops_per_token(self) -> int:
        return 4 * self.d_in * self.n_latents
