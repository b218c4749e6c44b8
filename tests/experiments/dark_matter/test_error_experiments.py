"""The dark-matter experiments on planted data and tiny models whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from saelab.experiments.dark_matter.error_analysis import FVUBreakdown
from saelab.experiments.dark_matter.error_experiments import (
    ALL_RECONSTRUCTIONS,
    NORM_COMPONENTS,
    REASSEMBLED,
    ErrorAnalysis,
    analyze_errors,
    component_cross_entropy,
    earlier_component_projections,
    error_components,
    fvu_scaling,
    pairwise_scaling,
    pursuit_comparison,
)
from saelab.experiments.dark_matter.regression import LinearFit, RegressionConfig
from saelab.metrics import cross_entropy
from saelab.models.hooks import forward_with
from saelab.saes.base import SAEConfig, SparseAutoencoder
from saelab.saes.topk import TopKSAE, TopKSAEConfig


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class HalfSAE(SparseAutoencoder):
    """Sae(x) = x / 2 (dense latents = x): its error x / 2 is exactly linear in x."""

    architecture = "half_test"

    def __init__(self, d: int) -> None:
        super().__init__(SAEConfig(d_in=d, n_latents=d))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, latents: Tensor) -> Tensor:
        return 0.5 * latents + self.b_dec

    def flops_per_token(self) -> int:
        return self.d_in


def test_analyze_errors_splits_a_planted_error_and_keeps_per_token_norms() -> None:
    # e = x A + c + ξ, Var(x A) = Var(ξ) = 1 per dimension, x ~ N(0, 9 I): vector R² 0.5, nonlinear FVU 1/9.
    g = _gen(0)
    n, d = 12_000, 10
    x = 3 * torch.randn(n, d, generator=g)
    a = torch.randn(d, d, generator=g)
    a /= 3 * a.norm(dim=0, keepdim=True)
    noise = torch.randn(n, d, generator=g)
    e = x @ a + 0.5 + noise
    result = analyze_errors(x, x - e, RegressionConfig(seed=2))
    assert result.vector_r2 == pytest.approx(0.5, abs=0.02)
    assert result.fvu.total == pytest.approx((2 + 0.25) / 9, rel=0.04)
    assert result.fvu.nonlinear == pytest.approx(1 / 9, rel=0.04)
    assert list(result.norm_prediction) == list(NORM_COMPONENTS)
    assert result.norm_prediction["error"] == pytest.approx(result.norm_probe_r2)
    torch.testing.assert_close(result.error_norm, e.norm(dim=-1))
    assert np.corrcoef(result.nonlinear_norm.numpy(), noise.norm(dim=-1).numpy())[0, 1] > 0.99
    assert result.test_idx.numel() == n - round(0.6 * n)
    assert set(result.summary()) >= {"norm_probe_r2", "vector_r2", "fvu_nonlinear", "norm_prediction_r2"}


def test_fvu_scaling_fits_the_total_and_finds_a_flat_nonlinear_level() -> None:
    widths = [4096, 1024, 16384, 2048, 8192]  # any order
    total = [0.05 + 3.0 * w**-0.3 for w in widths]
    breakdowns = [FVUBreakdown(t, 0.04) for t in total]
    scaling = fvu_scaling(widths, breakdowns)
    assert scaling.widths == sorted(widths)
    assert (scaling.total_law.c, scaling.total_law.a, scaling.total_law.m) == pytest.approx((0.05, 3.0, 0.3), rel=1e-3)
    assert scaling.nonlinear_level == pytest.approx(0.04)
    assert scaling.nonlinear_slope == pytest.approx(0.0, abs=1e-9) and scaling.total_slope < -0.1
    assert scaling.summary()["power_law_floor_above_nonlinear_level"] is True
    assert fvu_scaling([1024, 2048], breakdowns[:2]).total_law is None


def _analysis(error_norm: Tensor, nonlinear_norm: Tensor) -> ErrorAnalysis:
    """Only the per-token norms matter to experiment 4."""
    return ErrorAnalysis(0.0, 0.0, 0.0, FVUBreakdown(0.0, 0.0), {}, LinearFit(torch.zeros(1, 1), torch.zeros(1), True),
                         error_norm, nonlinear_norm, torch.arange(0))


def test_pairwise_scaling_covers_pairs_from_small_to_large_with_known_r2() -> None:
    # small: u + v with nonlinear part v; mid: u + 0.2 v + η, Var(η) = 0.26. R² = 1.44/2.6 on the small norm alone
    # and 0.8 with v added (as in the library's own test); the wide SAE's norm is the mid one's exactly.
    g = _gen(3)
    u, v = torch.randn(30_000, generator=g) + 5, torch.randn(30_000, generator=g) + 3
    mid = u + 0.2 * v + 0.26**0.5 * torch.randn(30_000, generator=g)
    analyses = {"wide": _analysis(mid, mid), "small": _analysis(u + v, v), "mid": _analysis(mid, 0.5 * mid)}
    pairs = pairwise_scaling(analyses, {"small": 1024, "mid": 4096, "wide": 16384})
    assert [(p.small, p.large) for p in pairs] == [("small", "mid"), ("small", "wide"), ("mid", "wide")]
    small_mid = pairs[0]
    assert small_mid.r2 == pytest.approx(1.44 / 2.6, abs=0.015)
    assert small_mid.r2_with_nonlinear == pytest.approx(0.8, abs=0.015)
    assert small_mid.fvu_decrease == pytest.approx((0.8 - 1.44 / 2.6) / (1 - 1.44 / 2.6), abs=0.04)
    assert pairs[2].r2 == pytest.approx(1.0) and pairs[2].slope == pytest.approx(1.0)


def test_error_components_add_up_to_x() -> None:
    sae = TopKSAE(TopKSAEConfig(d_in=8, n_latents=16, k=2))
    g = _gen(4)
    x = torch.randn(50, 8, generator=g)
    fit = LinearFit(torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, dtype=torch.float64), False)
    parts = error_components(sae, fit, x)
    torch.testing.assert_close(parts.reconstruction + parts.linear + parts.nonlinear, x)
    torch.testing.assert_close(parts.linear, fit.predict(x))
    torch.testing.assert_close(parts.reconstruction, sae.reconstruct(x))


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def contexts() -> Tensor:
    return torch.randint(0, 100, (5, 12), generator=_gen(1))


def test_splicing_both_components_reproduces_the_clean_loss(gpt2, contexts) -> None:
    # Any SAE and any linear map: Sae(x) + linear + (x − Sae(x) − linear) is x, so the loss is the clean loss.
    sae = TopKSAE(TopKSAEConfig(d_in=32, n_latents=64, k=4))
    g = _gen(2)
    fit = LinearFit(0.1 * torch.randn(32, 32, generator=g, dtype=torch.float64), torch.zeros(32, dtype=torch.float64),
                    False)
    result = component_cross_entropy(gpt2, "resid_post.0", contexts, {"sae": (sae, fit)}, reassembled={"sae"},
                                     batch_size=2, drop_first=2, exclude_token_ids=(contexts[0, 4].item(),))["sae"]
    assert set(result.spliced) == {"sae", "sae+linear", "sae+nonlinear", REASSEMBLED}
    assert result.spliced[REASSEMBLED] == pytest.approx(result.clean, abs=1e-5)
    assert result.kl[REASSEMBLED] == pytest.approx(0.0, abs=1e-6)
    assert abs(result.spliced["sae"] - result.clean) > 1e-2
    mask = torch.ones_like(contexts, dtype=torch.bool)
    mask[:, :2] = False
    mask &= contexts != contexts[0, 4]
    clean, _ = forward_with(gpt2, contexts)
    assert result.clean == pytest.approx(cross_entropy(clean, contexts, mask).item(), rel=1e-6)


def test_each_component_closes_its_own_share_of_the_gap(gpt2, contexts) -> None:
    # Sae(x) = x/2 and the fit b = I/2 recover the error exactly: the linear component is all of it and the
    # nonlinear one is exactly zero.
    fit = LinearFit(0.5 * torch.eye(32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64), False)
    result = component_cross_entropy(gpt2, "resid_post.1", contexts, {"half": (HalfSAE(32), fit)}, drop_first=1)["half"]
    assert REASSEMBLED not in result.spliced
    assert result.spliced["sae+linear"] == pytest.approx(result.clean, abs=1e-5)
    assert result.spliced["sae+nonlinear"] == result.spliced["sae"] > result.clean
    assert result.gap_closed == pytest.approx({"linear": 1.0, "nonlinear": 0.0}, abs=1e-4)
    assert result.recovered["sae+linear"] == pytest.approx(1.0, abs=1e-4)
    assert result.summary()["ce_gap_closed"] == result.gap_closed


def test_pursuit_recovers_what_a_poor_encoder_misses() -> None:
    # x is a sum of 2 of 8 orthonormal atoms with coefficients in [1, 2]. The SAE decodes with those atoms but
    # encodes with perturbed ones: its reconstructions are off, while pursuit on the decoder with the SAE's own
    # L0 (2 per token) finds each code exactly.
    g = _gen(5)
    atoms = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:, :8].T.contiguous()
    sae = TopKSAE(TopKSAEConfig(d_in=16, n_latents=8, k=2))
    with torch.no_grad():
        sae.W_dec.copy_(atoms)
        sae.W_enc.copy_(atoms + 0.05 * torch.randn(8, 16, generator=g))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    support = torch.rand(3_000, 8, generator=g).argsort(dim=1)[:, :2]
    codes = torch.zeros(3_000, 8).scatter_(1, support, 1 + torch.rand(3_000, 2, generator=g))
    x = codes @ atoms
    result = pursuit_comparison(sae, x, RegressionConfig(seed=0))
    assert result.mean_l0 == pytest.approx(2.0)
    assert result.sae.total > 1e-3
    assert result.pursuit.total < 1e-6 and result.pursuit.nonlinear < 1e-6
    assert result.summary()["fvu_total_change"] == pytest.approx(result.pursuit.total - result.sae.total)


def test_earlier_component_projections_from_each_source_and_from_all_reconstructions() -> None:
    # t = h1 M + ξ with Var(h1 M) = Var(ξ): R² 0.5 from h1, from Sae(h1) = h1/2 and from h1 − Sae(h1) = h1/2;
    # nothing from the unrelated h2 or its parts; 0.5 again from both reconstructions together.
    g = _gen(6)
    h1, h2 = torch.randn(20_000, 6, generator=g), torch.randn(20_000, 6, generator=g)
    m = torch.randn(6, 4, generator=g)
    m /= m.norm(dim=0, keepdim=True)
    t = h1 @ m + torch.randn(20_000, 4, generator=g)
    table = earlier_component_projections({"h1": h1, "h2": h2}, {"h1": HalfSAE(6), "h2": HalfSAE(6)},
                                          {"t": t, "h1 first": h1[:, 0]})
    assert list(table) == ["h1", "Sae(h1)", "h1 − Sae(h1)", "h2", "Sae(h2)", "h2 − Sae(h2)", ALL_RECONSTRUCTIONS]
    for source in ("h1", "Sae(h1)", "h1 − Sae(h1)", ALL_RECONSTRUCTIONS):
        assert table[source]["t"] == pytest.approx(0.5, abs=0.02)
        assert table[source]["h1 first"] == pytest.approx(1.0, abs=1e-6)
    for source in ("h2", "Sae(h2)", "h2 − Sae(h2)"):
        assert abs(table[source]["t"]) < 0.01
