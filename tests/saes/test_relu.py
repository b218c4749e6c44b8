from __future__ import annotations

import pytest
import torch

from saelab.saes import ReluSAE, ReluSAEConfig, load_sae


def _sae(tied: bool = False) -> ReluSAE:
    sae = ReluSAE(ReluSAEConfig(d_in=6, n_latents=24, tied=tied))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    return sae


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_definition(tied: bool) -> None:
    sae = _sae(tied)
    x = torch.randn(2, 5, 6)
    x_hat, z = sae(x)
    expected_z = torch.relu((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    decoder = sae.W_enc if tied else sae.W_dec
    torch.testing.assert_close(z, expected_z)
    torch.testing.assert_close(x_hat, expected_z @ decoder + sae.b_dec)


def test_tied_has_one_matrix_used_both_ways() -> None:
    sae = _sae(tied=True)
    assert sae.W_dec is None and "W_dec" not in sae.state_dict()
    assert sae.decoder_weight is sae.W_enc and sae.decoder_matrices() == [sae.W_enc]
    torch.testing.assert_close(sae.W_enc.norm(dim=1), torch.ones(24))  # initialised as unit-norm atoms
    assert sae.latent_parameters() == {"W_enc": 0, "b_enc": 0}
    assert sae.num_parameters() == 24 * 6 + 24 + 6


def test_decoder_norms_are_differentiable_row_norms() -> None:
    sae = _sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1, 25, dtype=torch.float32)[:, None])
    norms = sae.decoder_norms()
    torch.testing.assert_close(norms, torch.arange(1, 25, dtype=torch.float32))
    norms.sum().backward()
    assert sae.W_dec.grad is not None


def test_flops() -> None:
    assert _sae().flops_per_token() == 4 * 6 * 24


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied: bool) -> None:
    sae = _sae(tied)
    sae.save(tmp_path)
    loaded = load_sae(tmp_path)
    assert isinstance(loaded, ReluSAE) and loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
