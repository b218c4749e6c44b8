import pytest
import torch

from saelab.metrics import fraction_of_variance_unexplained
from saelab.saes.base import SparseLatents
from saelab.saes.losses import activation_decay_penalty, auxk_loss, l1_penalty, reconstruction_loss


def test_reconstruction_loss_kinds() -> None:
    x, x_hat = torch.randn(6, 4), torch.randn(6, 4)
    assert reconstruction_loss(x, x_hat, "fvu") == fraction_of_variance_unexplained(x, x_hat)
    assert reconstruction_loss(x, x_hat, "mse").item() == pytest.approx((x - x_hat).pow(2).mean().item())


def test_l1_weights_by_decoder_norm_and_sparse_equals_dense() -> None:
    sparse = SparseLatents(torch.tensor([[2.0, 1.0], [3.0, 0.0]]), torch.tensor([[2, 1], [0, 3]]), 4)
    norms = torch.tensor([1.0, 2.0, 0.5, 4.0])
    # token 0: 2*0.5 + 1*2 = 3; token 1: 3*1 = 3
    assert l1_penalty(sparse, norms).item() == pytest.approx(3.0)
    assert l1_penalty(sparse.to_dense(), norms).item() == pytest.approx(3.0)


def test_activation_decay_is_mean_square_over_batch_and_latents() -> None:
    sparse = SparseLatents(torch.tensor([[2.0, 1.0], [3.0, 0.0]]), torch.tensor([[2, 1], [0, 3]]), 4)
    assert activation_decay_penalty(sparse, 4).item() == pytest.approx((4 + 1 + 9) / 8)
    assert activation_decay_penalty(sparse.to_dense(), 4).item() == pytest.approx((4 + 1 + 9) / 8)


def test_auxk_fits_the_residual_without_adding_b_dec_again(tiny_topk) -> None:
    sae = tiny_topk(d_in=8, n_latents=16, k=2)
    with torch.no_grad():
        sae.b_dec.fill_(100.0)  # huge: a loss that decoded b_dec a second time would be dominated by it
    x = torch.randn(32, 8) + 100.0
    x_hat, _ = sae(x)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:10] = True
    loss = auxk_loss(sae, x, x_hat, dead, k_aux=4)
    loss.backward()
    got = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    aux = sae.auxk_latents(x, dead, 4)
    residual = (x - x_hat).detach()
    expected = fraction_of_variance_unexplained(residual, aux.to_dense() @ sae.W_dec)  # no b_dec
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, p in sae.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-6), name
    assert set(aux.indices.unique().tolist()) <= set(range(10))
    assert got["W_enc"][:10].abs().sum() > 0 and got["W_enc"][10:].abs().sum() == 0  # only dead latents learn


def test_auxk_without_dead_latents_is_zero_and_skips_the_encoder() -> None:
    class Probe:
        def auxk_latents(self, x, dead, k):
            raise AssertionError("must not be called without dead latents")

    x = torch.randn(4, 3)
    assert auxk_loss(Probe(), x, x, torch.zeros(5, dtype=torch.bool), 2).item() == 0.0


def test_auxk_scales_down_when_fewer_dead_than_k_aux(tiny_topk) -> None:
    sae = tiny_topk(d_in=8, n_latents=16, k=2)
    x = torch.randn(32, 8)
    x_hat, _ = sae(x)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:3] = True
    scaled = auxk_loss(sae, x, x_hat, dead, k_aux=6)  # 3 dead of k_aux 6: scale 1/2, k reduced to 3
    unscaled = auxk_loss(sae, x, x_hat, dead, k_aux=3)
    assert scaled.item() == pytest.approx(0.5 * unscaled.item(), rel=1e-6)
