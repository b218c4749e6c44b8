"""Evaluate any SAE: reconstruction quality on stored activations, and the downstream cost of splicing it into the
model. All numbers come from `saelab.metrics`, pooled over every evaluated token (not averaged per batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.data.tokenize import position_mask
from saelab.errors import DataError
from saelab.metrics import (
    FVUAccumulator,
    LatentAccumulator,
    MeanAccumulator,
    SliceSpec,
    ce_loss_recovered,
    cosine_similarity,
    token_cross_entropy,
    token_kl_divergence,
)
from saelab.models.hooks import forward_with
from saelab.saes.base import SparseAutoencoder


@torch.no_grad()
def evaluate_reconstruction(
    sae: SparseAutoencoder, batches: Iterable[Tensor], slices: Sequence[SliceSpec] | None = None
) -> dict[str, Any]:
    """Reconstruction metrics over all tokens of `batches` (raw `[B, d_in]` activations).

    `fvu`, `mse`, `cosine` and `per_slice_fvu` are measured in the SAE's own (preprocessed) space, the space it was
    trained in (the deep-SAE write-up's NMSE); `fvu_raw` is measured on the raw activations against the
    denormalised reconstruction, i.e. what splicing into the model sees (equal to `fvu` without preprocessing).
    `dead_fraction` counts latents that never fire on these tokens.
    """
    fvu, fvu_raw, cosine = FVUAccumulator(), FVUAccumulator(), MeanAccumulator()
    latent_stats = LatentAccumulator(sae.n_latents)
    dtype = next(sae.parameters()).dtype
    for batch in batches:
        if batch.ndim != 2 or batch.shape[1] != sae.d_in:
            raise DataError(f"expected activations of shape [B, {sae.d_in}], got {tuple(batch.shape)}")
        x = batch.to(sae.device, dtype)
        x_n, stats = sae.normalize(x)
        x_hat_n, latents = sae(x_n)
        fvu.update(x_n, x_hat_n)
        fvu_raw.update(x, sae.denormalize(x_hat_n, stats))
        cosine.update(cosine_similarity(x_n, x_hat_n))
        latent_stats.update(latents)
    if fvu.n == 0:
        raise DataError("evaluate_reconstruction got no activations; pass at least one non-empty batch")
    result: dict[str, Any] = {
        "fvu": fvu.fvu(),
        "fvu_raw": fvu_raw.fvu(),
        "mse": fvu.mse(),
        "cosine": cosine.mean(),
        "l0": latent_stats.l0(),
        "dead_fraction": latent_stats.dead_fraction(),
        "n_tokens": fvu.n,
    }
    if slices is not None:
        result["per_slice_fvu"] = fvu.per_slice_fvu(slices)
    return result


@torch.no_grad()
def evaluate_downstream(
    model: nn.Module,
    sae: SparseAutoencoder,
    hookpoint: str,
    contexts: Tensor,
    batch_size: int = 8,
    drop_first: int = 0,
    exclude_token_ids: Sequence[int] = (),
    zero_ablation: bool = True,
    mean_ablation: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """Next-token CE of the model clean, with `sae.reconstruct` spliced in at `hookpoint`, and with the site
    zero- or mean-ablated; KL(clean || spliced) and KL(clean || zero-ablated).

    Positions masked out by `position_mask(contexts, drop_first, exclude_token_ids)` (e.g. BOS) keep their clean
    activation in every pass and are left out of every average; a prediction counts at the position it is made.

    Cost per batch: one clean forward (which also captures the site's activation), one spliced forward, and one
    more per ablation asked for. Mean ablation uses the mean of the clean activation over all evaluated positions,
    so its passes run after all the others (a second sweep over `contexts`).
    """
    if contexts.ndim != 2 or contexts.shape[1] < 2:
        raise DataError(f"contexts must be token ids [N, T] with T >= 2, got shape {tuple(contexts.shape)}")
    model.eval()
    ce = {name: MeanAccumulator() for name in ("clean", "spliced", "zero_ablated", "mean_ablated")}
    kl = {name: MeanAccumulator() for name in ("spliced", "zero_ablated")}
    act_sum: Tensor | None = None
    act_count = 0

    def measure(name: str, logits: Tensor, ids: Tensor, mask: Tensor, clean_logits: Tensor | None) -> None:
        ce[name].update(token_cross_entropy(logits, ids)[mask[:, :-1]])
        if clean_logits is not None:
            kl[name].update(token_kl_divergence(clean_logits, logits)[mask])

    device = next(model.parameters()).device

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, contexts.shape[0], batch_size):
            ids = contexts[start : start + batch_size].to(device)
            yield ids, position_mask(ids, drop_first, exclude_token_ids).to(device)

    n_batches = -(-contexts.shape[0] // batch_size)
    for ids, mask in tqdm(batches(), total=n_batches, desc="downstream", disable=not progress):
        clean, captured = forward_with(model, ids, capture=(hookpoint,))
        act = captured[hookpoint]
        batch_sum = act[mask].double().sum(0)
        act_sum = batch_sum if act_sum is None else act_sum + batch_sum
        act_count += int(mask.sum().item())
        measure("clean", clean, ids, mask, None)
        spliced, _ = forward_with(model, ids, {hookpoint: _splice(mask, sae.reconstruct)})
        measure("spliced", spliced, ids, mask, clean)
        if zero_ablation:
            zeroed, _ = forward_with(model, ids, {hookpoint: _splice(mask, torch.zeros_like)})
            measure("zero_ablated", zeroed, ids, mask, clean)
    if act_sum is None or act_count == 0:
        raise DataError("the position mask excludes every position; lower drop_first or exclude fewer tokens")
    if mean_ablation:
        mean = (act_sum / act_count).float()
        for ids, mask in tqdm(batches(), total=n_batches, desc="mean ablation", disable=not progress):
            ablated, _ = forward_with(model, ids, {hookpoint: _splice(mask, lambda a: mean.to(a).expand_as(a))})
            measure("mean_ablated", ablated, ids, mask, None)

    result = {"ce_clean": ce["clean"].mean(), "ce_spliced": ce["spliced"].mean()}
    result["ce_delta"] = result["ce_spliced"] - result["ce_clean"]
    result["kl_divergence"] = kl["spliced"].mean()
    if zero_ablation:
        result["ce_zero_ablated"] = ce["zero_ablated"].mean()
        result["ce_loss_recovered"] = ce_loss_recovered(
            result["ce_clean"], result["ce_spliced"], result["ce_zero_ablated"]
        )
        result["kl_zero_ablated"] = kl["zero_ablated"].mean()
    if mean_ablation:
        result["ce_mean_ablated"] = ce["mean_ablated"].mean()
        result["ce_loss_recovered_mean_ablation"] = ce_loss_recovered(
            result["ce_clean"], result["ce_spliced"], result["ce_mean_ablated"]
        )
    return result


def _splice(mask: Tensor, replace: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A replacement that applies `replace` to the activations at masked positions only and passes the rest."""

    def apply(act: Tensor) -> Tensor:
        if not bool(mask.any()):  # e.g. a batch of contexts shorter than drop_first allows
            return act
        out = act.clone()
        out[mask] = replace(act[mask]).to(act)
        return out

    return apply
