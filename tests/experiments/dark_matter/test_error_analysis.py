"""Dark-matter decompositions on planted data whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.experiments.dark_matter.error_analysis import (
    component_shares,
    error_norm_probe,
    error_vector_transform,
    fit_power_law,
    nonlinear_fvu,
    norm_prediction,
    per_token_scaling,
    projection_r2,
    synthetic_error_test,
)
from saelab.experiments.dark_matter.regression import RegressionConfig
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.saes.shallow import ShallowSAE
from saelab.saes.topk import TopKSAE, TopKSAEConfig


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal_rows(n: int, d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q[:, :n].T.float().contiguous()


def test_linear_plus_independent_noise_splits_into_exactly_those_parts() -> None:
    # e = x A + c + ξ with x ~ N(0, 9 I), ||A_j|| = 1/3 (signal variance 1 per dimension) and ξ ~ N(0, I)
    # independent of x: the linear error is x A + c, the nonlinear error is ξ, and R² = 1/(1+1) = 0.5 per dimension.
    g = _gen(0)
    n, d = 20_000, 12
    x = 3 * torch.randn(n, d, generator=g)
    a = torch.randn(d, d, generator=g)
    a /= 3 * a.norm(dim=0, keepdim=True)
    c = torch.randn(d, generator=g)
    noise = torch.randn(n, d, generator=g)
    e = x @ a + c + noise
    split = error_vector_transform(x, e, RegressionConfig(seed=3))
    assert split.regression.r2 == pytest.approx(0.5, abs=0.015)
    torch.testing.assert_close(split.regression.fit.weight.float(), a, atol=0.02, rtol=0)
    planted = x @ a + c
    assert (split.linear_error - planted).pow(2).sum() < 1e-3 * planted.pow(2).sum()
    torch.testing.assert_close(split.linear_error + split.nonlinear_error, e)
    corr = np.corrcoef(split.nonlinear_error.flatten().numpy(), noise.flatten().numpy())[0, 1]
    assert corr > 0.999
    # FVU(x, Sae(x)) = (1 + 1 + mean c²)/9 and with the linear estimate added back only ξ is left: 1/9.
    test = split.regression.test_idx
    sae_x = x - e
    breakdown = nonlinear_fvu(x[test], sae_x[test], split.linear_error[test])
    assert breakdown.total == pytest.approx((2 + c.pow(2).mean().item()) / 9, rel=0.03)
    assert breakdown.nonlinear == pytest.approx(1 / 9, rel=0.03)
    assert breakdown.linear == pytest.approx(breakdown.total - breakdown.nonlinear)


def _bernoulli_features(n_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = Σ_i v_i f_i with orthonormal f_i and v_i = s_i with probability p_i, else 0; returns (x, v)."""
    g = _gen(seed)
    features = _orthonormal_rows(10, 20, seed)
    p = torch.linspace(0.05, 0.5, 10)
    s = torch.linspace(1.0, 4.0, 10)
    v = (torch.rand(n_tokens, 10, generator=g) < p) * s
    return v @ features, v


def test_norm_of_a_sparse_sum_of_orthogonal_bernoulli_features_is_linear_in_x() -> None:
    # A claim of "Decomposing The Dark Matter of Sparse Autoencoders" (its appendix B.1):
    # ||Σ_{i∈U} v_i f_i||² = Σ_{i∈U} s_i <x, f_i> exactly, so the probe's R² is 1.
    x, v = _bernoulli_features(5_000, seed=1)
    features = _orthonormal_rows(10, 20, 1)
    unlearned = v[:, 6:] @ features[6:]
    result = error_norm_probe(x, unlearned)
    assert result.r2 > 1 - 1e-6
    assert result.predictions.shape == (result.test_idx.numel(),)


def test_norm_prediction_separates_predictable_from_independent_components() -> None:
    x, v = _bernoulli_features(8_000, seed=2)
    features = _orthonormal_rows(10, 20, 2)
    noise = torch.randn(8_000, 20, generator=_gen(5))
    r2 = norm_prediction(x, {"x": x, "unlearned": v[:, :4] @ features[:4], "noise": noise})
    assert list(r2) == ["x", "unlearned", "noise"]
    assert r2["x"] > 1 - 1e-6 and r2["unlearned"] > 1 - 1e-6
    assert abs(r2["noise"]) < 0.02


def test_power_law_fit_recovers_planted_parameters() -> None:
    widths = [2.0**p for p in range(12, 20)]
    exact = [0.05 + 3.0 * w**-0.3 for w in widths]
    law = fit_power_law(widths, exact)
    assert (law.c, law.a, law.m) == pytest.approx((0.05, 3.0, 0.3), rel=1e-4)
    assert law(2.0**25) == pytest.approx(0.05 + 3.0 * 2.0**-7.5, rel=1e-4)
    jitter = np.random.default_rng(0).normal(0, 0.003, len(widths))
    noisy = fit_power_law(widths, [f * (1 + j) for f, j in zip(exact, jitter, strict=True)])
    assert noisy.c == pytest.approx(0.05, abs=0.01)
    with pytest.raises(ValueError, match="3 distinct widths"):
        fit_power_law([1.0, 2.0], [0.5, 0.4])


def test_per_token_scaling_r2_and_gain_from_nonlinear_norm() -> None:
    # e_small = u + v, e_large = u + 0.2 v + η with u, v ~ N(0, 1), Var(η) = 0.26. On e_small alone:
    # R² = Cov²/(Var·Var) = 1.2² / (2 · 1.3) = 0.5538; adding v (the "nonlinear" part) spans u and v: R² = 1.04/1.3.
    g = _gen(6)
    u, v = torch.randn(30_000, generator=g) + 5, torch.randn(30_000, generator=g) + 3
    large = u + 0.2 * v + 0.26**0.5 * torch.randn(30_000, generator=g)
    result = per_token_scaling(u + v, large, nonlinear_small_norm=v)
    assert result.r2 == pytest.approx(1.44 / 2.6, abs=0.015)
    assert result.r2_with_nonlinear == pytest.approx(0.8, abs=0.015)
    assert result.gain == pytest.approx(0.8 - 1.44 / 2.6, abs=0.01)
    assert result.fit.weight[0, 0].item() == pytest.approx(0.6, abs=0.02)
    assert per_token_scaling(u + v, large).gain is None


def test_component_shares_of_orthogonal_components() -> None:
    # e = L + N with L = (1, 0) and N = (0, 2) on every token: squared errors 5 alone, 4 with L added, 1 with N.
    x = 3 * torch.randn(1_000, 2, generator=_gen(7))
    linear = torch.tensor([1.0, 0.0]).expand(1_000, 2)
    nonlinear = torch.tensor([0.0, 2.0]).expand(1_000, 2)
    shares = component_shares(x, x - linear - nonlinear, {"linear": linear, "nonlinear": nonlinear})
    assert shares.variance == pytest.approx({"linear": 0.2, "nonlinear": 0.8})
    assert shares.norm == pytest.approx({"linear": 1 / 5**0.5, "nonlinear": 2 / 5**0.5})


def _orthonormal_sae(architecture: str, d: int, n: int) -> ShallowSAE:
    """Top-k (k=4) or ReLU SAE whose n atoms, tied, are orthonormal in a subspace of R^d: it reconstructs its own
    outputs exactly, and everything outside the subspace is error a linear map can find (like real activations'
    low-variance directions that SAEs leave out)."""
    if architecture == "topk":
        sae: ShallowSAE = TopKSAE(TopKSAEConfig(d_in=d, n_latents=n, k=4))
    else:
        sae = ReluSAE(ReluSAEConfig(d_in=d, n_latents=n))
    atoms = _orthonormal_rows(n, d, seed=8)
    with torch.no_grad():
        sae.W_enc.copy_(atoms)
        sae.W_dec.copy_(atoms)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("architecture", ["topk", "relu"])  # sparse and dense latents
def test_synthetic_harness_tracks_input_noise_linearly_and_reconstruction_noise_nonlinearly(architecture: str) -> None:
    sae = _orthonormal_sae(architecture, d=24, n=12)
    g = _gen(9)
    usage = torch.linspace(0.05, 0.4, 12)
    codes = (torch.rand(2_000, 12, generator=g) < usage) * (1 + torch.rand(2_000, 12, generator=g))
    x = codes @ sae.W_dec.detach() + 0.3 * torch.randn(2_000, 24, generator=g)
    levels = (0.0, 0.1, 0.2)
    table = synthetic_error_test(
        sae, x, mask_fractions=(0.0, 0.5), input_noise=levels, reconstruction_noise=levels, seed=1
    )
    corr = table.correlations
    assert corr["input noise"]["dense"] > 0.95 and corr["reconstruction noise"]["introduced"] > 0.95
    assert abs(corr["input noise"]["introduced"]) < 0.5 and abs(corr["reconstruction noise"]["dense"]) < 0.5
    est = {(e.input_noise, e.reconstruction_noise): e for e in table.estimates}
    for level in levels:
        assert est[(0.0, level)].dense < est[(0.1, level)].dense < est[(0.2, level)].dense
        assert est[(level, 0.0)].introduced < est[(level, 0.1)].introduced < est[(level, 0.2)].introduced
    # Masking the least used latents grows the SAE's error but the linear estimate absorbs all of it.
    clean = {p.mask_fraction: p.fvu for p in table.points if p.input_noise == p.reconstruction_noise == 0}
    assert clean[0.0].total < 0.01 and clean[0.5].total > 0.1
    assert clean[0.5].nonlinear < 1e-3
    assert len(table.points) == 2 * 3 * 3


def test_projection_r2_from_each_source_to_each_target() -> None:
    # t = a M + ξ with Var(a M) = Var(ξ) per dimension: R² 0.5 from a, 0 from an unrelated b; a scalar target a_0
    # is a column of a itself (R² 1 from a).
    g = _gen(10)
    a, b = torch.randn(20_000, 6, generator=g), torch.randn(20_000, 6, generator=g)
    m = torch.randn(6, 4, generator=g)
    m /= m.norm(dim=0, keepdim=True)
    t = a @ m + torch.randn(20_000, 4, generator=g)
    table = projection_r2({"a": a, "b": b}, {"t": t, "a0": a[:, 0]})
    assert table["a"]["t"] == pytest.approx(0.5, abs=0.015)
    assert table["a"]["a0"] == pytest.approx(1.0, abs=1e-6)
    assert abs(table["b"]["t"]) < 0.01 and abs(table["b"]["a0"]) < 0.01
