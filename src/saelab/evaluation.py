"""Evaluate any SAE: reconstruction quality on stored activations, and the downstream cost of splicing it into the
model. All numbers come from `saelab.metrics`, pooled over every evaluated token (not averaged per batch).

The core functions take tensors and modules (`evaluate_reconstruction`, `evaluate_downstream`); the adapters below
them take a store and data settings (`reconstruction_metrics`, `downstream_metrics`), and `evaluate_from_config` is
the `saelab evaluate` command.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.data.tokenize import DataConfig, build_contexts, position_mask
from saelab.errors import ConfigError, DataError
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
from saelab.models.hookpoints import canonical_hookpoint
from saelab.models.hooks import forward_with
from saelab.models.prefix import SharedPrefix
from saelab.run_folder import RunFolder
from saelab.saes.base import SparseAutoencoder
from saelab.saes.self_check import REFERENCE_TOKENS, SELF_CHECK_HELP, self_check
from saelab.saes.sources import SOURCE_HELP, open_sae


@torch.no_grad()
def evaluate_reconstruction(
    sae: SparseAutoencoder, batches: Iterable[Tensor | tuple[Tensor, Tensor]], slices: Sequence[SliceSpec] | None = None
) -> dict[str, Any]:
    """Reconstruction metrics over all tokens of `batches` (raw `[B, d_in]` activations, or for an SAE that predicts
    another activation (a transcoder) raw (input, target) pairs: every metric then compares with the target).

    `fvu`, `mse`, `cosine` and `per_slice_fvu` are measured in the SAE's own (preprocessed) space, the space it was
    trained in (the deep-SAE write-up's NMSE); `fvu_raw` is measured on the raw activations against the
    denormalised reconstruction, i.e. what splicing into the model sees (equal to `fvu` without preprocessing).
    `dead_fraction` counts latents that never fire on these tokens. `fvu_per_dim` (and `per_slice_fvu_per_dim`) is
    the per-dimension-mean FVU of `metrics.per_dimension_fvu` in the same space.
    """
    fvu, fvu_raw, cosine = FVUAccumulator(), FVUAccumulator(), MeanAccumulator()
    latent_stats = LatentAccumulator(sae.n_latents)
    dtype = next(sae.parameters()).dtype
    for batch in batches:
        raw, target = (batch, None) if isinstance(batch, Tensor) else batch
        if raw.ndim != 2 or raw.shape[1] != sae.d_in:
            raise DataError(f"expected activations of shape [B, {sae.d_in}], got {tuple(raw.shape)}")
        x = raw.to(sae.device, dtype)
        x_n, stats = sae.normalize(x)
        x_hat_n, latents = sae(x_n)
        y = x if target is None else target.to(sae.device, dtype)
        y_n = x_n if target is None else sae.normalize_target(y)
        fvu.update(y_n, x_hat_n)
        fvu_raw.update(y, sae.denormalize(x_hat_n, stats))
        cosine.update(cosine_similarity(y_n, x_hat_n))
        latent_stats.update(latents)
    if fvu.n == 0:
        raise DataError("evaluate_reconstruction got no activations; pass at least one non-empty batch")
    result: dict[str, Any] = {
        "fvu": fvu.fvu(),
        "fvu_raw": fvu_raw.fvu(),
        "fvu_per_dim": fvu.per_dimension_fvu(),
        "mse": fvu.mse(),
        "cosine": cosine.mean(),
        "l0": latent_stats.l0(),
        "dead_fraction": latent_stats.dead_fraction(),
        "n_tokens": fvu.n,
    }
    if slices is not None:
        result["per_slice_fvu"] = fvu.per_slice_fvu(slices)
        result["per_slice_fvu_per_dim"] = fvu.per_slice_per_dimension_fvu(slices)
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
    """Next-token CE of the model clean, with `sae.reconstruct` spliced in at `hookpoint` (a transcoder: its
    prediction from its input site replacing `hookpoint`, its target; see `splice_edits`), and with the site
    zero- or mean-ablated; KL(clean || spliced) and KL(clean || zero-ablated). Positions are masked and counted as
    in `splice_losses`.

    Cost per batch: one clean forward (which also captures the site's activation), then the spliced pass and one
    more per ablation asked for, each running only the layers from `hookpoint` on (see `splice_losses`). Mean
    ablation uses the mean of the clean activation over all evaluated positions, so its passes run after all the
    others (a second sweep over `contexts`, of full forwards).
    """
    replacements: dict[str, Callable[[Tensor], Tensor] | Mapping[str, Callable[[Tensor], Tensor]]] = {
        "spliced": sae.reconstruct if sae.target_hookpoint is None else splice_edits(sae, hookpoint)
    }
    if zero_ablation:
        replacements["zero_ablated"] = torch.zeros_like
    masking = dict(batch_size=batch_size, drop_first=drop_first, exclude_token_ids=exclude_token_ids)
    losses = splice_losses(model, hookpoint, contexts, replacements, progress=progress, **masking)
    result = _downstream_row(losses, "spliced", "zero_ablated" if zero_ablation else None)
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


ALL_SITES = "all"  # the row of `evaluate_downstream_together` with every SAE spliced in at once


def evaluate_downstream_together(
    model: nn.Module,
    saes: Mapping[str, SparseAutoencoder],
    contexts: Tensor,
    batch_size: int = 8,
    drop_first: int = 0,
    exclude_token_ids: Sequence[int] = (),
    zero_ablation: bool = True,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """SAEs on several hookpoints ({hookpoint: sae}, e.g. every layer's resid_post, or every MLP output keyed to its
    transcoder, which predicts it from the MLP input: `splice_edits`) spliced into the model: the row
    of `evaluate_downstream` (CE, CE delta, KL, and with `zero_ablation` CE recovered against zero ablation) for
    each SAE alone, keyed by its hookpoint, and for all of them at once in one pass, keyed `ALL_SITES`, whose CE
    recovered is measured against every site zero-ablated at once. All passes of a batch share one clean pass.
    """
    if not saes or ALL_SITES in saes:
        raise ConfigError(f"give SAEs keyed by their hookpoints (none may be called {ALL_SITES!r})")
    replacements: dict[str, Mapping[str, Callable[[Tensor], Tensor]]] = {
        hp: splice_edits(sae, hp) for hp, sae in saes.items()
    }
    replacements[ALL_SITES] = _chained([splice_edits(sae, hp) for hp, sae in saes.items()])
    if zero_ablation:
        for name in [*saes, ALL_SITES]:
            replacements[f"{name} zero-ablated"] = {hp: torch.zeros_like for hp in (saes if name == ALL_SITES
                                                                                  else [name])}
    losses = splice_losses(model, next(iter(saes)), contexts, replacements, batch_size=batch_size,
                           drop_first=drop_first, exclude_token_ids=exclude_token_ids, progress=progress)
    return {name: _downstream_row(losses, name, f"{name} zero-ablated" if zero_ablation else None)
            for name in [*saes, ALL_SITES]}


def splice_edits(sae: SparseAutoencoder, hookpoint: str) -> dict[str, Callable[[Tensor], Tensor]]:
    """The sites that splicing `sae` in at `hookpoint` rewrites, {site: replacement} for `splice_losses`: an
    autoencoder replaces `hookpoint` by its reconstruction; a transcoder replaces `hookpoint` (its target) by its
    prediction from what its input site (`sae.cfg.hookpoint`) holds in the same pass, leaving that site as it is."""
    if sae.target_hookpoint is None:
        return {hookpoint: sae.reconstruct}
    if not sae.cfg.hookpoint:
        raise ConfigError("the transcoder names no input hookpoint (cfg.hookpoint); set it to the site it reads")
    source = canonical_hookpoint(sae.cfg.hookpoint)
    if source == hookpoint:
        raise ConfigError(f"a transcoder reading {source} cannot also replace it; splice it at its target")
    seen: list[Tensor] = []

    def read(act: Tensor) -> Tensor:
        seen.append(act)
        return act

    def predict(act: Tensor) -> Tensor:
        return sae.reconstruct(seen.pop())

    return {source: read, hookpoint: predict}


def _chained(edits: Sequence[Mapping[str, Callable[[Tensor], Tensor]]]) -> dict[str, Callable[[Tensor], Tensor]]:
    """Several SAEs' edits in one pass; two at one site apply in the order given (e.g. an SAE's reconstruction at
    an MLP's input, then a transcoder reading it)."""
    merged: dict[str, list[Callable[[Tensor], Tensor]]] = {}
    for edit in edits:
        for site, fn in edit.items():
            merged.setdefault(site, []).append(fn)

    def chain(fns: list[Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
        def apply(act: Tensor) -> Tensor:
            for fn in fns:
                act = fn(act)
            return act

        return apply

    return {site: fns[0] if len(fns) == 1 else chain(fns) for site, fns in merged.items()}


def _downstream_row(losses: SpliceLosses, spliced: str, zero_ablated: str | None) -> dict[str, float]:
    """CE clean and spliced, their difference and KL(clean || spliced); with a zero-ablated pass, its CE and KL and
    the CE recovered."""
    row = {"ce_clean": losses.ce["clean"], "ce_spliced": losses.ce[spliced]}
    row["ce_delta"] = row["ce_spliced"] - row["ce_clean"]
    row["kl_divergence"] = losses.kl[spliced]
    if zero_ablated is not None:
        row["ce_zero_ablated"] = losses.ce[zero_ablated]
        row["ce_loss_recovered"] = ce_loss_recovered(row["ce_clean"], row["ce_spliced"], row["ce_zero_ablated"])
        row["kl_zero_ablated"] = losses.kl[zero_ablated]
    return row


def _splice(mask: Tensor, replace: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A replacement that applies `replace` to the activations at masked positions only and passes the rest."""

    def apply(act: Tensor) -> Tensor:
        if not bool(mask.any()):  # e.g. a batch of contexts shorter than drop_first allows
            return act
        out = act.clone()
        out[mask] = replace(act[mask]).to(act)
        return out

    return apply


# ---- adapters: stores, data settings and the `saelab evaluate` command ----------------------------------------


@dataclasses.dataclass
class EvaluateConfig(Config):
    sae_dir: str = dataclasses.field(default="runs/train/sae", metadata={"help": f"the SAE: {SOURCE_HELP}"})
    sae_dirs: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": f"several SAEs ({SOURCE_HELP}, one per hookpoint) spliced in at once: CE/KL for each "
                          "alone and all together (replaces --sae-dir; reconstruction metrics for those the store "
                          "holds)"},
    )
    store: str = dataclasses.field(default="runs/activations-eval", metadata={"help": "held-out activation store"})
    out_dir: str = dataclasses.field(default="runs/evaluate", metadata={"help": "run folder (summary.json)"})
    max_tokens: int | None = dataclasses.field(default=None, metadata={"help": "cap on stored tokens evaluated"})
    batch_size: int = dataclasses.field(default=4096, metadata={"help": "activations per reconstruction batch"})
    downstream: bool = dataclasses.field(default=True, metadata={"help": "also measure CE/KL with the SAE spliced"})
    model: str | None = dataclasses.field(default=None, metadata={"help": "default: the model named by the store"})
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(n_tokens=8192))
    skip_contexts: int = dataclasses.field(
        default=0, metadata={"help": "skip this many contexts of `data` first (keep downstream text held out)"}
    )
    context_batch_size: int = dataclasses.field(default=8, metadata={"help": "contexts per downstream forward"})
    mean_ablation: bool = dataclasses.field(default=True, metadata={"help": "also CE with the site mean-ablated"})
    self_check: bool = dataclasses.field(default=True, metadata={"help": SELF_CHECK_HELP})
    device: str = "cpu"




def check_compatible(sae: SparseAutoencoder, store: ActivationStore) -> str:
    """The hookpoint the SAE reads, after checking that the store holds it at the SAE's width."""
    named = canonical_hookpoint(sae.cfg.hookpoint) if sae.cfg.hookpoint else None  # e.g. a SAELens hook name
    hookpoint = named or (store.hookpoints[0] if len(store.hookpoints) == 1 else None)
    if hookpoint is None or hookpoint not in store.hookpoints:
        raise ConfigError(
            f"the SAE was trained on hookpoint {sae.cfg.hookpoint!r} but the store holds {store.hookpoints}; "
            "harvest that hookpoint or pick the matching store"
        )
    if store.dims[hookpoint] != sae.d_in:
        raise ConfigError(
            f"dimension mismatch: the store's {hookpoint} has width {store.dims[hookpoint]} but the SAE expects "
            f"d_in={sae.d_in}; evaluate on activations of the model/hookpoint the SAE was trained on"
        )
    target = sae.target_hookpoint
    if target is not None and (target not in store.hookpoints or store.dims[target] != sae.d_out):
        raise ConfigError(
            f"the transcoder predicts {target} (width {sae.d_out}) from {hookpoint}, but the store holds "
            f"{store.dims}; evaluate it on a store holding both hookpoints"
        )
    return hookpoint


def check_on_store(sae: SparseAutoencoder, store: ActivationStore, hookpoint: str | list[str], source: str,
                   enabled: bool = True) -> None:
    """The load-time self-check (`saelab.saes.self_check`) on the store's first tokens of `hookpoint` (several
    hookpoints: concatenated, for a multi-layer SAE), paired with a transcoder's target."""
    if not enabled:
        return
    n = min(REFERENCE_TOKENS, store.n_tokens)
    target = None if sae.target_hookpoint is None else store.load(sae.target_hookpoint, 0, n)
    where = hookpoint if isinstance(hookpoint, str) else ",".join(hookpoint)
    self_check(sae, store.load(hookpoint, 0, n), target, source=source, hookpoint=where)


@torch.no_grad()
def check_on_model(sae: SparseAutoencoder, model: nn.Module, contexts: Tensor, source: str, drop_first: int = 0,
                   enabled: bool = True) -> None:
    """The load-time self-check on activations captured from the model at the SAE's hookpoint (and a transcoder's
    target), its first contexts' counted positions, where no store holds them."""
    if not enabled:
        return
    if not sae.cfg.hookpoint:
        raise ConfigError(f"{source} names no hookpoint to check it at; give one, or pass --self-check false")
    sites = [canonical_hookpoint(sae.cfg.hookpoint, model), *([sae.target_hookpoint] if sae.target_hookpoint else [])]
    per_context = max(contexts.shape[1] - drop_first, 1)
    ids = contexts[: -(-REFERENCE_TOKENS // per_context)].to(next(model.parameters()).device)
    _, captured = forward_with(model, ids, capture=sites)
    mask = position_mask(ids, drop_first)
    x, *target = (captured[site][mask].float() for site in sites)
    self_check(sae, x, target[0] if target else None, source=source, hookpoint=sites[0])


def reconstruction_metrics(sae: SparseAutoencoder, store: ActivationStore, hookpoint: str, batch_size: int,
                           max_tokens: int | None = None) -> dict[str, Any]:
    """`evaluate_reconstruction` on the store's tokens of `hookpoint` (paired with a transcoder's target)."""
    n = store.n_tokens if max_tokens is None else min(max_tokens, store.n_tokens)

    target = sae.target_hookpoint

    def batches():
        for start in range(0, n, batch_size):
            x = store.load(hookpoint, start, min(start + batch_size, n))
            yield x if target is None else (x, store.load(target, start, min(start + batch_size, n)))

    return evaluate_reconstruction(sae, batches())


def downstream_metrics(model: nn.Module, tokenizer, sae: SparseAutoencoder, hookpoint: str, contexts: Tensor,
                       data: DataConfig, context_batch_size: int, mean_ablation: bool = True,
                       zero_ablation: bool = True) -> dict[str, float]:
    excluded = tokenizer.all_special_ids if data.exclude_special_tokens else ()
    return evaluate_downstream(
        model, sae, hookpoint, contexts, batch_size=context_batch_size, drop_first=data.drop_first_positions,
        exclude_token_ids=excluded, zero_ablation=zero_ablation, mean_ablation=mean_ablation, progress=True,
    )


def evaluate_from_config(cfg: EvaluateConfig) -> dict[str, Any]:
    """`saelab evaluate`: both kinds of metrics of a saved SAE, written to the run folder's `summary.json`."""
    from saelab.models.loading import load_model

    folder = RunFolder.start(cfg)
    if cfg.sae_dirs:
        return _evaluate_together(cfg, folder)
    sae = open_sae(cfg.sae_dir, device=cfg.device)
    store = ActivationStore(cfg.store)
    hookpoint = check_compatible(sae, store)
    check_on_store(sae, store, hookpoint, cfg.sae_dir, cfg.self_check)
    metrics = reconstruction_metrics(sae, store, hookpoint, cfg.batch_size, cfg.max_tokens)
    if cfg.downstream:
        model, tokenizer = load_model(cfg.model or store.model_name, cfg.device, torch.float32)
        contexts = build_contexts(cfg.data, tokenizer, skip_contexts=cfg.skip_contexts)
        metrics.update(downstream_metrics(model, tokenizer, sae, sae.target_hookpoint or hookpoint, contexts,
                                          cfg.data, cfg.context_batch_size, cfg.mean_ablation))
    folder.lap("evaluate")
    target = {} if sae.target_hookpoint is None else {"target_hookpoint": sae.target_hookpoint}
    folder.write_summary({**metrics, "sae_dir": cfg.sae_dir, "hookpoint": hookpoint, **target}, cfg)
    return metrics


def _evaluate_together(cfg: EvaluateConfig, folder: RunFolder) -> dict[str, Any]:
    """`saelab evaluate --sae-dirs A,B,...`: each SAE's reconstruction metrics (where the store holds its
    hookpoint) and the CE/KL rows of `evaluate_downstream_together`, written to `summary.json`."""
    from saelab.models.loading import load_model

    saes: dict[str, SparseAutoencoder] = {}
    sources: dict[str, str] = {}
    for sae_dir in cfg.sae_dirs:
        sae = open_sae(sae_dir, device=cfg.device)
        replaced = sae.target_hookpoint or sae.cfg.hookpoint  # a transcoder replaces its target
        hookpoint = canonical_hookpoint(replaced) if replaced else None
        if hookpoint is None or hookpoint in saes:
            raise ConfigError(
                f"{sae_dir}: splicing several SAEs needs each to name its own hookpoint (got {replaced!r}"
                f"{' twice' if hookpoint in saes else ''}); give one SAE per hookpoint"
            )
        saes[hookpoint], sources[hookpoint] = sae, sae_dir
    store = ActivationStore(cfg.store)
    stored = {hp for hp, sae in saes.items()
              if {canonical_hookpoint(sae.cfg.hookpoint or hp), hp} <= set(store.hookpoints)}
    for hp in stored:
        check_on_store(saes[hp], store, check_compatible(saes[hp], store), sources[hp], cfg.self_check)
    rows: dict[str, dict[str, Any]] = {
        hp: (reconstruction_metrics(sae, store, check_compatible(sae, store), cfg.batch_size, cfg.max_tokens)
             if hp in stored else {})
        for hp, sae in saes.items()
    }
    if cfg.downstream:
        model, tokenizer = load_model(cfg.model or store.model_name, cfg.device, torch.float32)
        contexts = build_contexts(cfg.data, tokenizer, skip_contexts=cfg.skip_contexts)
        for hp in saes.keys() - stored:
            check_on_model(saes[hp], model, contexts, sources[hp], cfg.data.drop_first_positions, cfg.self_check)
        excluded = tokenizer.all_special_ids if cfg.data.exclude_special_tokens else ()
        spliced = evaluate_downstream_together(model, saes, contexts, batch_size=cfg.context_batch_size,
                                               drop_first=cfg.data.drop_first_positions,
                                               exclude_token_ids=excluded, progress=True)
        rows = {name: {**rows.get(name, {}), **row} for name, row in spliced.items()}
    folder.lap("evaluate")
    summary = {"saes": rows, "sae_dirs": cfg.sae_dirs, "hookpoints": list(saes)}
    folder.write_summary(summary, cfg)
    return summary
