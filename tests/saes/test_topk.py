from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes import SparseLatents, TopKSAE, TopKSAEConfig, load_sae, to_dense
from saelab.saes.kernels import topk_encode_dense


def _sae(d: int = 8, n: int = 32, k: int = 4, **fields) -> TopKSAE:
    return TopKSAE(TopKSAEConfig(d_in=d, n_latents=n, k=k, **fields))


@pytest.mark.parametrize("k", [0, 33])
def test_k_out_of_range_is_a_config_error(k: int) -> None:
    with pytest.raises(ConfigError, match=f"k={k}"):
        _sae(k=k)


def test_k_out_of_range_in_a_saved_config_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="exceeds n_latents"):
        TopKSAEConfig.from_dict({"d_in": 4, "n_latents": 8, "k": 9})


def test_init_decoder_is_normalised_copy_of_encoder_and_b_dec_zero() -> None:
    sae = _sae()
    torch.testing.assert_close(sae.W_dec, sae.W_enc / sae.W_enc.norm(dim=1, keepdim=True))
    assert not sae.b_dec.any() and not sae.b_enc.any()
    assert sae.decoder_matrices()[0] is sae.W_dec


def test_forward_matches_definition_with_leading_dims() -> None:
    sae = _sae()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(3, 5, 8)
    x_hat, latents = sae(x)
    assert isinstance(latents, SparseLatents) and latents.values.shape == (3, 5, 4)
    z = topk_encode_dense(x, sae.W_enc, sae.b_enc, 4, pre_bias=sae.b_dec)
    torch.testing.assert_close(to_dense(latents), z)
    torch.testing.assert_close(x_hat, z @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(sae.decode(z), x_hat)  # dense latents decode to the same point


def test_auxk_latents_come_only_from_dead_latents_and_train_their_encoder() -> None:
    sae = _sae()
    x = torch.randn(10, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 7, 8, 20, 31]] = True
    aux = sae.auxk_latents(x, dead, 3)
    assert aux.values.shape == (10, 3) and dead[aux.indices].all()
    masked = topk_encode_dense(x, sae.W_enc, sae.b_enc - 1e4 * (~dead), 3, pre_bias=sae.b_dec)
    torch.testing.assert_close(to_dense(aux), masked)
    aux.values.sum().backward()
    assert not sae.W_enc.grad[~dead].any() and sae.W_enc.grad[dead].any()


def test_auxk_with_more_requested_than_dead() -> None:
    dead = torch.zeros(32, dtype=torch.bool)
    dead[5] = True
    aux = _sae().auxk_latents(torch.randn(4, 8), dead, 3)
    assert aux.indices.shape == (4, 1) and (aux.indices == 5).all()


def test_geometric_median_init_sets_b_dec() -> None:
    sae = _sae(d=3)
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [50.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    sae.init_b_dec_geometric_median(x)
    torch.testing.assert_close(sae.b_dec.detach(), torch.tensor([2.0, 0.0, 0.0]))


def test_sizes() -> None:
    sae = _sae(d=8, n=32, k=4)
    assert sae.flops_per_token() == 2 * 8 * 32 + 2 * 4 * 8
    assert sae.num_parameters() == 2 * 32 * 8 + 32 + 8
    assert sae.latent_parameters() == {"W_enc": 0, "b_enc": 0, "W_dec": 0}


def test_save_load_round_trip(tmp_path) -> None:
    sae = _sae(preprocessing="token_l2", hookpoint="resid_post.3")
    with torch.no_grad():
        sae.b_dec.normal_()
    sae.save(tmp_path)
    loaded = load_sae(tmp_path, preprocessing="token_l2")
    assert isinstance(loaded, TopKSAE) and loaded.cfg == sae.cfg
    x = torch.randn(6, 8)
    torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x))
