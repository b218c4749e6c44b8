"""Gradient pursuit on a frozen SAE decoder: a better encoder at the same L0 (dark matter, experiment 9).

Smith (2024)'s non-negative gradient pursuit, exactly as "Decomposing The Dark Matter of Sparse Autoencoders" runs
it, per token with that token's own L0 budget (the number of latents its SAE encoding used):

    s = x − b_dec, w = 0; repeat L0 times:
        r = s − wD; g0 = r Dᵀ; add argmax(g0) to the support; g = g0 on the support, 0 elsewhere;
        c = g D; η = <c, r> / <c, c>; w = max(w + η g, 0)
    output wD + b_dec

All tokens of a chunk iterate together up to the largest budget, a token's updates stopping once its own budget is
spent. The support is kept as up to L0 (index, value) slots per token, so a step costs one [tokens, n_latents]
GEMM (r Dᵀ) plus O(L0·d) per token; nothing else scales with the dictionary width.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from saelab.saes.base import SparseLatents
from saelab.saes.shallow import ShallowSAE

# Bytes of the per-chunk [tokens, n_latents] gradient plus [tokens, L0, d] atom buffer.
CHUNK_BYTES = 128 << 20


@dataclasses.dataclass
class PursuitResult:
    """Codes (distinct indices per token; unused slots hold value 0), the reconstruction, and for checking
    convergence the squared residual norm ||s − wD||² of every token before each step and after the last,
    `[max L0 + 1, tokens]` (constant once a token's budget is spent)."""

    codes: SparseLatents
    reconstruction: Tensor
    residual_sq_norms: Tensor


@torch.no_grad()
def gradient_pursuit(x: Tensor, decoder: Tensor, b_dec: Tensor, l0_per_token: Tensor) -> PursuitResult:
    """Pursuit of x [N, d] on `decoder` [n_latents, d] (rows = atoms) with budgets `l0_per_token` [N] (int)."""
    n_latents, d = decoder.shape
    if x.dim() != 2 or x.shape[1] != d or l0_per_token.shape != (x.shape[0],):
        raise ValueError(
            f"expected x [N, {d}] and l0_per_token [N]; got x {tuple(x.shape)}, l0 {tuple(l0_per_token.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError("gradient_pursuit got no tokens")
    budget = int(l0_per_token.max().item())
    if budget > n_latents or (l0_per_token < 0).any():
        raise ValueError(f"L0 budgets must lie in 0..{n_latents} (the number of atoms); got max {budget}")
    decoder, b_dec = decoder.to(x.dtype), b_dec.to(x.dtype)
    rows = max(1, CHUNK_BYTES // (x.element_size() * (n_latents + max(budget, 1) * d)))
    parts = [
        _pursue(x[i : i + rows], decoder, b_dec, l0_per_token[i : i + rows].to(x.device), budget)
        for i in range(0, x.shape[0], rows)
    ]
    values, indices, recon, residuals = zip(*parts, strict=True)
    codes = SparseLatents(torch.cat(values), torch.cat(indices), n_latents)
    return PursuitResult(codes, torch.cat(recon), torch.cat(residuals, dim=1))


def _pursue(
    x: Tensor, decoder: Tensor, b_dec: Tensor, budget_per_token: Tensor, budget: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    s = x - b_dec
    rows, d = s.shape
    values = s.new_zeros(rows, budget)
    indices = torch.zeros(rows, budget, dtype=torch.long, device=s.device)
    in_support = torch.zeros(rows, budget, dtype=torch.bool, device=s.device)
    atoms = s.new_zeros(rows, budget, d)
    residuals = []
    residual = s
    for step in range(budget):
        residuals.append(residual.pow(2).sum(-1))
        g0 = residual @ decoder.T
        best = g0.argmax(-1)
        active = budget_per_token > step
        # A chosen atom already in the support leaves the support as it is (the slot stays unused).
        known = ((indices[:, :step] == best[:, None]) & in_support[:, :step]).any(-1)
        new = active & ~known
        indices[:, step] = torch.where(new, best, 0)
        in_support[:, step] = new
        atoms[:, step] = decoder[best] * new[:, None]
        g = g0.gather(1, indices) * in_support
        c = torch.bmm(g[:, None, :], atoms)[:, 0]
        cc = c.pow(2).sum(-1)
        eta = torch.where(active & (cc > 0), (c * residual).sum(-1) / cc.clamp_min(torch.finfo(cc.dtype).tiny), 0)
        values = (values + eta[:, None] * g).clamp_min(0)
        residual = s - torch.bmm(values[:, None, :], atoms)[:, 0]
    residuals.append(residual.pow(2).sum(-1))
    return values, _distinct_indices(indices, in_support), x - residual, torch.stack(residuals)


def _distinct_indices(indices: Tensor, in_support: Tensor) -> Tensor:
    """Give unused slots (value 0) indices outside the token's support and distinct from each other, so that
    scattering the codes into a dense tensor is well defined. Candidates 0..L0−1 always suffice."""
    rows, budget = indices.shape
    if budget == 0:
        return indices
    candidates = torch.arange(budget, device=indices.device)
    taken = ((indices[:, :, None] == candidates) & in_support[:, :, None]).any(1)  # [rows, candidates]
    free_first = torch.argsort(taken.to(torch.uint8), dim=1, stable=True)  # free candidates in increasing order
    rank_among_unused = (~in_support).cumsum(1) - 1
    filler = candidates[free_first.gather(1, rank_among_unused.clamp_min(0))]
    return torch.where(in_support, indices, filler)


@torch.no_grad()
def sae_gradient_pursuit(sae: ShallowSAE, x: Tensor) -> PursuitResult:
    """Pursuit with the SAE's own frozen decoder, each token budgeted the L0 of its SAE encoding.

    Runs in the SAE's normalised space (where its decoder lives); the returned reconstruction is mapped back to
    raw activations, comparable with `sae.reconstruct(x)`.
    """
    if not isinstance(sae, ShallowSAE):
        raise TypeError(f"gradient pursuit needs one linear decoder and b_dec (a ShallowSAE), got {type(sae).__name__}")
    flat = x.reshape(-1, sae.d_in).to(sae.b_dec.dtype)
    x_n, stats = sae.normalize(flat)
    latents = sae.encode(x_n)
    values = latents.values if isinstance(latents, SparseLatents) else latents
    result = gradient_pursuit(x_n, sae.decoder_weight, sae.b_dec, (values != 0).sum(-1))
    return dataclasses.replace(result, reconstruction=sae.denormalize(result.reconstruction, stats))
