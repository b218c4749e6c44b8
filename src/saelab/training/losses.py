"""Loss terms, each a function of what any SAE's `forward` returns (plus, for AuxK and L1, an optional method).

Optional SAE methods the terms use (the trainer checks for them up front):
- `decoder_norms() -> Tensor[n_latents]`: differentiable norm of each latent's decoder direction (L1 term);
- `auxk_latents(x_n, dead_mask, k_aux) -> SparseLatents`: the top `k_aux` latents among the dead ones by
  pre-activation, differentiable with respect to the encoder (AuxK).
"""

from __future__ import annotations

from torch import Tensor

from saelab.metrics import fraction_of_variance_unexplained, mse
from saelab.saes.base import Latents, SparseAutoencoder, SparseLatents
from saelab.saes.kernels import take_latents
from saelab.training.config import LossKind


def reconstruction_loss(x_n: Tensor, x_hat: Tensor, kind: LossKind) -> Tensor:
    """"fvu": pooled batch FVU (scale-free, so lr does not depend on activation scale); "mse": mean squared error
    over elements (the deep-SAE recipe)."""
    return fraction_of_variance_unexplained(x_n, x_hat) if kind == "fvu" else mse(x_n, x_hat)


def l1_penalty(latents: Latents, decoder_norms: Tensor) -> Tensor:
    """Mean over tokens of Σ_i |z_i|·||d_i||: weighting by the decoder norm stops the SAE shrinking latents while
    growing their decoder directions (matters when the decoder is not constrained to unit norm)."""
    if isinstance(latents, SparseLatents):
        weighted = latents.values.abs() * take_latents(decoder_norms, latents.indices)
    else:
        weighted = latents.abs() * decoder_norms
    return weighted.reshape(-1, weighted.shape[-1]).sum(-1).mean()


def activation_decay_penalty(latents: Latents, n_latents: int) -> Tensor:
    """mean over batch × latents of z² (the deep-SAE recipe); a top-k SAE's unselected latents count as 0."""
    values = latents.values if isinstance(latents, SparseLatents) else latents
    n_tokens = values.numel() // values.shape[-1]
    return values.pow(2).sum() / (n_tokens * n_latents)


def auxk_loss(sae: SparseAutoencoder, x_n: Tensor, x_hat: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK (Gao et al.): the dead latents' top-k_aux reconstruct the residual e = x − x̂, scored like the main
    loss: ||e − ê||² / ||e − mean(e)||², scaled by min(n_dead / k_aux, 1).

    ê is the decoder's linear part only, decode(z_aux) − decode(0): the residual already excludes b_dec, so
    adding it again (a known bug in some implementations) would make AuxK fit b_dec instead of the residual.
    """
    n_dead = int(dead.sum().item())
    if n_dead == 0:
        return x_hat.new_zeros(())
    k = min(k_aux, n_dead)
    residual = (x_n - x_hat).detach()
    aux = sae.auxk_latents(x_n, dead, k)
    offset = sae.decode(SparseLatents(aux.values.new_zeros(1, 1), aux.indices.new_zeros(1, 1), aux.n_latents))
    e_hat = sae.decode(aux) - offset
    scale = min(n_dead / k_aux, 1.0)
    return scale * fraction_of_variance_unexplained(residual, e_hat)

