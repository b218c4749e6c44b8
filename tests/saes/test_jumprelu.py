"""JumpReLU: the forward, the straight-through pseudo-derivatives against a hand computation, training to a
target L0, persistence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import ConfigError
from saelab.metrics import fraction_of_variance_unexplained, l0
from saelab.saes import JumpReLUSAE, create_sae, load_sae
from saelab.saes.base import TrainingContext
from saelab.saes.jumprelu import jumprelu, step


def test_forward_is_the_definition() -> None:
    torch.manual_seed(0)
    sae = create_sae("jumprelu", d_in=8, n_latents=16, initial_threshold=0.3).double()
    with torch.no_grad():
        sae.threshold[:4] = -1.0  # a negative threshold acts as 0
    x = torch.randn(10, 8, dtype=torch.float64)
    pre = F.linear(x, sae.W_enc, sae.b_enc)
    want = torch.relu(pre) * (pre > sae.threshold.clamp_min(0))
    out = sae(x)
    torch.testing.assert_close(out.latents, want)
    torch.testing.assert_close(out.x_hat, want @ sae.W_dec + sae.b_dec)


def test_pseudo_derivatives_match_a_hand_computation() -> None:
    eps = 0.2
    pre = torch.tensor([[0.45, 0.95, 0.2], [0.55, 1.5, -0.3]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.5, 1.0, 0.1], dtype=torch.float64, requires_grad=True)
    out = jumprelu(pre, theta, eps)
    assert out.tolist() == [[0.0, 0.0, 0.2], [0.55, 1.5, 0.0]]
    grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    out.backward(grad)
    # d/dpre = H(pre − θ); d/dθ = −(θ/ε) Σ_tokens g · 1{|pre − θ| < ε/2}
    assert pre.grad.tolist() == [[0.0, 0.0, 3.0], [4.0, 5.0, 0.0]]
    # latent 0: both tokens in the window (|−0.05|, |0.05| < 0.1): −(0.5/0.2)(1 + 4); latent 1: token 0 only
    # (|−0.05|), −(1/0.2)·2; latent 2: |0.1| and |−0.4| are not < 0.1
    torch.testing.assert_close(theta.grad, torch.tensor([-12.5, -10.0, 0.0], dtype=torch.float64))
    pre.grad, theta.grad = None, None
    gates = step(pre, theta, eps)
    assert gates.tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    gates.sum().backward()
    assert pre.grad is None  # the L0 penalty moves only the thresholds
    torch.testing.assert_close(theta.grad, torch.tensor([-10.0, -5.0, 0.0], dtype=torch.float64))


def test_gradcheck_in_the_weights_away_from_the_jump() -> None:
    torch.manual_seed(1)
    sae = create_sae("jumprelu", d_in=6, n_latents=8, initial_threshold=0.2, bandwidth=1e-9).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    names = ("W_enc", "b_enc", "W_dec", "b_dec")

    def x_hat(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(sae, dict(zip(names, values, strict=True)), (x,)).x_hat

    torch.autograd.gradcheck(x_hat, tuple(getattr(sae, n).detach().clone().requires_grad_() for n in names))


def test_trains_to_a_target_l0(fit, planted, tmp_path) -> None:
    torch.manual_seed(0)
    sae = create_sae("jumprelu", d_in=16, n_latents=64, initial_threshold=0.1, bandwidth=0.1, target_l0=3.0)
    result = fit(sae, planted(200, 128), tmp_path)
    assert "l0_target" in result.final and result.completed
    held_out = torch.cat(planted(4, 128, seed=0, sample_seed=1))
    with torch.no_grad():
        out = sae(held_out)
    fvu = fraction_of_variance_unexplained(held_out, out.x_hat).item()
    assert fvu < 0.3, fvu
    assert l0(out.latents).item() == pytest.approx(3.0, rel=0.25)
    loaded = load_sae(tmp_path / "sae")
    assert isinstance(loaded, JumpReLUSAE) and loaded.cfg.target_l0 == 3.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out).x_hat, out.x_hat)


def test_l0_coefficient_trades_sparsity_for_reconstruction(fit, planted, tmp_path) -> None:
    l0s = []
    for coefficient in (1e-4, 3e-2):
        torch.manual_seed(0)
        sae = create_sae("jumprelu", d_in=16, n_latents=64, initial_threshold=0.1, bandwidth=0.1,
                         l0_coefficient=coefficient)
        result = fit(sae, planted(60, 128), tmp_path / str(coefficient))
        l0s.append(result.final["l0"])
    assert l0s[1] < l0s[0]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="bandwidth"):
        create_sae("jumprelu", d_in=4, n_latents=8, bandwidth=0.0)
    with pytest.raises(ConfigError, match="target_l0"):
        create_sae("jumprelu", d_in=4, n_latents=8, target_l0=9.0)
    sae = create_sae("jumprelu", d_in=4, n_latents=8, target_l0=2.0)
    terms = sae.training_loss(torch.randn(3, 4), sae(torch.randn(3, 4)), TrainingContext(), lambda: None)
    assert set(terms) == {"recon", "l0_target"}
