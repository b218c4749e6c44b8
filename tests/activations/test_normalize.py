import math

import numpy as np
import pytest
import torch

from saelab.activations.normalize import NormStats, estimate_norm_stats
from saelab.errors import DataError


def test_scale_gives_mean_norm_sqrt_d_and_mean_vector() -> None:
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # norms 5 and 1
    stats = estimate_norm_stats(x)
    assert stats.mean_norm == pytest.approx(3.0)
    assert stats.scale == pytest.approx(2.0 / 3.0)
    assert torch.equal(stats.mean, torch.tensor([1.5, 2.0, 0.0, 0.5]))
    assert stats.apply(x).norm(dim=1).mean().item() == pytest.approx(math.sqrt(4))


def test_chunked_float16_matches_one_pass() -> None:
    x = (torch.randn(1000, 8) * 30).half().numpy()
    chunked, whole = estimate_norm_stats(x, chunk_rows=64), estimate_norm_stats(x, chunk_rows=10_000)
    assert chunked.scale == pytest.approx(whole.scale, rel=1e-12)
    assert torch.allclose(chunked.mean, torch.from_numpy(x.astype(np.float64).mean(0)).float())


def test_round_trip_and_inverse() -> None:
    stats = estimate_norm_stats(torch.randn(50, 3) + 2)
    again = NormStats.from_dict(stats.to_dict())
    assert again.scale == stats.scale and again.n_tokens == 50 and torch.equal(again.mean, stats.mean)
    x = torch.randn(4, 3)
    assert torch.allclose(stats.invert(stats.apply(x)), x)


@pytest.mark.parametrize("x", [torch.zeros(0, 3), torch.zeros(5, 3)])
def test_unusable_activations(x) -> None:
    with pytest.raises(DataError):
        estimate_norm_stats(x)
