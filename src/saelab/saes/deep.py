"""The deep SAE: a top-k sparse layer sandwiched between dense ReLU layers whose widths mirror across it.

Encoder: Linear→ReLU for each dense width (`encoder_multiples` × d_in), then Linear→top-k into the sparse layer.
Decoder: Linear→ReLU back through the same widths in reverse, then a final Linear to d_in with no nonlinearity.
Every Linear has its own bias. With no dense layers this is a plain top-k SAE; with `pre_encoder_bias` (subtract the
output bias before encoding, start it at the geometric median) it is then exactly `TopKSAE`, parameter for
parameter, so the two can be compared under one set of training settings.

Layout. Encoder matrices are `[units_out, units_in]` (nn.Linear's), decoder matrices `[units_in, units_out]` (row =
one unit's outgoing direction, as in the shallow SAEs): the trainer's unit-norm constraint then applies per input
unit to every decoder matrix (latent columns and dense-unit columns alike), the sparse decoder is a contiguous atom
matrix for the `sparse_decode` gather, and a decoder tied to its mirror encoder starts as a plain copy of it (the
transpose of the encoder's map). The sparse layer runs through the fast `kernels` path.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.errors import ConfigError
from saelab.saes.base import Latents, SparseAutoencoder, SparseLatents, register
from saelab.saes.initialization import batch_mean, geometric_median
from saelab.saes.kernels import sparse_decode, topk_encode
from saelab.saes.topk import TopKSAEConfig


@dataclasses.dataclass
class DeepSAEConfig(TopKSAEConfig):
    # Dense encoder widths as multiples of d_in, e.g. [2] or [2, 4]; the decoder mirrors them ([4, 2]).
    encoder_multiples: list[float] = dataclasses.field(default_factory=lambda: [2.0])
    # Start every decoder matrix as its mirror encoder matrix's transpose (then unit-normalised per unit).
    tied_init: bool = True
    # The shallow SAEs' convention: subtract the output bias from the input before encoding, and start it at the
    # geometric median of the first batch. Off in the deep recipe, where every Linear has its own bias.
    pre_encoder_bias: bool = False

    def validate(self) -> None:
        super().validate()
        self.dense_widths()

    def dense_widths(self) -> list[int]:
        """Unit counts of the dense encoder layers (the decoder's, reversed); each multiple × d_in must be a
        positive whole number so the layer can be mirrored."""
        widths = []
        for i, multiple in enumerate(self.encoder_multiples):
            units = multiple * self.d_in
            whole = math.isfinite(units) and round(units) >= 1 and math.isclose(units, round(units), abs_tol=1e-9)
            if not whole:
                raise ConfigError(
                    f"encoder_multiples[{i}]={multiple} gives {units:g} units for d_in={self.d_in}; every dense "
                    "width must be a positive whole number of units to be mirrored in the decoder"
                )
            widths.append(round(units))
        return widths


@register
class DeepSAE(SparseAutoencoder):
    """x → [ReLU(Linear)]* → top-k(Linear) = z → [ReLU(Linear)]* → Linear = x̂, dense widths mirrored."""

    architecture = "deep"
    config_class = DeepSAEConfig
    cfg: DeepSAEConfig

    def __init__(self, cfg: DeepSAEConfig):
        super().__init__(cfg)
        widths = [cfg.d_in, *cfg.dense_widths(), cfg.n_latents]
        self.W_enc = nn.ParameterList(
            nn.Parameter(torch.empty(w_out, w_in)) for w_in, w_out in zip(widths, widths[1:], strict=False)
        )
        self.b_enc = nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in widths[1:])
        mirrored = widths[::-1]
        self.W_dec = nn.ParameterList(
            nn.Parameter(torch.empty(w_in, w_out)) for w_in, w_out in zip(mirrored, mirrored[1:], strict=False)
        )
        self.b_dec = nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in mirrored[1:])
        self._initialize()

    @torch.no_grad()
    def _initialize(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-normal weights (fan-in, ReLU gain), zero biases; decoders tied to their mirror encoders or
        drawn alike, then unit-normalised per unit. Draws from `generator` (default: torch's global one, which the
        constructor uses; build under `initialization.seeded` for a reproducible SAE)."""
        for weight in self.W_enc:
            nn.init.kaiming_normal_(weight, nonlinearity="relu", generator=generator)
        for weight, mirror in zip(self.W_dec, reversed(self.W_enc), strict=True):
            if self.cfg.tied_init:
                weight.copy_(mirror)
            else:
                nn.init.kaiming_normal_(weight.T, nonlinearity="relu", generator=generator)
            weight.div_(weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def output_bias(self) -> Tensor:
        return self.b_dec[-1]

    def encode(self, x: Tensor) -> SparseLatents:
        lead = x.shape[:-1]
        h = x.reshape(-1, self.d_in)
        pre_bias = self.output_bias if self.cfg.pre_encoder_bias else None
        if pre_bias is not None and len(self.W_enc) > 1:
            h, pre_bias = h - pre_bias, None
        for weight, bias in zip(self.W_enc[:-1], self.b_enc[:-1], strict=True):
            h = torch.relu(F.linear(h, weight, bias))
        values, indices = topk_encode(h, self.W_enc[-1], self.b_enc[-1], self.k, pre_bias=pre_bias)
        return SparseLatents(values.reshape(*lead, self.k), indices.reshape(*lead, self.k), self.n_latents)

    def decode(self, latents: Latents) -> Tensor:
        if isinstance(latents, SparseLatents):
            h = sparse_decode(latents.values, latents.indices, self.W_dec[0]) + self.b_dec[0]
        else:
            h = latents @ self.W_dec[0] + self.b_dec[0]
        for weight, bias in zip(self.W_dec[1:], self.b_dec[1:], strict=True):
            h = torch.relu(h) @ weight + bias
        return h

    def decoder_matrices(self) -> list[Tensor]:
        return list(self.W_dec)

    def latent_parameters(self) -> dict[str, int]:
        """The sparse layer's encoder rows and bias and its decoder rows (what resampling re-initialises)."""
        last = len(self.W_enc) - 1
        return {f"W_enc.{last}": 0, f"b_enc.{last}": 0, "W_dec.0": 0}

    @torch.no_grad()
    def initialize_from_batch(self, x_n: Tensor) -> None:
        """Only the shallow convention (`pre_encoder_bias`) starts the output bias at the data, at the first batch's
        mean as a shallow SAE's b_dec; the deep recipe keeps every bias at zero."""
        if self.cfg.pre_encoder_bias:
            self.output_bias.copy_(batch_mean(x_n))

    @torch.no_grad()
    def init_b_dec_geometric_median(self, x: Tensor, iters: int = 100) -> None:
        """Only the shallow convention (`pre_encoder_bias`) starts the output bias at the data's geometric median;
        the deep recipe keeps every bias at zero."""
        if self.cfg.pre_encoder_bias:
            self.output_bias.copy_(geometric_median(x.reshape(-1, self.d_in), iters=iters))

    def flops_per_token(self) -> int:
        """Dense layers 2·in·out each; the sparse encoder one dense GEMM (2·units_in·n); the sparse decode
        2·k·units_out (biases not counted, as for the shallow SAEs)."""
        dense_enc = sum(2 * w.shape[0] * w.shape[1] for w in self.W_enc[:-1])
        dense_dec = sum(2 * w.shape[0] * w.shape[1] for w in self.W_dec[1:])
        sparse = 2 * self.W_enc[-1].numel() + 2 * self.k * self.W_dec[0].shape[1]
        return dense_enc + sparse + dense_dec
