import pytest
import torch
from torch import nn

from saelab.saes import native
from saelab.training.constraints import grad_of, normalize_decoder, project_out_parallel_grad


def _param_with_grad(shape=(5, 3)):
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(*shape))
    param.grad = torch.randn(*shape)
    return param


def test_projection_removes_exactly_the_parallel_component_per_unit() -> None:
    w = _param_with_grad()
    g = w.grad.clone()
    project_out_parallel_grad([w], "per_unit")
    for row in range(5):
        d, gi = w[row].detach(), g[row]
        expected = gi - (gi @ d) / (d @ d) * d
        assert torch.allclose(w.grad[row], expected, atol=1e-6)
        assert abs(float(w.grad[row] @ d)) < 1e-5  # nothing left along the row
    # the perpendicular part is untouched: projecting twice changes nothing more
    once = w.grad.clone()
    project_out_parallel_grad([w], "per_unit")
    assert torch.allclose(w.grad, once, atol=1e-6)


def test_per_row_compatibility_works_along_the_other_axis() -> None:
    w = _param_with_grad()
    g = w.grad.clone()
    project_out_parallel_grad([w], "per_row")
    for col in range(3):
        d, gi = w[:, col].detach(), g[:, col]
        assert torch.allclose(w.grad[:, col], gi - (gi @ d) / (d @ d) * d, atol=1e-6)
    normalize_decoder([w], "per_row")
    assert torch.allclose(w.detach().norm(dim=0), torch.ones(3))


def test_normalize_makes_every_unit_direction_unit_norm() -> None:
    w = _param_with_grad()
    direction = w.detach()[0] / w.detach()[0].norm()
    normalize_decoder([w], "per_unit")
    assert torch.allclose(w.detach().norm(dim=1), torch.ones(5))
    assert torch.allclose(w.detach()[0], direction)


def test_views_of_parameters_are_constrained_through_the_view() -> None:
    # A deep SAE keeps nn.Linear weights [d_out, units_in] and hands out `.weight.T` ([units_in, d_out]).
    linear = nn.Linear(5, 3)
    linear.weight.grad = torch.randn(3, 5)
    view = linear.weight.T
    assert grad_of(view).shape == (5, 3) and torch.equal(grad_of(view), linear.weight.grad.T)
    expected = _project_rows(view.detach(), linear.weight.grad.T.clone())
    with torch.no_grad():
        project_out_parallel_grad([linear.weight.T], "per_unit")
        normalize_decoder([linear.weight.T], "per_unit")
    assert torch.allclose(linear.weight.grad.T, expected, atol=1e-6)
    assert torch.allclose(linear.weight.detach().norm(dim=0), torch.ones(5))  # each input unit's column


def _project_rows(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g - (g * w).sum(1, keepdim=True) / w.pow(2).sum(1, keepdim=True) * w


def test_matrix_without_gradient_is_skipped() -> None:
    w = nn.Parameter(torch.randn(2, 2))
    project_out_parallel_grad([w], "per_unit")
    assert w.grad is None
    assert grad_of(w) is None


@pytest.mark.parametrize("axis", ["per_unit", "per_row"])
def test_projected_step_keeps_norm_to_first_order(axis) -> None:
    w = _param_with_grad((6, 4))
    normalize_decoder([w], axis)
    project_out_parallel_grad([w], axis)
    dim = 1 if axis == "per_unit" else 0
    with torch.no_grad():
        moved = w - 1e-4 * w.grad
    assert torch.allclose(moved.norm(dim=dim), torch.ones(moved.shape[1 - dim]), atol=1e-6)  # unprojected: ~1e-4


@pytest.mark.skipif(native.library() is None, reason="no C compiler here: the native kernels cannot be built")
def test_native_rows_match_the_torch_formulas_and_ignore_the_thread_count() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(300, 77, generator=gen) * torch.rand(300, 1, generator=gen) * 3  # d not a multiple of 16
    w[5] = 0.0  # a zero row: projection leaves its gradient, normalisation leaves it zero
    g = torch.randn(300, 77, generator=gen)
    ww = (w * w).sum(1, keepdim=True).clamp_min(1e-30)
    want_g = g - (g * w).sum(1, keepdim=True) / ww * w
    want_w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            w_t, g_t = w.clone(), g.clone()
            native.project_rows(w_t, g_t)
            native.normalize_rows(w_t)
            results.append((w_t, g_t))
    finally:
        torch.set_num_threads(previous)
    (w1, g1), (w3, g3) = results
    assert torch.equal(w1, w3) and torch.equal(g1, g3)  # each row's sums in one fixed order
    assert torch.allclose(g1, want_g, atol=1e-5) and torch.allclose(w1, want_w, atol=1e-6)
    assert torch.equal(g1[5], g[5]) and torch.equal(w1[5], torch.zeros(77))
    assert (w1 * g1).sum(1).abs().max() < 1e-4  # nothing left along any row


def test_native_rows_mark_the_tensors_written() -> None:
    w = _param_with_grad((40, 20))
    before = (w._version, w.grad._version)
    project_out_parallel_grad([w], "per_unit")
    normalize_decoder([w], "per_unit")
    assert w._version > before[0] and w.grad._version > before[1]
