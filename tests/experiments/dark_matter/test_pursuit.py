"""Gradient pursuit: exact recovery on an orthonormal dictionary, monotone residuals, per-token budgets."""

from __future__ import annotations

import pytest
import torch

from saelab.experiments.dark_matter.pursuit import gradient_pursuit, sae_gradient_pursuit
from saelab.saes.topk import TopKSAE, TopKSAEConfig


def _planted(n_tokens: int, d: int, support: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An orthonormal dictionary (d atoms in d dims, shuffled) and non-negative codes with `support` atoms each,
    with distinct magnitudes so the order of selection is unambiguous."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    decoder = q.T.float()
    codes = torch.zeros(n_tokens, d)
    for t in range(n_tokens):
        idx = torch.randperm(d, generator=g)[:support]
        codes[t, idx] = torch.linspace(1.0, 3.0, support) + 0.1 * torch.rand(support, generator=g)
    b_dec = torch.randn(d, generator=g)
    return decoder, codes, b_dec


def test_recovers_planted_codes_on_orthonormal_dictionary() -> None:
    decoder, codes, b_dec = _planted(n_tokens=50, d=16, support=4, seed=0)
    x = codes @ decoder + b_dec
    result = gradient_pursuit(x, decoder, b_dec, torch.full((50,), 4))
    torch.testing.assert_close(result.codes.to_dense(), codes, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.reconstruction, x, atol=1e-5, rtol=0)
    assert result.residual_sq_norms[-1].max() < 1e-8


def test_residual_never_increases() -> None:
    # Orthonormal dictionary, with noise on the input so the residual stays positive throughout.
    decoder, codes, b_dec = _planted(n_tokens=64, d=24, support=6, seed=1)
    x = codes @ decoder + b_dec + 0.05 * torch.randn(64, 24, generator=torch.Generator().manual_seed(2))
    norms = gradient_pursuit(x, decoder, b_dec, torch.full((64,), 10)).residual_sq_norms
    assert norms.shape == (11, 64)
    steps = norms[1:] - norms[:-1]
    assert (steps <= 1e-6 * norms[:-1]).all()
    assert (norms[-1] < 0.05 * norms[0]).all()


def test_each_token_stops_at_its_own_budget() -> None:
    decoder, codes, b_dec = _planted(n_tokens=3, d=12, support=5, seed=3)
    x = codes @ decoder + b_dec
    budgets = torch.tensor([0, 2, 5])
    result = gradient_pursuit(x, decoder, b_dec, budgets)
    dense = result.codes.to_dense()
    assert (dense != 0).sum(-1).tolist() == [0, 2, 5]
    torch.testing.assert_close(result.reconstruction[0], b_dec)
    # The two largest planted latents are the ones a 2-step budget finds.
    top2 = torch.topk(codes[1], 2).indices
    torch.testing.assert_close(dense[1, top2], codes[1, top2], atol=1e-5, rtol=0)
    # Token 1's residual is frozen after its 2 steps while token 2 keeps improving.
    norms = result.residual_sq_norms
    assert torch.equal(norms[2:, 1], norms[2, 1].expand(4))
    assert norms[5, 2] < norms[2, 2]


def test_codes_have_distinct_indices_even_when_an_atom_is_reselected() -> None:
    # Two nearly parallel atoms make pursuit pick an atom already in the support; unused slots must not collide
    # with real ones, or scattering to dense would overwrite values.
    g = torch.Generator().manual_seed(4)
    decoder = torch.randn(6, 5, generator=g)
    decoder[1] = decoder[0] + 0.05 * torch.randn(5, generator=g)
    decoder /= decoder.norm(dim=1, keepdim=True)
    x = 2 * decoder[0] + decoder[1]
    result = gradient_pursuit(x[None].repeat(3, 1), decoder, torch.zeros(5), torch.full((3,), 5))
    indices = result.codes.indices
    assert all(len(set(row.tolist())) == indices.shape[1] for row in indices)
    dense = result.codes.to_dense()
    torch.testing.assert_close(dense @ decoder, result.reconstruction, atol=1e-5, rtol=0)


def test_sae_pursuit_uses_each_tokens_l0_and_returns_raw_space() -> None:
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=8, n_latents=32, k=3, preprocessing="scale", input_scale=2.0))
    x = torch.randn(20, 8)
    result = sae_gradient_pursuit(sae, x)
    encoded = sae.encode(sae.normalize(x)[0])
    assert ((result.codes.values != 0).sum(-1) <= (encoded.values != 0).sum(-1)).all()
    # Pursuit optimises the reconstruction directly, so on these tokens it is at least as good as the encoder.
    pursuit_err = (result.reconstruction - x).pow(2).sum()
    encoder_err = (sae.reconstruct(x) - x).pow(2).sum()
    assert pursuit_err <= encoder_err * 1.0001
    manual = result.codes.to_dense() @ sae.W_dec.detach() + sae.b_dec.detach()
    torch.testing.assert_close(result.reconstruction, manual / 2.0, atol=1e-5, rtol=1e-5)


def test_rejects_budgets_beyond_the_dictionary() -> None:
    with pytest.raises(ValueError, match="budgets"):
        gradient_pursuit(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(4), torch.tensor([1, 4]))
