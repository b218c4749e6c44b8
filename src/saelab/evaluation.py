"""Evaluate any SAE: reconstruction quality on stored activations, and the downstream cost of splicing it into the
model. All numbers come from `saelab.metrics`, pooled over every evaluated token (not averaged per batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from saelab.models.prefix import SharedPrefix
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


@dataclasses.dataclass
class SpliceLosses:
    """Mean next-token CE of each pass (`ce["clean"]` when the clean model ran, one entry per replacement),
    KL(clean || spliced) per replacement when the clean model ran, and the clean activation's mean over the
    counted positions (the mean-ablation value; None without a clean pass)."""

    ce: dict[str, float]
    kl: dict[str, float]
    activation_mean: Tensor | None


@torch.no_grad()
def splice_losses(
    model: nn.Module,
    hookpoint: str,
    contexts: Tensor,
    replacements: Mapping[str, Callable[[Tensor], Tensor] | Mapping[str, Callable[[Tensor], Tensor]]],
    batch_size: int = 8,
    drop_first: int = 0,
    exclude_token_ids: Sequence[int] = (),
    clean: bool = True,
    progress: bool = False,
    desc: str = "downstream",
) -> SpliceLosses:
    """Next-token CE with each named replacement spliced in at `hookpoint`, all sharing one clean pass per batch.

    A replacement maps the activations of the counted positions, `[n, d]`, to new ones of the same shape, at
    `hookpoint`; a mapping {hookpoint: replacement} instead rewrites several sites in the same pass (each on the same
    positions in the same order, so a later site may use what an earlier one saw, e.g. to replace a whole MLP by a
    function of its input). Positions
    masked out by `position_mask(contexts, drop_first, exclude_token_ids)` (e.g. BOS) keep their clean activation
    in every pass and are left out of every average; a prediction counts at the position it is made. Cost per
    batch: one clean forward (with `clean`) plus one per replacement; with `clean`, the replaced passes replay the
    clean pass's output of the blocks before the earliest replaced site (`SharedPrefix`), so each costs only the
    layers from there on.
    """
    if contexts.ndim != 2 or contexts.shape[1] < 2:
        raise DataError(f"contexts must be token ids [N, T] with T >= 2, got shape {tuple(contexts.shape)}")
    model.eval()
    ce = {name: MeanAccumulator() for name in (["clean"] if clean else []) + list(replacements)}
    kl = {name: MeanAccumulator() for name in replacements} if clean else {}
    act_sum: Tensor | None = None
    act_count = 0
    device = next(model.parameters()).device
    replaced = {site for r in replacements.values() for site in (r if isinstance(r, Mapping) else [hookpoint])}
    prefix = SharedPrefix(model, replaced)
    n_batches = -(-contexts.shape[0] // batch_size)
    for start in tqdm(range(0, contexts.shape[0], batch_size), total=n_batches, desc=desc, disable=not progress):
        ids = contexts[start : start + batch_size].to(device)
        mask = position_mask(ids, drop_first, exclude_token_ids).to(device)
        act_count += int(mask.sum().item())
        clean_logits = None
        if clean:
            with prefix.recording():
                clean_logits, captured = forward_with(model, ids, capture=(hookpoint,))
            batch_sum = captured[hookpoint][mask].double().sum(0)
            act_sum = batch_sum if act_sum is None else act_sum + batch_sum
            ce["clean"].update(token_cross_entropy(clean_logits, ids)[mask[:, :-1]])
        for name, replace in replacements.items():
            edits = replace if isinstance(replace, Mapping) else {hookpoint: replace}
            with prefix.replaying() if clean else contextlib.nullcontext():
                logits, _ = forward_with(model, ids, {site: _splice(mask, fn) for site, fn in edits.items()})
            ce[name].update(token_cross_entropy(logits, ids)[mask[:, :-1]])
            if clean_logits is not None:
                kl[name].update(token_kl_divergence(clean_logits, logits)[mask])
    if act_count == 0:
        raise DataError("the position mask excludes every position; lower drop_first or exclude fewer tokens")
    mean = None if act_sum is None else (act_sum / act_count).float()
    return SpliceLosses({k: v.mean() for k, v in ce.items()}, {k: v.mean() for k, v in kl.items()}, mean)


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
    zero- or mean-ablated; KL(clean || spliced) and KL(clean || zero-ablated). Positions are masked and counted as
    in `splice_losses`.

    Cost per batch: one clean forward (which also captures the site's activation), then the spliced pass and one
    more per ablation asked for, each running only the layers from `hookpoint` on (see `splice_losses`). Mean
    ablation uses the mean of the clean activation over all evaluated positions, so its passes run after all the
    others (a second sweep over `contexts`, of full forwards).
    """
    replacements: dict[str, Callable[[Tensor], Tensor]] = {"spliced": sae.reconstruct}
    if zero_ablation:
        replacements["zero_ablated"] = torch.zeros_like
    masking = dict(batch_size=batch_size, drop_first=drop_first, exclude_token_ids=exclude_token_ids)
    losses = splice_losses(model, hookpoint, contexts, replacements, progress=progress, **masking)
    result = {"ce_clean": losses.ce["clean"], "ce_spliced": losses.ce["spliced"]}
    result["ce_delta"] = result["ce_spliced"] - result["ce_clean"]
    result["kl_divergence"] = losses.kl["spliced"]
    if zero_ablation:
        result["ce_zero_ablated"] = losses.ce["zero_ablated"]
        result["ce_loss_recovered"] = ce_loss_recovered(
            result["ce_clean"], result["ce_spliced"], result["ce_zero_ablated"]
        )
        result["kl_zero_ablated"] = losses.kl["zero_ablated"]
    if mean_ablation:
        mean = losses.activation_mean

        def mean_ablate(act: Tensor) -> Tensor:
            return mean.to(act).expand_as(act)

        ablated = splice_losses(model, hookpoint, contexts, {"mean_ablated": mean_ablate}, clean=False,
                                progress=progress, desc="mean ablation", **masking)
        result["ce_mean_ablated"] = ablated.ce["mean_ablated"]
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
