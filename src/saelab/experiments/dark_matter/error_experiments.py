"""The experiments of "Decomposing The Dark Matter of Sparse Autoencoders" on real SAEs, each returning a typed
result.

Built on the decompositions of `error_analysis` and the gradient pursuit of `pursuit` (both in this package); this
module runs them the way the write-up does, over a sweep of SAEs, so `run` only has to gather activations, train
SAEs and draw. Every regression is scored on held-out tokens (`RegressionConfig`); activations come in already
position-filtered with BOS dropped. Results carry JSON-ready `summary()` dicts of their numbers.

Experiment 8 splices into the model, where only x is available: the components are then recomputed from x alone
(`error_components`), Sae(x) by the SAE and the linear error by the fit of experiment 2, the nonlinear error as what
is left of e = x − Sae(x).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from saelab.evaluation import evaluate_reconstruction, splice_losses
from saelab.experiments.dark_matter.error_analysis import (
    FVUBreakdown,
    PowerLaw,
    error_norm_probe,
    error_vector_transform,
    fit_power_law,
    nonlinear_fvu,
    norm_prediction,
    per_token_scaling,
    projection_r2,
)
from saelab.experiments.dark_matter.pursuit import sae_gradient_pursuit
from saelab.experiments.dark_matter.regression import LinearFit, RegressionConfig
from saelab.metrics import ce_loss_recovered
from saelab.saes.base import SparseAutoencoder
from saelab.saes.shallow import ShallowSAE

# Tokens per SAE call: bounds the [rows, n_latents] pre-activations of SAEs with dense latents (JumpReLU).
ROWS = 4096
NORM_COMPONENTS = ("x", "sae(x)", "error", "linear error", "nonlinear error")
SPLICES = ("sae", "sae+linear", "sae+nonlinear")
REASSEMBLED = "sae+linear+nonlinear"


@torch.no_grad()
def reconstruct_rows(sae: SparseAutoencoder, x: Tensor, rows: int = ROWS) -> Tensor:
    """Sae(x) raw -> raw for many tokens, `rows` at a time, in x's dtype."""
    return torch.cat([sae.reconstruct(chunk) for chunk in x.split(rows)]) if x.shape[0] else x.clone()


# ---- (1), (2), (3), (6) for one reconstruction --------------------------------------------------------------


@dataclasses.dataclass
class ErrorAnalysis:
    """Experiments 1, 2, 3 and 6 for one SAE (or any reconstruction of x). Per-token norms are kept for experiment
    4 and the fit for experiment 8; the error tensors themselves are not, so a sweep's memory does not grow."""

    norm_probe_r2: float  # (1) x -> ||e||²
    vector_r2: float  # (2) x -> e, mean per-dimension R²
    vector_fvu: float  # (2) pooled FVU of that map
    fvu: FVUBreakdown  # (3) FVU(x, Sae(x)) and FVU(x, Sae(x) + bᵀx), held out
    norm_prediction: dict[str, float]  # (6) R² of x -> ||c||² for each of NORM_COMPONENTS
    fit: LinearFit  # (2) the map b: linear error = fit.predict(x)
    error_norm: Tensor  # ||e|| per token [N]
    nonlinear_norm: Tensor  # ||e − bᵀx|| per token [N]
    test_idx: Tensor  # the held-out tokens every score above is measured on

    def summary(self) -> dict[str, Any]:
        return {
            "norm_probe_r2": self.norm_probe_r2, "vector_r2": self.vector_r2, "vector_fvu": self.vector_fvu,
            "fvu_total": self.fvu.total, "fvu_linear": self.fvu.linear, "fvu_nonlinear": self.fvu.nonlinear,
            "norm_prediction_r2": self.norm_prediction, "n_heldout_tokens": int(self.test_idx.numel()),
        }


def analyze_errors(x: Tensor, sae_x: Tensor, cfg: RegressionConfig | None = None) -> ErrorAnalysis:
    """Experiments 1, 2, 3 and 6 for the reconstruction `sae_x` of `x`; all regressions share one split."""
    e = x - sae_x
    probe = error_norm_probe(x, e, cfg)
    split = error_vector_transform(x, e, cfg)
    test = split.regression.test_idx
    components = dict(zip(NORM_COMPONENTS, (x, sae_x, e, split.linear_error, split.nonlinear_error), strict=True))
    return ErrorAnalysis(
        norm_probe_r2=probe.r2,
        vector_r2=split.regression.r2,
        vector_fvu=split.regression.fvu,
        fvu=nonlinear_fvu(x[test], sae_x[test], split.linear_error[test]),
        norm_prediction=norm_prediction(x, components, cfg),
        fit=split.regression.fit,
        error_norm=e.norm(dim=-1),
        nonlinear_norm=split.nonlinear_error.norm(dim=-1),
        test_idx=test,
    )


# ---- (3) across widths ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class FVUScaling:
    """Experiment 3 over a width sweep at fixed L0: total FVU fit by c + a·width^(−m) (None with fewer than 3
    distinct widths), the nonlinear FVU's flat level (its mean) and the log-log slopes of both against width."""

    widths: list[int]
    total: list[float]
    nonlinear: list[float]
    total_law: PowerLaw | None
    nonlinear_level: float
    total_slope: float | None  # d log FVU / d log width
    nonlinear_slope: float | None

    def summary(self) -> dict[str, Any]:
        law = None if self.total_law is None else dataclasses.asdict(self.total_law)
        return {
            "widths": self.widths, "fvu_total": self.total, "fvu_nonlinear": self.nonlinear,
            "fvu_linear": [t - n for t, n in zip(self.total, self.nonlinear, strict=True)],
            "total_power_law": law, "nonlinear_level": self.nonlinear_level,
            "total_loglog_slope": self.total_slope, "nonlinear_loglog_slope": self.nonlinear_slope,
            "power_law_floor_above_nonlinear_level": None if law is None else law["c"] > self.nonlinear_level,
        }


def _loglog_slope(widths: Sequence[int], values: Sequence[float]) -> float | None:
    if len(set(widths)) < 2 or min(values) <= 0:
        return None
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def fvu_scaling(widths: Sequence[int], breakdowns: Sequence[FVUBreakdown]) -> FVUScaling:
    """Experiment 3's sweep summary; `widths[i]` is the dictionary size of the SAE behind `breakdowns[i]`."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    w = [int(widths[i]) for i in order]
    total = [breakdowns[i].total for i in order]
    nonlinear = [breakdowns[i].nonlinear for i in order]
    law = fit_power_law(w, total) if len(set(w)) >= 3 else None
    return FVUScaling(w, total, nonlinear, law, float(np.mean(nonlinear)), _loglog_slope(w, total),
                      _loglog_slope(w, nonlinear))


# ---- (4) per-token scaling between every pair of widths -------------------------------------------------------


@dataclasses.dataclass
class PairScaling:
    """Experiment 4 for one pair: ||e_large|| ~ [||e_small||, 1], then with ||nonlinear_small|| added."""

    small: str
    large: str
    r2: float
    r2_with_nonlinear: float
    slope: float
    intercept: float

    @property
    def fvu_decrease(self) -> float:
        """Relative drop of the remaining FVU (1 − R²) when the nonlinear-error norm is added (the write-up's %)."""
        return (self.r2_with_nonlinear - self.r2) / (1 - self.r2) if self.r2 < 1 else 0.0

    def summary(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fvu_decrease": self.fvu_decrease}


def pairwise_scaling(
    analyses: Mapping[str, ErrorAnalysis], widths: Mapping[str, int], cfg: RegressionConfig | None = None
) -> list[PairScaling]:
    """Experiment 4 for every pair of SAEs with width(small) < width(large), from their per-token norms."""
    pairs = []
    for small, large in itertools.permutations(analyses, 2):
        if widths[small] < widths[large]:
            a, b = analyses[small], analyses[large]
            result = per_token_scaling(a.error_norm, b.error_norm, a.nonlinear_norm, cfg)
            pairs.append(PairScaling(small, large, result.r2, float(result.r2_with_nonlinear),
                                     result.fit.weight[0, 0].item(), result.fit.bias[0].item()))
    return sorted(pairs, key=lambda p: (widths[p.small], widths[p.large]))


# ---- (7) SAEs trained on the error components -----------------------------------------------------------------


@dataclasses.dataclass
class ErrorComponents:
    """x = reconstruction + linear + nonlinear, token by token."""

    reconstruction: Tensor  # Sae(x)
    linear: Tensor  # bᵀx (+ bias)
    nonlinear: Tensor  # x − Sae(x) − bᵀx


@torch.no_grad()
def error_components(sae: SparseAutoencoder, fit: LinearFit, x: Tensor) -> ErrorComponents:
    """The split of x computed from x alone: for tokens the regression never saw (experiment 7's training
    tokens) and inside a forward pass (experiment 8's splices)."""
    reconstruction = reconstruct_rows(sae, x)
    linear = fit.predict(x).to(x.dtype)
    return ErrorComponents(reconstruction, linear, x - reconstruction - linear)


def evaluate_component_saes(
    saes: Mapping[str, SparseAutoencoder], components: Mapping[str, Tensor], rows: int = ROWS
) -> dict[str, dict[str, Any]]:
    """Experiment 7: each component's SAE (e.g. trained on the linear and on the nonlinear error) on held-out
    tokens of that component; `fvu` is the pooled FVU against the component's own variance."""
    return {name: evaluate_reconstruction(sae, components[name].split(rows)) for name, sae in saes.items()}


# ---- (8) downstream cross entropy of the components -----------------------------------------------------------


Replacement = Callable[[Tensor], Tensor]


def component_splices(sae: SparseAutoencoder, fit: LinearFit, reassembled: bool = False) -> dict[str, Replacement]:
    """Replacements x -> Sae(x), Sae(x) + linear error, Sae(x) + nonlinear error (`SPLICES`), and with
    `reassembled` also Sae(x) + both, which is x again (a check that the splice machinery is exact)."""
    parts: dict[str, Callable[[ErrorComponents], Tensor]] = {
        "sae": lambda c: c.reconstruction,
        "sae+linear": lambda c: c.reconstruction + c.linear,
        "sae+nonlinear": lambda c: c.reconstruction + c.nonlinear,
    }
    if reassembled:
        parts[REASSEMBLED] = lambda c: c.reconstruction + c.linear + c.nonlinear

    def splice(pick: Callable[[ErrorComponents], Tensor]) -> Replacement:
        return lambda act: pick(error_components(sae, fit, act))

    return {name: splice(pick) for name, pick in parts.items()}


@dataclasses.dataclass
class ComponentCE:
    """Experiment 8 for one SAE: next-token CE with each splice, and what each error component buys back."""

    clean: float
    zero_ablated: float
    spliced: dict[str, float]  # CE per splice name (SPLICES, maybe REASSEMBLED)
    kl: dict[str, float]  # KL(clean || spliced) per splice name

    @property
    def recovered(self) -> dict[str, float]:
        """CE loss recovered against zero ablation, per splice."""
        return {name: ce_loss_recovered(self.clean, ce, self.zero_ablated) for name, ce in self.spliced.items()}

    @property
    def gap_closed(self) -> dict[str, float]:
        """Share of the CE gap between Sae(x) and x that adding each component closes: to set against the
        component's share of the error norm and of the variance (`component_shares`)."""
        gap = self.spliced["sae"] - self.clean
        return {part: (self.spliced["sae"] - self.spliced[f"sae+{part}"]) / gap for part in ("linear", "nonlinear")}

    def summary(self) -> dict[str, Any]:
        return {"ce_clean": self.clean, "ce_zero_ablated": self.zero_ablated, "ce": self.spliced, "kl": self.kl,
                "ce_loss_recovered": self.recovered, "ce_gap_closed": self.gap_closed}


def component_cross_entropy(
    model: nn.Module,
    hookpoint: str,
    contexts: Tensor,
    splits: Mapping[str, tuple[SparseAutoencoder, LinearFit]],
    *,
    reassembled: Collection[str] = (),
    batch_size: int = 8,
    drop_first: int = 0,
    exclude_token_ids: Sequence[int] = (),
    progress: bool = False,
) -> dict[str, ComponentCE]:
    """Experiment 8 for every SAE of `splits` (name -> (SAE, experiment 2's fit)) in one sweep over `contexts`
    that shares the clean and zero-ablated passes; SAEs named in `reassembled` also get the Sae(x) + both check."""
    replacements: dict[str, Replacement] = {"zero_ablated": torch.zeros_like}
    for name, (sae, fit) in splits.items():
        for splice, fn in component_splices(sae, fit, reassembled=name in reassembled).items():
            replacements[f"{name}/{splice}"] = fn
    losses = splice_losses(model, hookpoint, contexts, replacements, batch_size=batch_size, drop_first=drop_first,
                           exclude_token_ids=exclude_token_ids, progress=progress)
    results = {}
    for name in splits:
        keys = {key.split("/", 1)[1]: key for key in replacements if key.startswith(f"{name}/")}
        results[name] = ComponentCE(
            losses.ce["clean"], losses.ce["zero_ablated"],
            {splice: losses.ce[key] for splice, key in keys.items()},
            {splice: losses.kl[key] for splice, key in keys.items()},
        )
    return results


# ---- (9) gradient pursuit, then (2)-(3) again -----------------------------------------------------------------


@dataclasses.dataclass
class PursuitComparison:
    """Experiment 9 for one SAE, on the same tokens: its encoder against gradient pursuit on its frozen decoder
    with each token's own L0, each followed by experiments 2-3 (a fresh linear map from x to that error)."""

    sae: FVUBreakdown
    pursuit: FVUBreakdown
    sae_vector_r2: float
    pursuit_vector_r2: float
    mean_l0: float

    def summary(self) -> dict[str, Any]:
        return {
            "sae": {"fvu_total": self.sae.total, "fvu_nonlinear": self.sae.nonlinear, "vector_r2": self.sae_vector_r2},
            "pursuit": {"fvu_total": self.pursuit.total, "fvu_nonlinear": self.pursuit.nonlinear,
                        "vector_r2": self.pursuit_vector_r2},
            "fvu_total_change": self.pursuit.total - self.sae.total,
            "fvu_nonlinear_change": self.pursuit.nonlinear - self.sae.nonlinear,
            "mean_l0": self.mean_l0,
        }


def _breakdown(x: Tensor, x_hat: Tensor, cfg: RegressionConfig | None) -> tuple[FVUBreakdown, float]:
    split = error_vector_transform(x, x - x_hat, cfg)
    test = split.regression.test_idx
    return nonlinear_fvu(x[test], x_hat[test], split.linear_error[test]), split.regression.r2


def pursuit_comparison(sae: ShallowSAE, x: Tensor, cfg: RegressionConfig | None = None) -> PursuitComparison:
    """Experiment 9 on the tokens `x` (pursuit costs one [tokens, n_latents] GEMM per step, so pass a subset)."""
    pursuit = sae_gradient_pursuit(sae, x)
    sae_fvu, sae_r2 = _breakdown(x, reconstruct_rows(sae, x), cfg)
    pursuit_fvu, pursuit_r2 = _breakdown(x, pursuit.reconstruction.to(x.dtype), cfg)
    mean_l0 = (pursuit.codes.values != 0).sum(-1).double().mean().item()
    return PursuitComparison(sae_fvu, pursuit_fvu, sae_r2, pursuit_r2, mean_l0)


# ---- (10) projections from earlier components -----------------------------------------------------------------


ALL_RECONSTRUCTIONS = "all SAE reconstructions"


def earlier_component_projections(
    earlier: Mapping[str, Tensor],
    saes: Mapping[str, SparseAutoencoder],
    targets: Mapping[str, Tensor],
    cfg: RegressionConfig | None = None,
) -> dict[str, dict[str, float]]:
    """Experiment 10: held-out R² (mean per dimension) of a linear map from each earlier component h (e.g. the
    previous residual, this layer's attention and MLP outputs), its SAE reconstruction Sae(h) and its SAE error
    h − Sae(h), and from all the reconstructions together, to each target (e.g. the error components of the SAE
    on x). `saes[h]` is the SAE trained on h; sources are built one component at a time to bound memory."""
    table: dict[str, dict[str, float]] = {}
    reconstructions = []
    for name, h in earlier.items():
        recon = reconstruct_rows(saes[name], h)
        table.update(projection_r2({name: h, f"Sae({name})": recon, f"{name} − Sae({name})": h - recon}, targets, cfg))
        reconstructions.append(recon)
    if len(reconstructions) > 1:
        table.update(projection_r2({ALL_RECONSTRUCTIONS: torch.cat(reconstructions, dim=1)}, targets, cfg))
    return table
