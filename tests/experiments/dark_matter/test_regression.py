"""The regression engine against planted maps with analytically known R², and against a direct lstsq solve."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError, DataError
from saelab.experiments.dark_matter.regression import (
    NormalEquations,
    RegressionConfig,
    fit_linear,
    fit_linear_chunks,
    heldout_regression,
    r2_per_dimension,
    r2_score,
    random_split,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lstsq_with_bias(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: float64 least squares on [x, 1] through an orthogonal factorisation, not normal equations."""
    a = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(a, y.double().reshape(x.shape[0], -1), driver="gelsd").solution
    return sol[:-1], sol[-1]


def test_recovers_planted_map_bias_and_known_r2() -> None:
    # y = x W + b + noise, x ~ N(0, I): per dimension Var(signal) = ||W_j||² = 1 and Var(noise) = 1/3, so R² = 0.75
    # in every dimension, and the pooled FVU is 0.25.
    g = _gen()
    n, d_in, d_out = 30_000, 8, 5
    w = torch.randn(d_in, d_out, generator=g)
    w /= w.norm(dim=0, keepdim=True)
    b = torch.randn(d_out, generator=g) * 3
    x = torch.randn(n, d_in, generator=g)
    y = x @ w + b + torch.randn(n, d_out, generator=g) / 3**0.5
    result = heldout_regression(x, y, RegressionConfig(train_size=0.6, seed=1))
    assert result.r2 == pytest.approx(0.75, abs=0.01)
    assert result.fvu == pytest.approx(0.25, abs=0.01)
    torch.testing.assert_close(result.fit.weight, w.double(), atol=0.02, rtol=0)
    torch.testing.assert_close(result.fit.bias, b.double(), atol=0.02, rtol=0)
    assert result.predictions.shape == (result.test_idx.numel(), d_out)
    assert result.train_idx.numel() == 18_000


def test_scalar_target_r2_and_prediction_shape() -> None:
    # y = 2·x_0 − x_1 + 5 + noise with Var(signal) = 5, Var(noise) = 5: R² = 0.5, and FVU = 1 − R² for a scalar.
    g = _gen(1)
    x = torch.randn(20_000, 3, generator=g)
    y = 2 * x[:, 0] - x[:, 1] + 5 + torch.randn(20_000, generator=g) * 5**0.5
    result = heldout_regression(x, y)
    assert result.predictions.shape == (result.test_idx.numel(),)
    assert result.r2 == pytest.approx(0.5, abs=0.02)
    assert result.fvu == pytest.approx(1 - result.r2, abs=1e-6)


def test_streamed_chunks_equal_one_shot_fit_and_lstsq() -> None:
    # Uneven chunks and a large common offset (which centring must handle) give the same fit as one pass, and both
    # equal an orthogonal-factorisation solve.
    g = _gen(2)
    x = torch.randn(5_000, 6, generator=g) * torch.tensor([1e-2, 1, 10, 1, 1, 3]) + 1e3
    y = torch.randn(5_000, 4, generator=g) + x[:, :4] * 0.5
    bounds = [0, 7, 1_000, 1_001, 3_333, 5_000]
    streamed = fit_linear_chunks((x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    one_shot = fit_linear(x, y)
    torch.testing.assert_close(streamed.weight, one_shot.weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(streamed.bias, one_shot.bias, rtol=1e-9, atol=1e-7)
    w_ref, b_ref = _lstsq_with_bias(x, y)
    torch.testing.assert_close(one_shot.weight, w_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one_shot.bias, b_ref, rtol=1e-6, atol=1e-4)


def test_rows_subset_equals_fit_on_the_copied_subset() -> None:
    g = _gen(3)
    x, y = torch.randn(2_000, 4, generator=g), torch.randn(2_000, 3, generator=g)
    rows = torch.randperm(2_000, generator=g)[:700]
    a, b = fit_linear(x, y, rows=rows), fit_linear(x[rows], y[rows])
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)


def test_singular_inputs_predict_like_least_squares() -> None:
    # A duplicated and a constant column make the system singular; predictions still match the lstsq reference.
    g = _gen(4)
    base = torch.randn(3_000, 3, generator=g)
    x = torch.cat([base, base[:, :1], torch.full((3_000, 1), 2.0)], dim=1)
    y = base @ torch.randn(3, 2, generator=g) + 0.1 * torch.randn(3_000, 2, generator=g)
    fit = fit_linear(x, y)
    w_ref, b_ref = _lstsq_with_bias(x, y)
    torch.testing.assert_close(fit.predict(x.double()), x.double() @ w_ref + b_ref, rtol=1e-6, atol=1e-6)


def test_ridge_matches_augmented_least_squares_and_shrinks() -> None:
    # mean_t ||y − xW − b||² + λ||W||² is ordinary least squares on rows [x, 1] plus sqrt(λ n)·[I, 0] with target 0.
    g = _gen(5)
    n, d, lam = 1_000, 4, 0.3
    x = torch.randn(n, d, generator=g) + 2
    y = x @ torch.randn(d, 2, generator=g) + 1 + torch.randn(n, 2, generator=g)
    fit = fit_linear(x, y, ridge=lam)
    a = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    penalty = torch.cat(
        [torch.eye(d, dtype=torch.float64) * (lam * n) ** 0.5, torch.zeros(d, 1, dtype=torch.float64)], 1
    )
    sol = torch.linalg.lstsq(torch.cat([a, penalty]), torch.cat([y.double(), torch.zeros(d, 2, dtype=torch.float64)]))
    torch.testing.assert_close(fit.weight, sol.solution[:-1], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(fit.bias, sol.solution[-1], rtol=1e-8, atol=1e-8)
    huge = fit_linear(x, y, ridge=1e9)
    assert huge.weight.abs().max() < 1e-6
    torch.testing.assert_close(huge.bias, y.double().mean(0), rtol=0, atol=1e-5)


def test_without_bias_column_matches_plain_lstsq() -> None:
    g = _gen(6)
    x = torch.randn(1_000, 3, generator=g) + 1
    y = x @ torch.randn(3, 2, generator=g) + 4
    fit = fit_linear(x, y, bias=False)
    ref = torch.linalg.lstsq(x.double(), y.double()).solution
    torch.testing.assert_close(fit.weight, ref, rtol=1e-8, atol=1e-8)
    assert torch.count_nonzero(fit.bias) == 0


def test_random_split_fraction_count_and_determinism() -> None:
    train, test = random_split(100, 0.6, seed=3)
    assert (train.numel(), test.numel()) == (60, 40)
    assert torch.equal(torch.sort(torch.cat([train, test])).values, torch.arange(100))
    again, _ = random_split(100, 0.6, seed=3)
    other, _ = random_split(100, 0.6, seed=4)
    assert torch.equal(train, again) and not torch.equal(train, other)
    assert random_split(100, 75.0)[0].numel() == 75
    with pytest.raises(ValueError, match="both parts"):
        random_split(100, 1.0)
    with pytest.raises(ConfigError):
        RegressionConfig(train_size=0.0).validate()


def test_r2_is_mean_of_per_dimension_r2_and_ignores_constant_dimensions() -> None:
    y = torch.tensor([[0.0, 1.0, 7.0], [2.0, 3.0, 7.0], [4.0, 5.0, 7.0]])
    pred = torch.tensor([[0.0, 2.0, 7.0], [2.0, 3.0, 7.0], [4.0, 4.0, 7.0]])
    per_dim = r2_per_dimension(y, pred)
    assert per_dim[:2].tolist() == pytest.approx([1.0, 0.75])
    assert torch.isnan(per_dim[2])
    assert r2_score(y, pred) == pytest.approx(0.875)
    with pytest.raises(DataError, match="constant"):
        r2_score(y[:, 2:], pred[:, 2:])


def test_bad_inputs_raise_data_errors() -> None:
    x = torch.randn(10, 2)
    x[3, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        fit_linear(x, torch.randn(10))
    equations = NormalEquations()
    equations.update(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(DataError, match="first chunk"):
        equations.update(torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(DataError, match="rows"):
        equations.update(torch.randn(5, 2), torch.randn(4, 3))
    with pytest.raises(DataError, match="no rows"):
        NormalEquations().solve()
