import math

import pytest
import torch

from saelab.metrics import (
    FVUAccumulator,
    LatentAccumulator,
    MeanAccumulator,
    ce_loss_recovered,
    cosine_similarity,
    cross_entropy,
    dead_fraction,
    dead_mask,
    fire_counts,
    fraction_of_variance_unexplained,
    kl_divergence,
    l0,
    mse,
    per_dimension_fvu,
    per_slice_fvu,
    token_cross_entropy,
)
from saelab.saes.base import SparseLatents

# Three tokens in 2-d; mean (1, 2); squared deviations: (1+4) + (0+0) + (1+4) = 10.
X = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]])
X_HAT = torch.tensor([[0.0, 1.0], [1.0, 2.0], [1.0, 4.0]])  # squared errors: 1 (dim 1) + 1 (dim 0) = 2


def test_fvu_by_hand() -> None:
    assert fraction_of_variance_unexplained(X, X_HAT).item() == pytest.approx(2 / 10)


def test_fvu_treats_leading_dims_as_tokens_and_is_differentiable() -> None:
    x_hat = X_HAT.clone().requires_grad_()
    fvu = fraction_of_variance_unexplained(X.view(1, 3, 2), x_hat.view(1, 3, 2))
    fvu.backward()
    assert fvu.item() == pytest.approx(0.2)
    assert torch.allclose(x_hat.grad, 2 * (X_HAT - X) / 10)


def _fvu_definition(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def test_fvu_value_and_gradients_match_the_composed_definition() -> None:
    torch.manual_seed(0)
    x = (torch.randn(40, 6, dtype=torch.float64) * 3 + 5).requires_grad_()
    x_hat = (x.detach() + torch.randn(40, 6, dtype=torch.float64)).requires_grad_()
    fast = fraction_of_variance_unexplained(x, x_hat)
    fast_grads = torch.autograd.grad(fast, (x, x_hat))
    plain = _fvu_definition(x, x_hat)
    plain_grads = torch.autograd.grad(plain, (x, x_hat))
    torch.testing.assert_close(fast, plain)
    for got, want in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(fraction_of_variance_unexplained, (x[:7], x_hat[:7]))


@pytest.mark.parametrize("needs_x", [False, True])
def test_float32_fvu_on_cpu_matches_the_definition_at_any_thread_count(needs_x: bool) -> None:
    # float32 CPU inputs take the native one-pass sums (accumulated in double); a large mean tests the cancellation
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(700, 37, generator=gen) * 2 + 40
    x_hat = x + torch.randn(700, 37, generator=gen)
    want = _fvu_definition(x.double(), x_hat.double())
    previous, results = torch.get_num_threads(), []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            xs, hs = x.clone().requires_grad_(needs_x), x_hat.clone().requires_grad_()
            fvu = fraction_of_variance_unexplained(xs, hs)
            fvu.backward()
            results.append((fvu.detach(), hs.grad, xs.grad))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(results[0][:2], results[1][:2], strict=True))
    assert results[0][0].dtype == torch.float32
    assert results[0][0].item() == pytest.approx(want.item(), rel=1e-6)
    xd, hd = x.double().requires_grad_(needs_x), x_hat.double().requires_grad_()
    want_grads = torch.autograd.grad(_fvu_definition(xd, hd), (xd, hd) if needs_x else (hd,))
    torch.testing.assert_close(results[0][1], want_grads[-1].float(), rtol=1e-4, atol=1e-9)
    if needs_x:
        torch.testing.assert_close(results[0][2], want_grads[0].float(), rtol=1e-4, atol=1e-9)


def test_fvu_gradient_keeps_each_input_dtype() -> None:
    x = torch.randn(8, 4)
    x_hat = x.to(torch.bfloat16).requires_grad_()
    fraction_of_variance_unexplained(x, x_hat).backward()
    assert x_hat.grad.dtype == torch.bfloat16


def test_mse_is_per_element() -> None:
    assert mse(X, X_HAT).item() == pytest.approx(2 / 6)


def test_per_slice_fvu_by_hand_and_variance_weighted_total() -> None:
    # dim 0: error 1, variance 2; dim 1: error 1, variance 8.
    per = per_slice_fvu(X, X_HAT, [(0, 1), slice(1, 2)])
    assert per.tolist() == pytest.approx([1 / 2, 1 / 8])
    torch.manual_seed(1)
    x = torch.randn(50, 12) * torch.linspace(0.1, 3, 12)
    x_hat = x + 0.3 * torch.randn(50, 12)
    slices = [(0, 3), (3, 8), (8, 12)]
    per = per_slice_fvu(x, x_hat, slices)
    variances = torch.stack([(x[:, a:b] - x[:, a:b].mean(0)).pow(2).sum() for a, b in slices])
    weighted = (variances / variances.sum() * per).sum()
    assert weighted.item() == pytest.approx(fraction_of_variance_unexplained(x, x_hat).item(), rel=1e-5)
    assert not torch.allclose(per.mean(), weighted)  # the plain mean of per-slice FVUs is a different number


def test_per_dimension_fvu_by_hand_is_a_mean_of_ratios() -> None:
    # dim 0: error 1 / variance 2; dim 1: error 1 / variance 8 -> (1/2 + 1/8) / 2, not the pooled 2/10.
    assert per_dimension_fvu(X, X_HAT).item() == pytest.approx((1 / 2 + 1 / 8) / 2)
    assert per_dimension_fvu(X, X_HAT, [(0, 1), slice(1, 2)]).tolist() == pytest.approx([1 / 2, 1 / 8])
    # A constant dimension has no ratio and is left out; scaling a dimension changes nothing.
    x = torch.cat([X, torch.ones(3, 1)], dim=1)
    x_hat = torch.cat([X_HAT, torch.zeros(3, 1)], dim=1)
    assert per_dimension_fvu(x, x_hat).item() == pytest.approx((1 / 2 + 1 / 8) / 2)
    scale = torch.tensor([10.0, 0.1])
    assert per_dimension_fvu(X * scale, X_HAT * scale).item() == pytest.approx((1 / 2 + 1 / 8) / 2)


def test_cosine_similarity_by_hand() -> None:
    cos = cosine_similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [2.0, 2.0]]))
    assert cos.tolist() == pytest.approx([0.0, 1.0])


def test_l0_dense_and_sparse_agree_and_skip_zero_values() -> None:
    dense = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    assert l0(dense).item() == pytest.approx(1.5)
    sparse = SparseLatents(torch.tensor([[2.0, 1.0], [3.0, 0.0]]), torch.tensor([[2, 1], [0, 3]]), 4)
    assert torch.equal(sparse.to_dense(), dense)
    assert l0(sparse).item() == pytest.approx(1.5)
    assert fire_counts(sparse).tolist() == fire_counts(dense).tolist() == [1, 1, 1, 0]


def test_dead_mask_and_fraction() -> None:
    since = torch.tensor([0, 99, 100, 5000])
    assert dead_mask(since, 100).tolist() == [False, False, True, True]
    assert dead_fraction(torch.tensor([0, 3, 0, 1])) == pytest.approx(0.5)
    assert dead_fraction(~dead_mask(since, 100)) == pytest.approx(0.5)


def test_ce_loss_recovered_edges() -> None:
    assert ce_loss_recovered(2.0, 2.0, 5.0) == pytest.approx(1.0)
    assert ce_loss_recovered(2.0, 5.0, 5.0) == pytest.approx(0.0)
    assert ce_loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)


def test_cross_entropy_by_hand_and_mask() -> None:
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(token 2) = 3/6 at position 0
    ids = torch.tensor([[0, 2, 1]])
    per = token_cross_entropy(logits, ids)
    assert per[0].tolist() == pytest.approx([-math.log(0.5), math.log(4.0)])
    assert cross_entropy(logits, ids).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    mask = torch.tensor([[False, True, True]])  # the last position makes no prediction
    assert cross_entropy(logits, ids, mask).item() == pytest.approx(math.log(4.0))


def test_kl_identical_is_zero_and_by_hand() -> None:
    logits = torch.randn(2, 5, 7)
    assert kl_divergence(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    p = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # P = (1/2, 1/2) and (3/4, 1/4)
    q = torch.zeros(2, 1, 2)  # Q = (1/2, 1/2)
    expected_second = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl_divergence(p, q).item() == pytest.approx(expected_second / 2)
    assert kl_divergence(p, q, torch.tensor([[False], [True]])).item() == pytest.approx(expected_second)
    assert kl_divergence(q, p).item() != pytest.approx(kl_divergence(p, q).item())  # KL(clean || spliced)


def test_fvu_accumulator_pools_exactly_over_batches() -> None:
    torch.manual_seed(2)
    x = torch.randn(100, 6) * 3 + 5
    x_hat = x + torch.randn(100, 6) * torch.linspace(0.1, 1, 6)
    acc = FVUAccumulator()
    sizes = [7, 40, 1, 52]
    for part_x, part_hat in zip(x.split(sizes), x_hat.split(sizes), strict=True):
        acc.update(part_x, part_hat)
    assert acc.n == 100
    assert acc.fvu() == pytest.approx(fraction_of_variance_unexplained(x, x_hat).item(), rel=1e-6)
    assert acc.mse() == pytest.approx(mse(x, x_hat).item(), rel=1e-6)
    assert acc.per_slice_fvu([(0, 2), (2, 6)]) == pytest.approx(per_slice_fvu(x, x_hat, [(0, 2), (2, 6)]).tolist())
    assert acc.per_dimension_fvu() == pytest.approx(per_dimension_fvu(x, x_hat).item(), rel=1e-6)
    assert acc.per_slice_per_dimension_fvu([(0, 2), (2, 6)]) == pytest.approx(
        per_dimension_fvu(x, x_hat, [(0, 2), (2, 6)]).tolist(), rel=1e-6)


def test_fvu_accumulator_uses_the_mean_of_all_tokens() -> None:
    # Each batch alone has FVU 1 (errors 1+1 around its own mean 1 or 11); pooled, the mean is 6:
    # variance 36 + 16 + 16 + 36 = 104, error 4.
    acc = FVUAccumulator()
    acc.update(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]]))
    acc.update(torch.tensor([[10.0], [12.0]]), torch.tensor([[11.0], [11.0]]))
    assert acc.fvu() == pytest.approx(4 / 104)


def test_fvu_accumulator_without_data_says_so() -> None:
    with pytest.raises(ValueError, match="no tokens"):
        FVUAccumulator().fvu()


def test_latent_and_mean_accumulators() -> None:
    acc = LatentAccumulator(4)
    acc.update(SparseLatents(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]), 4))
    acc.update(torch.tensor([[0.0, 2.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert acc.l0() == pytest.approx(4 / 3)
    assert acc.counts.tolist() == [2, 1, 1, 0]
    assert acc.dead_fraction() == pytest.approx(0.25)
    mean = MeanAccumulator()
    mean.update(torch.tensor([1.0, 2.0]))
    mean.update(torch.tensor([6.0]))
    assert mean.mean() == pytest.approx(3.0)
