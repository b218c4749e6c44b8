"""The JumpReLU SAE: z_i = pre_i · H(pre_i − θ_i) with a learned threshold θ_i per latent (Gemma Scope; SAELens
"jumprelu"; dictionary_learning's BatchTopK at inference), trained as in "Jumping Ahead: Improving Reconstruction
Fidelity with JumpReLU Sparse Autoencoders" (Rajamanoharan et al., 2024).

Training. The threshold gets no gradient through the step function itself, so both places it enters use the
paper's straight-through pseudo-derivatives with a rectangle kernel K(u) = 1{|u| < 1/2} of bandwidth ε:

- the activation: ∂/∂θ [pre · H(pre − θ)] := −(θ/ε) · K((pre − θ)/ε), and ∂/∂pre := H(pre − θ) (exact off the jump);
- the L0 penalty: ∂/∂θ H(pre − θ) := −(1/ε) · K((pre − θ)/ε), and nothing to pre.

The loss is the reconstruction plus either `l0_coefficient` · mean L0 (the paper's penalty) or, with `target_l0`,
`l0_coefficient` · (mean L0 / target_l0 − 1)² (dictionary_learning's target mode, which steers L0 to the target).
θ is stored as is (`threshold`, as every format names it) and used through ReLU, so a negative θ acts as 0.
ε and the initial θ are in the units of the normalised input (E||x|| = sqrt(d) with preprocessing="scale").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.errors import ConfigError
from saelab.saes.base import ForwardOutput, LossTerm, SAEConfig, TrainingContext, register
from saelab.saes.shallow import ShallowSAE


@dataclasses.dataclass
class JumpReLUSAEConfig(SAEConfig):
    # Gemma Scope encodes x itself (False); SAELens-trained SAEs subtract b_dec first (True).
    apply_b_dec_to_input: bool = False
    bandwidth: float = 0.001  # ε of the straight-through estimator
    initial_threshold: float = 0.001
    l0_coefficient: float = 1.0
    target_l0: float | None = None  # set: penalise (L0/target − 1)² instead of L0

    def validate(self) -> None:
        super().validate()
        if not self.bandwidth > 0 or self.l0_coefficient < 0:
            raise ConfigError(f"bandwidth ({self.bandwidth}) must be positive and l0_coefficient "
                              f"({self.l0_coefficient}) non-negative")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.n_latents:
            raise ConfigError(f"target_l0={self.target_l0} must be in (0, n_latents={self.n_latents}]")


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ) with the straight-through pseudo-derivative in θ (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.bandwidth / 2).to(grad)
        grad_theta = -(theta / ctx.bandwidth) * (grad * window).reshape(-1, theta.numel()).sum(0)
        return grad * (pre > theta), grad_theta, None


class _Step(torch.autograd.Function):
    """H(pre − θ) with the straight-through pseudo-derivative in θ and none in pre."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.bandwidth / 2).to(grad)
        return None, -(grad * window).reshape(-1, theta.numel()).sum(0) / ctx.bandwidth, None


def jumprelu(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    return _JumpReLU.apply(pre, theta, bandwidth)


def step(pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    return _Step.apply(pre, theta, bandwidth)


@register
class JumpReLUSAE(ShallowSAE):
    """z = ReLU(pre) · [pre > ReLU(θ)], pre = (x − b_dec·apply_b_dec_to_input) @ W_enc.T + b_enc;
    x_hat = z @ W_dec + b_dec."""

    architecture = "jumprelu"
    config_class = JumpReLUSAEConfig
    cfg: JumpReLUSAEConfig

    def __init__(self, cfg: JumpReLUSAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.full((cfg.n_latents,), cfg.initial_threshold))

    def pre_activations(self, x: Tensor) -> Tensor:
        return F.linear(x - self.b_dec if self.cfg.apply_b_dec_to_input else x, self.W_enc, self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        # pre · H(pre − θ⁺) = ReLU(pre) · [pre > θ⁺] as θ⁺ = ReLU(θ) >= 0
        return jumprelu(self.pre_activations(x), self.threshold.relu(), self.cfg.bandwidth)

    def training_loss(self, x_n: Tensor, output: ForwardOutput, ctx: TrainingContext,
                      dead_mask: Callable[[], Tensor]) -> dict[str, LossTerm]:
        terms = super().training_loss(x_n, output, ctx, dead_mask)
        cfg = self.cfg
        if cfg.l0_coefficient > 0:  # (a second encoder GEMM: the gates need their own pseudo-derivative)
            gates = step(self.pre_activations(x_n), self.threshold.relu(), cfg.bandwidth)
            n_tokens = gates.reshape(-1, self.n_latents).shape[0] if ctx.share is None else ctx.share.n_tokens
            mean_l0 = gates.sum() / n_tokens  # this process's share of the batch's mean L0
            if cfg.target_l0 is None:
                terms["l0"] = LossTerm(mean_l0, cfg.l0_coefficient)
            else:
                if ctx.share is not None:
                    raise ConfigError("target_l0 squares the whole batch's L0, which data-parallel processes do not "
                                      "see; use l0_coefficient alone, or train in one process")
                terms["l0_target"] = LossTerm((mean_l0 / cfg.target_l0 - 1).square(), cfg.l0_coefficient)
        return terms

    def latent_parameters(self) -> dict[str, int]:
        return {**super().latent_parameters(), "threshold": 0}

    def flops_per_token(self) -> int:
        return 4 * self.d_in * self.n_latents
