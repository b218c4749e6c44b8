"""The top-k transcoder, with an optional linear skip connection (as sparsify trains them).

A transcoder reads one activation (e.g. an MLP's input, `mlp_in.L`) and predicts another (its output,
`mlp_out.L`), so its encoder sees x itself rather than x − b_dec, and its decoder writes `d_out` features; the skip
connection adds x @ W_skip.T (W_skip [d_out, d_in], zero at the start) to the prediction. With `transcode=False`
(as sparsify can save) it is an autoencoder with a linear bypass. `forward(x).x_hat` is the prediction.

Training: its batches are (input, target) pairs (see `saelab.saes.base`), and the reconstruction loss, the
logged FVU and the evaluation's FVU compare the prediction with the target. Normalisation under
preprocessing="scale": the input and the target each get their own scale (`input_scale`, `target_scale`, the
store's E||x|| = sqrt(d) factor of each hookpoint), so x_n = s_in·x, y_n = s_out·y and the raw prediction is
x̂_n / s_out. A per-token normalisation ("token_l2") is refused: the target's per-token statistics are not known when
the transcoder replaces it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError
from saelab.saes.base import ForwardOutput, register
from saelab.saes.topk import TopKSAE, TopKSAEConfig


@dataclasses.dataclass
class TopKTranscoderConfig(TopKSAEConfig):
    # Width of the predicted activation; None: d_in.
    d_out: int | None = None
    # The encoder reads x itself, not x − b_dec (the output it predicts is another activation).
    transcode: bool = True
    # x_hat gains x @ W_skip.T (W_skip [d_out, d_in]).
    skip_connection: bool = False
    # preprocessing="scale": the target's own factor (the input's is `input_scale`).
    target_scale: float = 1.0
    # The hookpoint predicted (`hookpoint` is the one read).
    target_hookpoint: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.d_out is not None and self.d_out <= 0:
            raise ConfigError(f"d_out={self.d_out} must be positive")
        if self.preprocessing == "token_l2":
            raise ConfigError(
                "a transcoder cannot use preprocessing='token_l2' (the target's per-token statistics are unknown "
                "when it replaces the target); use 'scale' or 'none'"
            )
        if not self.target_scale > 0:
            raise ConfigError(f"target_scale must be positive (got {self.target_scale})")
        if not self.transcode and self.d_out not in (None, self.d_in):
            raise ConfigError("transcode=False subtracts b_dec from the input, so it needs d_out == d_in")


@register
class TopKTranscoder(TopKSAE):
    """z = clamp(top_k((x − b_dec·[not transcode]) @ W_enc.T + b_enc), 0); x_hat = Σ z_i W_dec[i] + b_dec
    (+ x @ W_skip.T with the skip connection)."""

    architecture = "topk_transcoder"
    config_class = TopKTranscoderConfig
    cfg: TopKTranscoderConfig

    def __init__(self, cfg: TopKTranscoderConfig):
        super().__init__(cfg)
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, cfg.d_in)) if cfg.skip_connection else None

    @property
    def d_out(self) -> int:
        return self.cfg.d_out if self.cfg.d_out is not None else self.cfg.d_in

    @property
    def target_hookpoint(self) -> str | None:
        return self.cfg.target_hookpoint

    @property
    def output_scale(self) -> float:
        return self.cfg.target_scale if self.cfg.transcode else self.cfg.input_scale

    @property
    def pre_encoder_bias(self) -> Tensor | None:
        return None if self.cfg.transcode else self.b_dec

    def normalize_target(self, y: Tensor) -> Tensor:
        return y * self.output_scale if self.cfg.preprocessing == "scale" else y

    def forward(self, x: Tensor) -> ForwardOutput:
        latents = self.encode(x)
        x_hat = self.decode(latents)
        if self.W_skip is not None:
            x_hat = x_hat + x @ self.W_skip.T
        return ForwardOutput(x_hat, latents)

    @torch.no_grad()
    def initialize_from_pair(self, x_n: Tensor, y_n: Tensor) -> None:
        """As sparsify starts a transcoder: b_dec at the target's mean, and b_enc centring the pre-activations
        (minus the input mean's encoding), so the first top-k picks by direction, not by the data's offset."""
        if not self.cfg.transcode:
            return self.initialize_from_batch(x_n)
        self.b_dec.copy_(y_n.reshape(-1, self.d_out).mean(0))
        self.b_enc.copy_(-(x_n.reshape(-1, self.d_in).mean(0) @ self.W_enc.T))
        return None

    def flops_per_token(self) -> int:
        return super().flops_per_token() + (2 * self.d_in * self.d_out if self.W_skip is not None else 0)
