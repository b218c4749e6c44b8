"""The BatchTopK SAE: in training, the k·B largest activations of a batch of B tokens, so a token may use more or
fewer than k latents while the batch averages k; at inference, a learned threshold (JumpReLU-style gate) instead,
so a token's latents do not depend on the rest of its batch.

Selection over the batch stays on the sparse fast path: each token's top-c candidates (`kernels.topk_encode`, the
chunked pre-activations and nothing wider) are pooled and the k·B largest kept. That equals the top k·B over the
whole [B, n_latents] matrix unless some token has all c of its candidates kept (it might have more above the
cut); then c is doubled and the selection redone, so the result is always exact (c starts at 4k).

The inference threshold is a running average (factor `threshold_beta`) of the smallest kept activation of each
training batch, as SAELens and dictionary_learning estimate it; it is a buffer saved with the weights, and
`as_jumprelu()` gives the equivalent JumpReLU SAE for formats that have no BatchTopK (SAELens).

The trainer puts the SAE in training mode while it trains and in eval mode after; `load_sae` returns eval mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.errors import ConfigError
from saelab.saes.base import ForwardOutput, LossTerm, SparseLatents, TrainingContext, register
from saelab.saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from saelab.saes.kernels import topk_encode
from saelab.saes.topk import TopKSAE, TopKSAEConfig

FIRST_CANDIDATES = 4  # candidates per token to start from, in multiples of k


@dataclasses.dataclass
class BatchTopKSAEConfig(TopKSAEConfig):
    # Weight of the old estimate in the inference threshold's running average. Each batch's smallest kept activation
    # is already a precise quantile (k·B values), but it drifts down while the encoder trains, and a long memory
    # lags behind: on SmolLM2 (245 steps, k=32, B=1024) 0.99 (SAELens's threshold lr 0.01) ended at 0.0381 against
    # the last batches' 0.0347, an inference L0 of 25.5; 0.9 ended at 0.0348, L0 about 32 (a rerun at 0.9 measured
    # 32.2). dictionary_learning's 0.999 gave L0 24.
    threshold_beta: float = 0.9

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.threshold_beta < 1.0:
            raise ConfigError(f"threshold_beta={self.threshold_beta} must be in [0, 1)")


def batch_topk(pre_select: Callable[[int], tuple[Tensor, Tensor]], n_tokens: int, n_latents: int, k: int,
               first: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [B, c] of the batch's k·B largest activations, unselected slots zeroed: exact whatever the
    spread per token. `pre_select(c)` gives each token's top-c (clamped at 0) values and latent indices."""
    c = min(n_latents, first)
    while True:
        values, indices = pre_select(c)
        keep = _kept(values, k * n_tokens)
        saturated = bool(keep[:, -1].any()) if c < n_latents else False  # a token kept all its candidates
        if not saturated:
            return values * keep, indices
        c = min(n_latents, 2 * c)


def _kept(values: Tensor, total: int) -> Tensor:
    """Mask of the `total` largest positive entries of `values` [B, c] (ties broken by flat position), with each
    row's smallest candidate in its last column (so a kept last column means the row may hold more)."""
    flat = values.detach().reshape(-1)
    chosen = flat.topk(min(total, flat.numel()), sorted=False).indices
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[chosen] = True
    return (keep & (flat > 0)).reshape(values.shape)


@register
class BatchTopKSAE(TopKSAE):
    """Training: z = the batch's k·B largest of ReLU((x − b_dec) @ W_enc.T + b_enc); inference: z = pre · [pre > θ]
    with θ the learned threshold. x_hat = Σ z_i W_dec[i] + b_dec."""

    architecture = "batchtopk"
    config_class = BatchTopKSAEConfig
    cfg: BatchTopKSAEConfig

    def __init__(self, cfg: BatchTopKSAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def encode(self, x: Tensor) -> SparseLatents | Tensor:
        if not self.training:
            return self.encode_thresholded(x)
        flat = x.reshape(-1, self.d_in)

        def candidates(c: int) -> tuple[Tensor, Tensor]:
            values, indices = topk_encode(flat, self.W_enc, self.b_enc, c, pre_bias=self.b_dec)
            # each row's smallest candidate last, for the saturation test
            order = values.detach().argsort(dim=1, descending=True, stable=True)
            return values.gather(1, order), indices.gather(1, order)

        values, indices = batch_topk(candidates, flat.shape[0], self.n_latents, self.k, FIRST_CANDIDATES * self.k)
        self._update_threshold(values)
        lead = x.shape[:-1]
        return SparseLatents(values.reshape(*lead, -1), indices.reshape(*lead, -1), self.n_latents)

    def encode_thresholded(self, x: Tensor) -> Tensor:
        """Inference: every latent whose activation exceeds the learned threshold (dense [..., n_latents])."""
        if self.threshold < 0:
            raise ConfigError("this BatchTopK SAE has no inference threshold yet (it was never trained); train it, "
                              "or call .train() to select over the batch")
        pre = F.linear(x - self.b_dec, self.W_enc, self.b_enc)
        return pre * (pre > self.threshold)

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        kept = values.detach()[values.detach() > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().to(self.threshold)
        beta = self.cfg.threshold_beta
        self.threshold.copy_(smallest if self.threshold < 0 else beta * self.threshold + (1 - beta) * smallest)

    def training_loss(self, x_n: Tensor, output: ForwardOutput, ctx: TrainingContext,
                      dead_mask: Callable[[], Tensor]) -> dict[str, LossTerm]:
        if ctx.share is not None:
            raise ConfigError(
                "a BatchTopK SAE selects over the whole batch, but data-parallel processes each see a slice; train "
                "it in one process (or under torchrun with --distribute-hookpoints)"
            )
        return super().training_loss(x_n, output, ctx, dead_mask)

    def as_jumprelu(self) -> JumpReLUSAE:
        """The JumpReLU SAE that computes this SAE's inference: same weights, every latent's threshold θ."""
        base = {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(JumpReLUSAEConfig)
                if hasattr(self.cfg, f.name)}
        sae = JumpReLUSAE(JumpReLUSAEConfig(**{**base, "apply_b_dec_to_input": True}))
        state = {name: t for name, t in self.state_dict().items() if name != "threshold"}
        sae.load_state_dict({**state, "threshold": self.threshold.clamp_min(0).expand(self.n_latents).clone()})
        return sae.to(self.device)
