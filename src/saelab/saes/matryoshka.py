"""The Matryoshka SAE: nested dictionaries in one. Its latents are ordered so that every prefix [0, m) of them,
for m in `prefixes`, is trained to reconstruct the input on its own ("Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", Bussmann et al., 2025; Nabeshima, 2024), which pushes general features to the
front and keeps specific ones from absorbing them.

Selection is BatchTopK's (the batch's k·B largest; a threshold at inference) or, with `batch_topk=False`, plain
top-k per token; the prefixes only change the loss: the mean over prefixes m of the reconstruction loss of the
selected latents with index < m (the whole dictionary being the last prefix). The whole dictionary's term stays
`recon` (so the logged FVU is the full SAE's), weighted 1/P like each `recon_prefix_<m>`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor

from saelab.errors import ConfigError
from saelab.saes.base import ForwardOutput, LossTerm, SparseLatents, TrainingContext, register
from saelab.saes.batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from saelab.saes.jumprelu import JumpReLUSAE
from saelab.saes.kernels import sparse_decode
from saelab.saes.topk import TopKSAE


@dataclasses.dataclass
class MatryoshkaSAEConfig(BatchTopKSAEConfig):
    prefixes: list[int] = dataclasses.field(default_factory=list)  # nested sizes; n_latents is always the last
    batch_topk: bool = True  # False: plain top-k per token

    def validate(self) -> None:
        super().validate()
        sizes = [*self.prefixes, self.n_latents] if self.prefixes[-1:] != [self.n_latents] else self.prefixes
        if not self.prefixes or any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)) or sizes[0] < 1 \
                or sizes[-1] != self.n_latents:
            raise ConfigError(
                f"prefixes={self.prefixes} must be increasing sizes in [1, n_latents={self.n_latents}], e.g. "
                "128,512,2048 (n_latents is added as the last)"
            )

    @property
    def sizes(self) -> list[int]:
        return self.prefixes if self.prefixes[-1] == self.n_latents else [*self.prefixes, self.n_latents]


@register
class MatryoshkaSAE(BatchTopKSAE):
    """A BatchTopK (or top-k) SAE whose loss is averaged over nested latent prefixes."""

    architecture = "matryoshka"
    config_class = MatryoshkaSAEConfig
    cfg: MatryoshkaSAEConfig

    def encode(self, x: Tensor) -> SparseLatents | Tensor:
        return super().encode(x) if self.cfg.batch_topk else TopKSAE.encode(self, x)

    def training_loss(self, x_n: Tensor, output: ForwardOutput, ctx: TrainingContext,
                      dead_mask: Callable[[], Tensor]) -> dict[str, LossTerm]:
        from saelab.saes import losses  # imports saelab.metrics, which imports this package

        terms = super().training_loss(x_n, output, ctx, dead_mask) if self.cfg.batch_topk \
            else TopKSAE.training_loss(self, x_n, output, ctx, dead_mask)
        sizes = self.cfg.sizes
        weight = 1.0 / len(sizes)
        terms["recon"] = LossTerm(terms["recon"].value, weight)
        latents = output.latents
        assert isinstance(latents, SparseLatents)  # training selects sparsely
        for size in sizes[:-1]:
            x_hat = self.decode_prefix(latents, size)
            terms[f"recon_prefix_{size}"] = LossTerm(losses.reconstruction_loss(x_n, x_hat, ctx.loss, ctx.share),
                                                     weight)
        return terms

    def decode_prefix(self, latents: SparseLatents, size: int) -> Tensor:
        """The reconstruction from the selected latents with index < `size` only."""
        values = latents.values * (latents.indices < size)
        return sparse_decode(values, latents.indices, self.W_dec) + self.b_dec

    def as_jumprelu(self) -> JumpReLUSAE:
        if not self.cfg.batch_topk:
            raise ConfigError("a Matryoshka SAE on plain top-k has no JumpReLU form; keep it in saelab's format "
                              "(--to saelab)")
        return super().as_jumprelu()
