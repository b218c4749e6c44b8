"""The top-k SAE: exactly k active latents per token, trained through the sparse fast path in `kernels`."""

from __future__ import annotations

import dataclasses

from torch import Tensor

from saelab.errors import ConfigError
from saelab.saes.base import SAEConfig, SparseLatents, register
from saelab.saes.kernels import topk_encode
from saelab.saes.shallow import ShallowSAE


@dataclasses.dataclass
class TopKSAEConfig(SAEConfig):
    k: int = 32

    def validate(self) -> None:
        super().validate()
        if self.k <= 0:
            raise ConfigError(f"k={self.k} must be positive")
        if self.k > self.n_latents:
            raise ConfigError(f"k={self.k} exceeds n_latents={self.n_latents}; choose k <= n_latents")


@register
class TopKSAE(ShallowSAE):
    """z = clamp(top_k((x - b_dec) @ W_enc.T + b_enc), 0); x_hat = Σ z_i W_dec[i] + b_dec."""

    architecture = "topk"
    config_class = TopKSAEConfig
    cfg: TopKSAEConfig

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def pre_encoder_bias(self) -> Tensor | None:
        """What the encoder subtracts from its input: b_dec, so the dictionary models deviations from the centre."""
        return self.b_dec

    def encode(self, x: Tensor) -> SparseLatents:
        return self._select(x, self.W_enc, self.b_enc, self.k, latent_ids=None)

    def auxk_latents(self, x: Tensor, dead_mask: Tensor, k_aux: int) -> SparseLatents:
        """The `k_aux` strongest latents among the dead ones (boolean mask [n_latents]), for the AuxK loss.

        Only the dead latents' encoder rows enter the GEMM, so this costs 2·d·n_dead flops per token; of the
        per-latent parameters, only the dead latents' encoder rows and biases get a gradient.
        """
        dead = dead_mask.nonzero().squeeze(1)
        k = min(k_aux, dead.numel())
        return self._select(x, self.W_enc[dead], self.b_enc[dead], k, latent_ids=dead)

    def _select(self, x: Tensor, weight: Tensor, bias: Tensor, k: int, latent_ids: Tensor | None) -> SparseLatents:
        lead = x.shape[:-1]
        values, indices = topk_encode(x.reshape(-1, self.d_in), weight, bias, k, pre_bias=self.pre_encoder_bias)
        if latent_ids is not None:
            indices = latent_ids[indices]
        return SparseLatents(values.reshape(*lead, k), indices.reshape(*lead, k), self.n_latents)

    def flops_per_token(self) -> int:
        return 2 * self.d_in * self.n_latents + 2 * self.k * self.d_out
