"""Which next tokens a latent promotes and suppresses: its decoder direction read through the unembedding.

The direction of latent i is decode(a·e_i) − decode(0) in the SAE's input space, scaled to unit norm: exactly the
decoder row for a shallow SAE, and the effect of the latent at strength `a` (its largest recorded activation) for a
deep SAE, whose decoder is nonlinear. Every preprocessing kind maps back to raw activations by a positive scale per
token plus an offset, so the direction is the same in the raw residual stream. Logit effects are W_U @ d, the
direct path only: the model's final norm is skipped (neither its normalisation nor its gain is applied), as in the
usual "logit lens" reading of decoder directions. Meaningful only for SAEs of residual-stream sites.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saelab.saes.base import SparseAutoencoder

RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def reads_residual_stream(hookpoint: str | None) -> bool:
    """True for sites that live in the residual-stream basis (the stream itself or what a sublayer adds to it)."""
    return hookpoint is not None and hookpoint.split(".")[0] in RESIDUAL_KINDS


@torch.no_grad()
def decoder_directions(sae: SparseAutoencoder, latents: Sequence[int], strengths: Sequence[float]) -> Tensor:
    """Unit-norm `[len(latents), d_in]` directions (see the module docstring); `strengths` must be > 0."""
    dtype = next(sae.parameters()).dtype
    z = torch.zeros(len(latents), sae.n_latents, device=sae.device, dtype=dtype)
    z[torch.arange(len(latents)), torch.tensor(list(latents), dtype=torch.long)] = torch.tensor(
        list(strengths), dtype=dtype, device=sae.device
    )
    delta = sae.decode(z) - sae.decode(torch.zeros(1, sae.n_latents, device=sae.device, dtype=dtype))
    return (delta / delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float().cpu()


@torch.no_grad()
def logit_effects(directions: Tensor, unembedding: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top values, top token ids, bottom values, bottom token ids), each `[n, k]`, of `unembedding [vocab, d]`
    applied to each direction."""
    logits = directions.to(unembedding.dtype) @ unembedding.detach().cpu().T
    top = logits.topk(k, dim=-1)
    bottom = logits.topk(k, dim=-1, largest=False)
    return top.values.float(), top.indices, bottom.values.float(), bottom.indices
