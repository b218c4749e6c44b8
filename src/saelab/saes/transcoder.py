"""The top-k transcoder with an optional linear skip connection, as sparsify trains them: loaded and evaluated here,
not trained.

A transcoder reads one activation (e.g. an MLP's input) and predicts another (its output), so its encoder sees x
itself rather than x − b_dec; the skip connection adds x @ W_skip.T to the prediction. With `transcode=False` and
a skip connection it is an autoencoder with a linear bypass. `forward(x).x_hat` is the prediction.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from saelab.saes.base import ForwardOutput, SparseLatents, register
from saelab.saes.kernels import topk_encode
from saelab.saes.topk import TopKSAE, TopKSAEConfig


@dataclasses.dataclass
class TopKTranscoderConfig(TopKSAEConfig):
    # The encoder reads x itself, not x − b_dec (the output it predicts is another activation).
    transcode: bool = True
    # x_hat gains x @ W_skip.T (W_skip [d_in, d_in]).
    skip_connection: bool = False


@register
class TopKTranscoder(TopKSAE):
    """z = clamp(top_k((x − b_dec·[not transcode]) @ W_enc.T + b_enc), 0); x_hat = Σ z_i W_dec[i] + b_dec
    (+ x @ W_skip.T with the skip connection)."""

    architecture = "topk_transcoder"
    trainable = False
    config_class = TopKTranscoderConfig
    cfg: TopKTranscoderConfig

    def __init__(self, cfg: TopKTranscoderConfig):
        super().__init__(cfg)
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in)) if cfg.skip_connection else None

    def encode(self, x: Tensor) -> SparseLatents:
        lead = x.shape[:-1]
        pre_bias = None if self.cfg.transcode else self.b_dec
        values, indices = topk_encode(x.reshape(-1, self.d_in), self.W_enc, self.b_enc, self.k, pre_bias=pre_bias)
        return SparseLatents(values.reshape(*lead, self.k), indices.reshape(*lead, self.k), self.n_latents)

    def forward(self, x: Tensor) -> ForwardOutput:
        latents = self.encode(x)
        x_hat = self.decode(latents)
        if self.W_skip is not None:
            x_hat = x_hat + x @ self.W_skip.T
        return ForwardOutput(x_hat, latents)

    def flops_per_token(self) -> int:
        return super().flops_per_token() + (2 * self.d_in * self.d_in if self.W_skip is not None else 0)
