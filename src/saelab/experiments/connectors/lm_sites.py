"""Feature connectors inside a language model: the MLP of one block replaced by encode → connector → decode, and
the effect of removing one SAE feature on the model's next-token logits.

The MLP's output is a function of its input alone (`mlp_in` is the normalised residual the MLP reads, `mlp_out` its
contribution to the residual stream), so a connector between an SAE on `mlp_in` and one on `mlp_out` can stand in
for the whole MLP, and cross-entropy with it spliced measures how much of the MLP the sparse feature map captures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from saelab.data.tokenize import position_mask
from saelab.errors import ConfigError, DataError
from saelab.models.hookpoints import resolve_hookpoint
from saelab.models.hooks import Replacement, forward_with
from saelab.saes.base import SparseAutoencoder, to_dense


def mlp_sites(model: nn.Module, layer: int) -> tuple[str, str]:
    """(mlp_in.L, mlp_out.L), checked to exist in this model."""
    names = (f"mlp_in.{layer}", f"mlp_out.{layer}")
    for name in names:
        resolve_hookpoint(model, name)
    return names


def mlp_replacement(mlp_in: str, mlp_out: str, through: Callable[[Tensor], Tensor]) -> dict[str, Replacement]:
    """Replacements for `splice_losses`/`forward_with` that make the MLP's output `through(its input)`.

    The input site passes its activation on unchanged and keeps it; the output site, which runs later in the same
    forward pass, discards the MLP's own output and returns `through` of the kept input. Both see the same
    positions in the same order (the splice applies one mask to both).
    """
    kept: list[Tensor] = []

    def keep(activation: Tensor) -> Tensor:
        kept.append(activation)
        return activation

    def replace(activation: Tensor) -> Tensor:
        if not kept:
            raise DataError(f"{mlp_out} ran before {mlp_in}; these are not one MLP's input and output")
        return through(kept.pop())

    return {mlp_in: keep, mlp_out: replace}


class AblationEffect(NamedTuple):
    """One position where the feature fires: how much the logit of the token that actually came next drops when
    the feature's contribution is removed from the activation (positive: the feature helped predict it)."""

    context: int  # row of the contexts given
    position: int
    activation: float
    next_token: int
    logit_drop: float


@torch.no_grad()
def feature_ablation_effects(
    model: nn.Module,
    hookpoint: str,
    sae: SparseAutoencoder,
    feature: int,
    contexts: Tensor,
    batch_size: int = 4,
    drop_first: int = 0,
) -> list[AblationEffect]:
    """Next-token logit drop at every position where `feature` fires, removing only that feature's share of the
    reconstruction, sae(x) − sae(x with the feature zeroed), from the activation at `hookpoint` (the SAE's error
    and every other feature stay, so nothing but this feature changes). Positions before `drop_first` and the
    last one (nothing follows) are not reported."""
    if not 0 <= feature < sae.n_latents:
        raise ConfigError(f"feature {feature} is out of range: the SAE has {sae.n_latents} latents")
    if contexts.ndim != 2 or contexts.shape[1] < 2:
        raise DataError(f"contexts must be token ids [N, T] with T >= 2, got shape {tuple(contexts.shape)}")
    model.eval()
    device = next(model.parameters()).device
    effects = []
    for start in range(0, contexts.shape[0], batch_size):
        ids = contexts[start : start + batch_size].to(device)
        fired: list[Tensor] = []
        clean, _ = forward_with(model, ids)
        ablated, _ = forward_with(model, ids, {hookpoint: _without_feature(sae, feature, fired)})
        following = ids[:, 1:].unsqueeze(-1)
        drop = (clean[:, :-1].gather(-1, following) - ablated[:, :-1].gather(-1, following)).squeeze(-1)
        counted = position_mask(ids, drop_first, ())[:, :-1] & (fired[0][:, :-1] > 0)
        for row, position in counted.nonzero().tolist():
            effects.append(AblationEffect(start + row, position, fired[0][row, position].item(),
                                          int(ids[row, position + 1]), drop[row, position].item()))
    return effects


def _without_feature(sae: SparseAutoencoder, feature: int, fired: list[Tensor]) -> Replacement:
    """A replacement that subtracts `feature`'s share of the SAE reconstruction and appends its activations
    `[..., positions]` to `fired`."""

    def remove(activation: Tensor) -> Tensor:
        flat = activation.reshape(-1, activation.shape[-1]).float()
        x_n, stats = sae.normalize(flat)
        latents = to_dense(sae.encode(x_n))
        without = latents.clone()
        without[:, feature] = 0
        share = sae.denormalize(sae.decode(latents), stats) - sae.denormalize(sae.decode(without), stats)
        fired.append(latents[:, feature].reshape(activation.shape[:-1]))
        return (flat - share).reshape(activation.shape)

    return remove
