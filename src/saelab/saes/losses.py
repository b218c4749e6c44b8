"""Loss terms that SAEs compose in `training_loss`, each a function of what an SAE's `forward` returns (plus, for
AuxK, the SAE's `auxk_latents` and `decode`).

Each takes an optional `share` (`saelab.saes.base.BatchShare`): in data-parallel training the tensors are this
process's slice of the batch, and the term is then this process's share of the whole batch's value (its sums over
the whole batch's count or variance), so the shares add up to the one-process value. Without `share` the term is the
batch's own value, computed exactly as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from saelab.metrics import fraction_of_variance_unexplained, mse
from saelab.saes.kernels import take_latents
from saelab.saes.latents import Latents, SparseLatents

if TYPE_CHECKING:
    from saelab.saes.base import BatchShare, SparseAutoencoder


def _sq_err(x: Tensor, x_hat: Tensor) -> Tensor:
    return (x_hat - x).reshape(-1).pow(2).sum()


def reconstruction_loss(x_n: Tensor, x_hat: Tensor, kind: str, share: BatchShare | None = None) -> Tensor:
    """"fvu": pooled batch FVU (scale-free, so lr does not depend on activation scale); "mse": mean squared error
    over elements (the deep-SAE recipe). With `share`: this slice's squared error over the whole batch's
    denominator (x_n is data, so the denominator carries no gradient)."""
    if share is None:
        return fraction_of_variance_unexplained(x_n, x_hat) if kind == "fvu" else mse(x_n, x_hat)
    if kind == "fvu":
        return _sq_err(x_n, x_hat) / share.x_sq_dev
    return _sq_err(x_n, x_hat) / (share.n_tokens * x_n.shape[-1])


def l1_penalty(latents: Latents, decoder_norms: Tensor, share: BatchShare | None = None) -> Tensor:
    """Mean over tokens of Σ_i |z_i|·||d_i||: weighting by the decoder norm stops the SAE shrinking latents while
    growing their decoder directions (matters when the decoder is not constrained to unit norm)."""
    if isinstance(latents, SparseLatents):
        weighted = latents.values.abs() * take_latents(decoder_norms, latents.indices)
    else:
        weighted = latents.abs() * decoder_norms
    per_token = weighted.reshape(-1, weighted.shape[-1]).sum(-1)
    return per_token.mean() if share is None else per_token.sum() / share.n_tokens


def activation_decay_penalty(latents: Latents, n_latents: int, share: BatchShare | None = None) -> Tensor:
    """mean over batch × latents of z² (the deep-SAE recipe); a top-k SAE's unselected latents count as 0."""
    values = latents.values if isinstance(latents, SparseLatents) else latents
    n_tokens = values.numel() // values.shape[-1] if share is None else share.n_tokens
    return values.pow(2).sum() / (n_tokens * n_latents)


def auxk_loss(
    sae: SparseAutoencoder, x_n: Tensor, x_hat: Tensor, dead: Tensor, k_aux: int, share: BatchShare | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """AuxK (Gao et al.): the dead latents' top-k_aux reconstruct the residual e = x − x̂, scored like the main
    loss: ||e − ê||² / ||e − mean(e)||², scaled by min(n_dead / k_aux, 1).

    ê is the decoder's linear part only, decode(z_aux) − decode(0): the residual already excludes b_dec, so
    adding it again (a known bug in some implementations) would make AuxK fit b_dec instead of the residual.
    With `share`, the denominator is the whole batch's residual variance (`dead` is the same on every process).
    `target`: what x̂ predicts when it is not the input x_n itself (a transcoder's target); the residual is its.
    """
    n_dead = int(dead.sum().item())
    if n_dead == 0:
        return x_hat.new_zeros(())
    k = min(k_aux, n_dead)
    residual = ((x_n if target is None else target) - x_hat).detach()
    aux = sae.auxk_latents(x_n, dead, k)
    offset = sae.decode(SparseLatents(aux.values.new_zeros(1, 1), aux.indices.new_zeros(1, 1), aux.n_latents))
    e_hat = sae.decode(aux) - offset
    scale = min(n_dead / k_aux, 1.0)
    if share is None:
        return scale * fraction_of_variance_unexplained(residual, e_hat)
    return scale * _sq_err(residual, e_hat) / share.sq_dev(residual)
