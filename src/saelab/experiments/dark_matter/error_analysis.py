"""Dark matter: what an SAE fails to reconstruct, split into what a linear map of x predicts and the rest.

Notation of "Decomposing The Dark Matter of Sparse Autoencoders": x the activation, Sae(x) its reconstruction,
e = x − Sae(x) the error. A linear map b fit from x to e gives the linear error bᵀx and the nonlinear error e − bᵀx.
Every regression includes a bias column, is fit on a random training split and scored on the held-out rest
(`RegressionConfig`); vector targets are scored by the mean per-dimension R², variances by the pooled FVU. Squared
norms are the norm targets, as in the write-up's probes.

The functions take tensors (activations already position-filtered, BOS dropped) and return the numbers a report
plots; only the synthetic test runs an SAE itself, because it must re-encode perturbed inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import curve_fit
from torch import Tensor

from saelab.experiments.dark_matter.regression import (
    LinearFit,
    RegressionConfig,
    RegressionResult,
    heldout_regression,
    r2_per_dimension,
)
from saelab.metrics import fire_counts, fraction_of_variance_unexplained
from saelab.saes.base import SparseAutoencoder, SparseLatents


def _fvu(x: Tensor, x_hat: Tensor) -> float:
    return fraction_of_variance_unexplained(x, x_hat).item()


def _squared_norm(t: Tensor) -> Tensor:
    return t.pow(2).sum(-1)


# ---- (1) error-norm probe, (6) norm prediction ------------------------------------------------------------


def error_norm_probe(x: Tensor, e: Tensor, cfg: RegressionConfig | None = None) -> RegressionResult:
    """Experiment 1: how well a linear probe on x predicts ||e||² (its held-out R²)."""
    return heldout_regression(x, _squared_norm(e), cfg)


def norm_prediction(x: Tensor, components: dict[str, Tensor], cfg: RegressionConfig | None = None) -> dict[str, float]:
    """Experiment 6: held-out R² of predicting each component's squared norm from x (e.g. x, Sae(x), e, linear
    and nonlinear error). One regression with a column per component, so x's normal equations are built once."""
    names = list(components)
    targets = torch.stack([_squared_norm(components[name]) for name in names], dim=1)
    result = heldout_regression(x, targets, cfg)
    r2 = r2_per_dimension(targets[result.test_idx], result.predictions)
    return dict(zip(names, r2.tolist(), strict=True))


# ---- (2) error-vector transform, (3) nonlinear FVU ----------------------------------------------------------


@dataclasses.dataclass
class ErrorDecomposition:
    """e = linear_error + nonlinear_error for every token; scores are the held-out ones of `regression`."""

    regression: RegressionResult  # x -> e: r2 (mean per dimension), fvu (pooled), fit, split
    linear_error: Tensor  # bᵀx, [N, d]
    nonlinear_error: Tensor  # e − bᵀx, [N, d]


def error_vector_transform(x: Tensor, e: Tensor, cfg: RegressionConfig | None = None) -> ErrorDecomposition:
    """Experiment 2: the linear map from x to the error vector, and the split of e it induces.

    The components cover every token (the fit's own training tokens too, as the paper's code does); score on
    `regression.test_idx` for held-out numbers.
    """
    regression = heldout_regression(x, e, cfg)
    linear = regression.fit.predict(x).to(e.dtype)
    return ErrorDecomposition(regression, linear, e - linear)


@dataclasses.dataclass
class FVUBreakdown:
    """FVU of the SAE alone and with the linear error estimate added back."""

    total: float  # FVU(x, Sae(x))
    nonlinear: float  # FVU(x, Sae(x) + bᵀx)

    @property
    def linear(self) -> float:
        """The part of the SAE's FVU that the linear error estimate explains."""
        return self.total - self.nonlinear


def nonlinear_fvu(x: Tensor, sae_x: Tensor, linear_error: Tensor) -> FVUBreakdown:
    """Experiment 3: FVU(x, Sae(x) + bᵀx). Pass the held-out tokens (`regression.test_idx`) for honest numbers."""
    return FVUBreakdown(_fvu(x, sae_x), _fvu(x, sae_x + linear_error))


@dataclasses.dataclass
class PowerLaw:
    """FVU(width) = c + a·width^(−m): c is the floor that more latents do not remove."""

    c: float
    a: float
    m: float

    def __call__(self, width: float | np.ndarray) -> float | np.ndarray:
        return self.c + self.a * np.power(width, -self.m)


def fit_power_law(widths: Sequence[float], fvus: Sequence[float]) -> PowerLaw:
    """Least-squares fit of FVU(width) = c + a·width^(−m) over a width sweep (at least 3 widths).

    Fit in units of the smallest width, where a is of the order of the FVUs, with c in [0, min FVU], a >= 0 and
    m in [0, 10]; the starting point takes c at half the smallest FVU and m from the log-log slope of the rest.
    """
    w = np.asarray(widths, dtype=np.float64)
    f = np.asarray(fvus, dtype=np.float64)
    if w.shape != f.shape or w.size < 3 or len(set(w.tolist())) < 3:
        raise ValueError(f"a power law with a floor needs at least 3 distinct widths; got widths={list(w)}")
    if not (np.all(w > 0) and np.all(np.isfinite(f)) and np.all(f >= 0)):
        raise ValueError(f"widths must be positive and FVUs finite and >= 0; got {list(w)}, {list(f)}")
    w0 = w.min()
    c0 = 0.5 * f.min()
    slope = np.polyfit(np.log(w / w0), np.log(np.maximum(f - c0, 1e-12)), 1)[0]
    m0 = float(np.clip(-slope, 1e-3, 10.0))
    a0 = max(float(np.max(f) - c0), 1e-12)

    def model(width: np.ndarray, c: float, a: float, m: float) -> np.ndarray:
        return c + a * np.power(width, -m)

    (c, a, m), _ = curve_fit(
        model, w / w0, f, p0=(c0, a0, m0), bounds=([0.0, 0.0, 0.0], [max(f.min(), 1e-12), np.inf, 10.0]), maxfev=20_000
    )
    return PowerLaw(c=float(c), a=float(a * w0**m), m=float(m))


# ---- (4) per-token scaling ------------------------------------------------------------------------------


@dataclasses.dataclass
class PerTokenScaling:
    """How well a small SAE's per-token error norm predicts a larger one's (held-out; for a scalar target the
    remaining FVU is 1 − R²)."""

    r2: float  # ||e_large|| ~ [||e_small||, 1]
    fit: LinearFit  # slope weight[0, 0], intercept bias[0]
    r2_with_nonlinear: float | None  # ||e_large|| ~ [||e_small||, ||nonlinear_small||, 1]

    @property
    def gain(self) -> float | None:
        """R² added (= FVU removed) by the small SAE's nonlinear-error norm."""
        return None if self.r2_with_nonlinear is None else self.r2_with_nonlinear - self.r2


def per_token_scaling(
    e_small_norm: Tensor,
    e_large_norm: Tensor,
    nonlinear_small_norm: Tensor | None = None,
    cfg: RegressionConfig | None = None,
) -> PerTokenScaling:
    """Experiment 4, for one pair of widths. Both regressions use the same split (same `cfg.seed`)."""
    base = heldout_regression(e_small_norm[:, None], e_large_norm, cfg)
    with_nonlinear = None
    if nonlinear_small_norm is not None:
        both = torch.stack([e_small_norm, nonlinear_small_norm], dim=1)
        with_nonlinear = heldout_regression(both, e_large_norm, cfg).r2
    return PerTokenScaling(base.r2, base.fit, with_nonlinear)


# ---- (8) component shares ---------------------------------------------------------------------------------


@dataclasses.dataclass
class ComponentShares:
    """Experiment 8's yardsticks for each error component c, to set against its share of CE loss recovered."""

    norm: dict[str, float]  # mean ||c|| / mean ||e||
    variance: dict[str, float]  # (FVU(x, Sae(x)) − FVU(x, Sae(x) + c)) / FVU(x, Sae(x))


def component_shares(x: Tensor, sae_x: Tensor, components: dict[str, Tensor]) -> ComponentShares:
    """Share of the error norm and of the variance gap between Sae(x) and x that each component recovers."""
    e_norm = (x - sae_x).norm(dim=-1).mean().item()
    total = _fvu(x, sae_x)
    norm = {name: c.norm(dim=-1).mean().item() / e_norm for name, c in components.items()}
    variance = {name: (total - _fvu(x, sae_x + c)) / total for name, c in components.items()}
    return ComponentShares(norm, variance)


# ---- (10) projections from earlier components ----------------------------------------------------------------


def projection_r2(
    sources: dict[str, Tensor], targets: dict[str, Tensor], cfg: RegressionConfig | None = None
) -> dict[str, dict[str, float]]:
    """Experiment 10: held-out R² (mean per dimension) of a linear map from each source (e.g. the previous
    residual, this layer's attention and MLP outputs, their reconstructions and errors) to each target (e.g. the
    SAE's error, linear and nonlinear error). One regression per source, all targets side by side."""
    names = list(targets)
    widths = [targets[name].reshape(targets[name].shape[0], -1).shape[1] for name in names]
    stacked = torch.cat([targets[name].reshape(targets[name].shape[0], -1) for name in names], dim=1)
    table = {}
    for source, x in sources.items():
        result = heldout_regression(x, stacked, cfg)
        per_dim = r2_per_dimension(stacked[result.test_idx], result.predictions).split(widths)
        table[source] = {name: block.nanmean().item() for name, block in zip(names, per_dim, strict=True)}
    return table


# ---- (5) synthetic test -------------------------------------------------------------------------------------


@dataclasses.dataclass
class SyntheticPoint:
    """One setting of the synthetic test and the held-out FVUs measured on it. Noise levels are the noise's
    variance as a fraction of the variance of the synthetic activations Sae(x)."""

    input_noise: float
    reconstruction_noise: float
    mask_fraction: float
    fvu: FVUBreakdown


@dataclasses.dataclass
class SyntheticEstimate:
    """Per noise setting: the linearly explained FVU at the smallest mask fraction, normally 0, where no unlearned
    feature is left for the linear map to find (the dense-error estimate), and the nonlinear FVU averaged over mask
    fractions (the introduced-error estimate, flat in the mask fraction)."""

    input_noise: float
    reconstruction_noise: float
    dense: float
    introduced: float


@dataclasses.dataclass
class SyntheticErrorTest:
    """Every measured setting, the two estimates per noise setting, and their correlation table."""

    points: list[SyntheticPoint]
    estimates: list[SyntheticEstimate]
    # Pearson correlation over the noise grid: {"input noise" | "reconstruction noise": {"dense" | "introduced": r}}
    correlations: dict[str, dict[str, float]]


def _masked_reconstruct(sae: SparseAutoencoder, x: Tensor, keep: Tensor) -> Tensor:
    """Raw -> raw reconstruction with the latents where `keep` is 0 switched off (the SAE has not learned them)."""
    x_n, stats = sae.normalize(x)
    latents = sae.encode(x_n)
    if isinstance(latents, SparseLatents):
        latents = latents._replace(values=latents.values * keep[latents.indices])
    else:
        latents = latents * keep
    return sae.denormalize(sae.decode(latents), stats)


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1])


@torch.no_grad()
def synthetic_error_test(
    sae: SparseAutoencoder,
    x: Tensor,
    *,
    mask_fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
    input_noise: Sequence[float] = (0.0, 0.05, 0.1),
    reconstruction_noise: Sequence[float] = (0.0, 0.05, 0.1),
    cfg: RegressionConfig | None = None,
    seed: int = 0,
) -> SyntheticErrorTest:
    """Experiment 5: does the linear/nonlinear split find dense and introduced error where they were planted?

    The synthetic activations x' = Sae(x) are a known sparse sum of the SAE's own atoms. For every setting,
    x_in = x' + input noise (a stand-in for dense error) goes back through the SAE with the `mask_fraction` least
    used latents switched off (features the SAE has not learned), and reconstruction noise (a stand-in for
    introduced error) is added to the output. The error's linear/nonlinear split then yields the two estimates of
    `SyntheticEstimate`, whose correlation with the planted noise levels over the grid is the write-up's table.
    The noise draws are shared across settings, so the grid varies only the levels.
    """
    if len(set(input_noise)) < 2 or len(set(reconstruction_noise)) < 2:
        raise ValueError("correlations over the noise grid need at least 2 distinct levels of each noise")
    dtype = next(sae.parameters()).dtype
    x = x.reshape(-1, sae.d_in).to(sae.device, dtype)
    synthetic = sae.reconstruct(x)
    x_n, _ = sae.normalize(synthetic)
    usage_order = torch.argsort(fire_counts(sae.encode(x_n)), stable=True)  # least used first
    variance_per_dim = (synthetic - synthetic.mean(0)).pow(2).sum(-1).mean().item() / sae.d_in
    generator = torch.Generator().manual_seed(seed)
    unit_input_noise, unit_recon_noise = (torch.randn(x.shape, generator=generator).to(x) for _ in range(2))

    points = []
    for level_in, fraction in itertools.product(input_noise, mask_fractions):
        x_in = synthetic + unit_input_noise * (level_in * variance_per_dim) ** 0.5
        keep = torch.ones(sae.n_latents, dtype=dtype, device=x.device)
        keep[usage_order[: round(fraction * sae.n_latents)]] = 0
        reconstruction = _masked_reconstruct(sae, x_in, keep)
        for level_rec in reconstruction_noise:
            noisy = reconstruction + unit_recon_noise * (level_rec * variance_per_dim) ** 0.5
            regression = heldout_regression(x_in, x_in - noisy, cfg)
            test = regression.test_idx
            breakdown = nonlinear_fvu(x_in[test], noisy[test], regression.predictions)
            points.append(SyntheticPoint(level_in, level_rec, fraction, breakdown))
    estimates = _noise_estimates(points, min(mask_fractions))
    truth = {
        "input noise": [est.input_noise for est in estimates],
        "reconstruction noise": [est.reconstruction_noise for est in estimates],
    }
    found = {"dense": [est.dense for est in estimates], "introduced": [est.introduced for est in estimates]}
    correlations = {row: {col: _pearson(truth[row], found[col]) for col in found} for row in truth}
    return SyntheticErrorTest(points, estimates, correlations)


def _noise_estimates(points: list[SyntheticPoint], unmasked: float) -> list[SyntheticEstimate]:
    grid: dict[tuple[float, float], list[SyntheticPoint]] = {}
    for point in points:
        grid.setdefault((point.input_noise, point.reconstruction_noise), []).append(point)
    return [
        SyntheticEstimate(
            level_in,
            level_rec,
            dense=next(p.fvu.linear for p in group if p.mask_fraction == unmasked),
            introduced=float(np.mean([p.fvu.nonlinear for p in group])),
        )
        for (level_in, level_rec), group in grid.items()
    ]
