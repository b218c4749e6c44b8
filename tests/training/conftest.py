"""Small SAEs implementing the interface plus the trainer's optional methods, independent of saelab.saes.*."""

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from saelab.saes.base import SAEConfig, SparseAutoencoder, SparseLatents, to_dense


@dataclasses.dataclass
class TinyTopKConfig(SAEConfig):
    k: int = 2


class TinyTopK(SparseAutoencoder):
    """Plain top-k SAE (dense matmuls): b_dec subtracted before encoding, W_dec rows are the atoms."""

    architecture = "tiny_topk_test"
    config_class = TinyTopKConfig

    def __init__(self, cfg: TinyTopKConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_in) / cfg.d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.median_calls: list[Tensor] = []

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    def encode(self, x: Tensor) -> SparseLatents:
        values, indices = self.pre_activations(x).topk(self.cfg.k, dim=-1)
        return SparseLatents(values.clamp_min(0), indices, self.n_latents)

    def decode(self, latents: SparseLatents) -> Tensor:
        return to_dense(latents) @ self.W_dec + self.b_dec

    def decoder_matrices(self) -> list[Tensor]:
        return [self.W_dec]

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)

    def auxk_latents(self, x: Tensor, dead_mask: Tensor, k_aux: int) -> SparseLatents:
        pre = self.pre_activations(x).masked_fill(~dead_mask, float("-inf"))
        values, indices = pre.topk(k_aux, dim=-1)
        return SparseLatents(values.clamp_min(0), indices, self.n_latents)

    def latent_parameters(self) -> dict[str, int]:
        return {"W_enc": 0, "b_enc": 0, "W_dec": 0}

    def init_b_dec_geometric_median(self, x: Tensor) -> None:
        self.median_calls.append(x.clone())
        self.b_dec.data.copy_(x.median(dim=0).values)

    def flops_per_token(self) -> int:
        return 2 * self.d_in * self.n_latents + 2 * self.cfg.k * self.d_in


class TinyRelu(SparseAutoencoder):
    """ReLU SAE with dense latents and no optional methods at all (the bare interface)."""

    architecture = "tiny_relu_test"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_in) / cfg.d_in**0.5)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.W_dec = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_in) / cfg.d_in**0.5)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.W_enc.T + self.b_enc)

    def decode(self, latents: Tensor) -> Tensor:
        return to_dense(latents) @ self.W_dec + self.b_dec

    def decoder_matrices(self) -> list[Tensor]:
        return [self.W_dec]

    def flops_per_token(self) -> int:
        return 4 * self.d_in * self.n_latents


@pytest.fixture
def tiny_topk():
    def make(d_in: int = 8, n_latents: int = 16, k: int = 2, seed: int = 0, **kw) -> TinyTopK:
        torch.manual_seed(seed)
        return TinyTopK(TinyTopKConfig(d_in=d_in, n_latents=n_latents, k=k, **kw))

    return make


@pytest.fixture
def tiny_relu():
    def make(d_in: int = 8, n_latents: int = 16, seed: int = 0) -> TinyRelu:
        torch.manual_seed(seed)
        return TinyRelu(SAEConfig(d_in=d_in, n_latents=n_latents))

    return make


def planted_batches(
    n_batches: int, batch_size: int, d: int = 16, n_atoms: int = 32, k: int = 3, seed: int = 0,
    sample_seed: int | None = None,
) -> list[Tensor]:
    """Tokens that are sparse sums of k of n_atoms random unit atoms (magnitudes 0.5-1.5), plus an offset.
    `seed` fixes the atoms; `sample_seed` (default: seed) the tokens drawn from them."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=gen), dim=1)
    offset = torch.randn(d, generator=gen)
    if sample_seed is not None:
        gen.manual_seed(sample_seed)
    out = []
    for _ in range(n_batches):
        idx = torch.rand(batch_size, n_atoms, generator=gen).argsort(dim=1)[:, :k]
        coef = torch.zeros(batch_size, n_atoms).scatter_(1, idx, 0.5 + torch.rand(batch_size, k, generator=gen))
        out.append(coef @ atoms + offset)
    return out


@pytest.fixture
def planted():
    return planted_batches
