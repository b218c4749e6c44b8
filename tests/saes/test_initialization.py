from __future__ import annotations

import torch

from saelab.saes.initialization import geometric_median, init_dictionary


def test_geometric_median_of_collinear_points_is_their_middle_point() -> None:
    """On a line the geometric median is the 1-D median (here a data point), far from the mean."""
    g = torch.Generator().manual_seed(0)
    origin, direction = torch.randn(5, generator=g), torch.randn(5, generator=g)
    points = torch.stack([origin + t * direction for t in (0.0, 1.0, 2.0, 3.0, 100.0)])
    torch.testing.assert_close(geometric_median(points), origin + 2.0 * direction)


def test_geometric_median_of_symmetric_set_is_its_centre() -> None:
    centre = torch.tensor([1.0, -2.0])
    offsets = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0], [2.0, 2.0], [-2.0, -2.0]])
    torch.testing.assert_close(geometric_median(centre + offsets), centre)


def test_geometric_median_satisfies_optimality_and_resists_outliers() -> None:
    g = torch.Generator().manual_seed(1)
    points = torch.randn(300, 4, generator=g, dtype=torch.float64)
    points[:5] += 1000.0
    median = geometric_median(points, iters=500)
    unit = (median - points) / (median - points).norm(dim=1, keepdim=True)
    assert unit.sum(0).norm() < 1e-3  # the gradient of Σ||p - y|| vanishes at the minimum
    assert median.norm() < 0.5 < points.mean(0).norm()


def test_init_dictionary_untied_and_tied() -> None:
    w_enc, w_dec = torch.empty(50, 16), torch.empty(50, 16)
    init_dictionary(w_enc, w_dec)
    assert w_enc.abs().max() <= 1 / 16**0.5
    torch.testing.assert_close(w_dec, w_enc / w_enc.norm(dim=1, keepdim=True))
    tied = torch.empty(50, 16)
    init_dictionary(tied, None)
    torch.testing.assert_close(tied.norm(dim=1), torch.ones(50))
