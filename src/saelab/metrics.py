"""Every metric saelab reports, defined once, with its formula, so all numbers mean the same thing everywhere.

Conventions. Activations `x` and reconstructions `x_hat` are `[..., d]`; all leading dimensions are tokens.
Latents are a dense `[..., n]` tensor or `SparseLatents`. Token-level language-model metrics take logits
`[N, T, V]`, `input_ids [N, T]` and an optional boolean `mask [N, T]` of positions that count.

Reconstruction metrics are plain functions of one batch; the `*Accumulator` classes give the same numbers
exactly over many batches (pooled sums, never a mean of per-batch ratios).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.saes import native
from saelab.saes.latents import Latents, SparseLatents

SliceSpec = slice | tuple[int, int]


# ---------------------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------------------


def _tokens(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _per_dim_sums(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """Per dimension j: (Σ_t (x_tj − x̂_tj)², Σ_t (x_tj − mean_t x_tj)²). Every FVU below is built from these."""
    x, x_hat = _tokens(x), _tokens(x_hat)
    sq_err = (x - x_hat).pow(2).sum(0)
    sq_dev = (x - x.mean(0)).pow(2).sum(0)
    return sq_err, sq_dev


def fraction_of_variance_unexplained(x: Tensor, x_hat: Tensor) -> Tensor:
    """Pooled FVU = Σ_t ||x_t − x̂_t||² / Σ_t ||x_t − mean(x)||², mean over the tokens given.

    This is the deep-SAE write-up's "normalized MSE" (MSE divided by the variance around the batch mean).
    Differentiable, so the trainer's default loss is exactly this number. A per-dimension average of ratios is
    a different quantity and is not offered under this name.
    """
    return _PooledFVU.apply(_tokens(x), _tokens(x_hat))


class _PooledFVU(torch.autograd.Function):
    """FVU = E / V with E = Σ ||x̂ − x||² and V = Σ ||x − mean(x)||², in five passes over [B, d] and one in the
    backward (the composed ops take about twelve: it is the training loss, paid every step). On CPU in float32 the
    forward is one native pass over each matrix, accumulated in double (`native.fvu_sums`: 1.7 against 3.1 ms at
    4,096 x 768), and the backward forms the error it did not keep.

    dFVU/dx̂ = 2(x̂ − x) / V;  dFVU/dx = −2(x̂ − x) / V − 2E (x − mean(x)) / V²  (the mean's own derivative cancels,
    since Σ_t (x_t − mean) = 0).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, x_hat: Tensor) -> Tensor:
        ctx.dtypes = (x.dtype, x_hat.dtype)
        ctx.kept_error = not (native.rows_supported(x, x_hat) and x.shape == x_hat.shape)
        if not ctx.kept_error:
            sq_err, sq_dev = (torch.tensor(v, dtype=torch.float64) for v in native.fvu_sums(x, x_hat))
            ctx.save_for_backward(x, x_hat, sq_err, sq_dev)
            return (sq_err / sq_dev).to(x.dtype)
        err = x_hat - x
        sq_err = torch.linalg.vector_norm(err).square()
        sq_dev = torch.linalg.vector_norm(x - x.mean(0)).square()  # x.var(0) is 4x slower on CPU
        ctx.save_for_backward(x, err, sq_err, sq_dev)
        return sq_err / sq_dev

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, saved, sq_err, sq_dev = ctx.saved_tensors
        err = saved if ctx.kept_error else saved - x  # saved: the error, or x̂ itself
        scale = (2 * grad / sq_dev).to(err.dtype)
        grad_x = grad_x_hat = None
        if ctx.needs_input_grad[1]:
            grad_x_hat = (err * scale).to(ctx.dtypes[1])
        if ctx.needs_input_grad[0]:
            grad_x = (-(err * scale) - (scale * sq_err / sq_dev) * (x - x.mean(0))).to(ctx.dtypes[0])
        return grad_x, grad_x_hat


def _slice_of(spec: SliceSpec) -> slice:
    return spec if isinstance(spec, slice) else slice(*spec)


def per_slice_fvu(x: Tensor, x_hat: Tensor, slices: Sequence[SliceSpec]) -> Tensor:
    """FVU of each slice of the feature dimension (e.g. each layer of a multi-layer input), `[len(slices)]`.

    FVU_l = Σ_t ||x_tl − x̂_tl||² / V_l with V_l = Σ_t ||x_tl − mean(x_l)||². When the slices partition the
    dimensions, the total FVU is the variance-weighted mean of the per-slice ones:
    FVU = Σ_l (V_l / Σ_m V_m) · FVU_l  — so a layer with little variance barely moves the total.
    """
    sq_err, sq_dev = _per_dim_sums(x, x_hat)
    return _ratio_per_slice(sq_err, sq_dev, slices)


def _ratio_per_slice(sq_err: Tensor, sq_dev: Tensor, slices: Sequence[SliceSpec]) -> Tensor:
    return torch.stack([sq_err[_slice_of(s)].sum() / sq_dev[_slice_of(s)].sum() for s in slices])


def per_dimension_fvu(x: Tensor, x_hat: Tensor, slices: Sequence[SliceSpec] | None = None) -> Tensor:
    """Per-dimension-mean FVU = mean over dimensions j of Σ_t (x_tj − x̂_tj)² / Σ_t (x_tj − mean_t x_tj)².

    The multi-layer write-up's FVU (a mean of ratios, so a low-variance dimension counts as much as a high-variance
    one; the pooled `fraction_of_variance_unexplained` weights dimensions by their variance). Invariant to scaling
    any dimension. Dimensions with zero variance have no ratio and are left out of the mean. With `slices`, one
    value per slice `[len(slices)]` (the mean over that slice's dimensions); without, a scalar over all dimensions.
    """
    sq_err, sq_dev = _per_dim_sums(x, x_hat)
    return _mean_ratio(sq_err, sq_dev, slices)


def _mean_ratio(sq_err: Tensor, sq_dev: Tensor, slices: Sequence[SliceSpec] | None) -> Tensor:
    def mean_over(part: slice) -> Tensor:
        err, dev = sq_err[part], sq_dev[part]
        varies = dev > 0
        return (err[varies] / dev[varies]).mean()

    if slices is None:
        return mean_over(slice(None))
    return torch.stack([mean_over(_slice_of(s)) for s in slices])


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean squared error over every element: mean_{t,j} (x_tj − x̂_tj)² (per dimension, not per token)."""
    return (x - x_hat).pow(2).mean()


def cosine_similarity(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-token cosine cos(x_t, x̂_t), `[tokens]` (norms clamped at 1e-8). Report its mean over tokens."""
    return F.cosine_similarity(_tokens(x), _tokens(x_hat), dim=-1, eps=1e-8)


# ---------------------------------------------------------------------------------------------------------
# Sparsity
# ---------------------------------------------------------------------------------------------------------


def _active_per_token(latents: Latents) -> Tensor:
    values = latents.values if isinstance(latents, SparseLatents) else latents
    return (values != 0).reshape(-1, values.shape[-1]).sum(-1)


def l0(latents: Latents) -> Tensor:
    """L0 = mean over tokens of the number of nonzero latents. A top-k latent whose value is 0 is not counted."""
    return _active_per_token(latents).float().mean()


def fire_counts(latents: Latents) -> Tensor:
    """Per latent, on how many of the given tokens it is nonzero: int64 `[n_latents]`."""
    if isinstance(latents, SparseLatents):
        active = (latents.values != 0).reshape(-1).long()  # no boolean indexing: no host sync on GPU
        counts = torch.zeros(latents.n_latents, dtype=torch.long, device=active.device)
        return counts.index_add_(0, latents.indices.reshape(-1), active)
    return (latents.reshape(-1, latents.shape[-1]) != 0).sum(0)


def dead_mask(tokens_since_fired: Tensor, window_tokens: int) -> Tensor:
    """Dead = no activation within the last `window_tokens` tokens: tokens_since_fired >= window_tokens.

    A latent is never dead before a full window has been seen, so the count starts at zero for everyone.
    """
    return tokens_since_fired >= window_tokens


def dead_fraction(fired: Tensor) -> float:
    """Fraction of latents with no activation in a window: mean_i [fired_i == 0].

    `fired` is per latent: activation counts over the window (e.g. `fire_counts` summed over evaluation tokens),
    or booleans "fired within the window" (e.g. `~dead_mask(...)`).
    """
    return (fired == 0).double().mean().item()


# ---------------------------------------------------------------------------------------------------------
# Downstream (language model with the SAE spliced in)
# ---------------------------------------------------------------------------------------------------------


def token_cross_entropy(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Next-token CE at each position t < T−1: −log softmax(logits[:, t])[input_ids[:, t+1]], `[N, T−1]`."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(
        targets.shape
    )


def token_kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(P || Q) at each position, with P = softmax(logits_p), Q = softmax(logits_q): Σ_v P_v (log P_v − log Q_v)."""
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    return values.mean() if mask is None else values[mask].mean()


def cross_entropy(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean next-token CE over the predictions made at positions where `mask` is True (the prediction made at
    position t is of token t+1, so the last position has none)."""
    return _masked_mean(token_cross_entropy(logits, input_ids), None if mask is None else mask[:, :-1])


def kl_divergence(logits_clean: Tensor, logits_spliced: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(clean || spliced) per token, averaged over the positions where `mask` is True."""
    return _masked_mean(token_kl_divergence(logits_clean, logits_spliced), mask)


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(CE_ablated − CE_spliced) / (CE_ablated − CE_clean): 1 when splicing costs nothing, 0 when it is as bad
    as ablating the site (zero or mean ablation, whichever `ce_ablated` came from)."""
    return (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)


# ---------------------------------------------------------------------------------------------------------
# Streaming accumulators: exact pooled values over many batches
# ---------------------------------------------------------------------------------------------------------


class MeanAccumulator:
    """Exact mean of many values given in batches (Σ values / count, in float64)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, values: Tensor) -> None:
        self.total += values.double().sum().item()
        self.count += values.numel()

    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


class FVUAccumulator:
    """Pooled FVU, MSE, per-slice and per-dimension-mean FVU over many batches, equal to the one-batch functions on
    the concatenation.

    Keeps per-dimension squared errors and the per-dimension sum of squared deviations from the running mean,
    merged batch by batch with Chan et al.'s parallel-variance update (float64), so the mean of all tokens is used
    without a second pass.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.sq_dev: Tensor | None = None
        self.sq_err: Tensor | None = None

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = _tokens(x.detach()).double(), _tokens(x_hat.detach()).double()
        n_b = x.shape[0]
        if n_b == 0:
            return
        sq_err, sq_dev = _per_dim_sums(x, x_hat)
        mean_b = x.mean(0)
        if self.mean is None:
            self.n, self.mean, self.sq_dev, self.sq_err = n_b, mean_b, sq_dev, sq_err
            return
        n_new = self.n + n_b
        delta = mean_b - self.mean
        self.sq_dev = self.sq_dev + sq_dev + delta.pow(2) * (self.n * n_b / n_new)
        self.mean = self.mean + delta * (n_b / n_new)
        self.sq_err = self.sq_err + sq_err
        self.n = n_new

    def _require(self) -> tuple[Tensor, Tensor]:
        if self.sq_err is None or self.sq_dev is None:
            raise ValueError("FVUAccumulator has seen no tokens; call update() first")
        return self.sq_err, self.sq_dev

    def fvu(self) -> float:
        sq_err, sq_dev = self._require()
        return (sq_err.sum() / sq_dev.sum()).item()

    def mse(self) -> float:
        sq_err, _ = self._require()
        return (sq_err.sum() / (self.n * sq_err.numel())).item()

    def per_slice_fvu(self, slices: Sequence[SliceSpec]) -> list[float]:
        sq_err, sq_dev = self._require()
        return _ratio_per_slice(sq_err, sq_dev, slices).tolist()

    def per_dimension_fvu(self) -> float:
        """`per_dimension_fvu` over every token seen."""
        return _mean_ratio(*self._require(), None).item()

    def per_slice_per_dimension_fvu(self, slices: Sequence[SliceSpec]) -> list[float]:
        return _mean_ratio(*self._require(), slices).tolist()


class LatentAccumulator:
    """L0 and per-latent fire counts over many batches (for L0 and the dead fraction of an evaluation set)."""

    def __init__(self, n_latents: int) -> None:
        self.counts = torch.zeros(n_latents, dtype=torch.long)
        self.active = 0
        self.tokens = 0

    def update(self, latents: Latents) -> None:
        per_token = _active_per_token(latents)
        self.active += int(per_token.sum().item())
        self.tokens += per_token.numel()
        self.counts += fire_counts(latents).cpu()

    def l0(self) -> float:
        return self.active / self.tokens if self.tokens else float("nan")

    def dead_fraction(self) -> float:
        return dead_fraction(self.counts)
