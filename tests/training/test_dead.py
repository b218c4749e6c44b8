import pytest
import torch

from saelab.training.dead import DeadLatentTracker, resample_latents


def test_dead_is_counted_in_tokens_not_steps() -> None:
    tracker = DeadLatentTracker(3, window_tokens=100)
    fires_0 = torch.tensor([1, 0, 0])
    for _ in range(3):
        tracker.update(fires_0, n_tokens=30)  # 90 tokens without latents 1, 2
    assert tracker.dead_mask().tolist() == [False, False, False]
    tracker.update(torch.tensor([0, 0, 5]), n_tokens=10)  # 100 tokens for latent 1; latent 2 fires
    assert tracker.tokens_since_fired.tolist() == [10, 100, 0]
    assert tracker.dead_mask().tolist() == [False, True, False]
    assert tracker.dead_fraction() == pytest.approx(1 / 3)
    # the same token count in bigger batches gives the same verdict
    big = DeadLatentTracker(3, window_tokens=100)
    big.update(fires_0, n_tokens=90)
    big.update(torch.tensor([0, 0, 5]), n_tokens=10)
    assert torch.equal(big.tokens_since_fired, tracker.tokens_since_fired)
    tracker.revive(tracker.dead_mask())
    assert tracker.dead_fraction() == 0.0


def test_resampling_reinitialises_dead_latents_and_resets_their_moments(tiny_topk) -> None:
    sae = tiny_topk(d_in=6, n_latents=10, k=2)
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    x = torch.randn(20, 6)
    x_hat, _ = sae(x)
    (x_hat - x).pow(2).sum().backward()
    with torch.no_grad():
        sae.b_enc.add_(0.5)  # nonzero biases so zeroing is visible
    opt.step()
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[3, 7]] = True
    assert resample_latents(sae, dead, opt, torch.Generator().manual_seed(0)) == 2
    alive = ~dead
    for name in ("W_enc", "W_dec", "b_enc"):
        param = getattr(sae, name)
        assert torch.equal(param[alive], before[name][alive]), name
        assert not torch.equal(param[dead], before[name][dead]), name
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[param][key]
            assert torch.equal(state[dead], torch.zeros_like(state[dead])), (name, key)
            assert state[alive].abs().sum() > 0
    assert torch.equal(sae.b_enc[dead], torch.zeros(2))
    assert torch.equal(sae.b_dec, before["b_dec"])
    # revived encoder rows start at the live latents' scale
    live_norm = before["W_enc"][alive].norm(dim=1).mean()
    assert torch.allclose(sae.W_enc[dead].norm(dim=1), live_norm.expand(2), rtol=1e-5)
    assert resample_latents(sae, torch.zeros(10, dtype=torch.bool), opt, torch.Generator()) == 0


def test_resampled_latents_fire_again(tiny_topk) -> None:
    sae = tiny_topk(d_in=6, n_latents=10, k=3)
    with torch.no_grad():
        sae.b_enc[4] = -1e3  # latent 4 can never be selected
    x = torch.randn(200, 6)
    assert sae.encode(x).indices.eq(4).sum() == 0
    dead = torch.zeros(10, dtype=torch.bool)
    dead[4] = True
    resample_latents(sae, dead, torch.optim.Adam(sae.parameters()), torch.Generator().manual_seed(0))
    assert sae.encode(x).indices.eq(4).sum() > 0
