"""The deep-SAE recipe's mechanics in the one trainer: unit-norm decoders with gradient projection on every decoder
matrix, masked Adam, activation decay, dead-latent resampling (deep and shallow)."""

from __future__ import annotations

import pytest
import torch

from saelab.saes import DeepSAE, DeepSAEConfig, SparseAutoencoder, TopKSAE, TopKSAEConfig
from saelab.training.config import DEEP_SAE_RECIPE, TrainerConfig
from saelab.training.constraints import project_out_parallel_grad
from saelab.training.dead import resample_latents
from saelab.training.optim import MaskedAdam
from saelab.training.trainer import Trainer


def _deep(multiples=(2.0,), d: int = 8, n: int = 48, k: int = 3, **fields) -> DeepSAE:
    return DeepSAE(DeepSAEConfig(d_in=d, n_latents=n, k=k, encoder_multiples=list(multiples), **fields))


def _cfg(n_batches: int, batch_size: int, **kw) -> TrainerConfig:
    recipe = {**DEEP_SAE_RECIPE, "dead_window_tokens": 10**6, "resample_every_steps": None, "lr": 1e-2}
    base = {"total_tokens": n_batches * batch_size, "batch_size": batch_size, "progress": False,
            "log_every_steps": 1, "checkpoint_every_steps": None}
    return TrainerConfig(**{**recipe, **base, **kw})


def _batches(n: int, size: int, d: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(size, d, generator=gen) * 2 + 1 for _ in range(n)]


@pytest.mark.parametrize(("axis", "dim"), [("per_unit", 1), ("per_row", 0)])
def test_every_decoder_matrix_stays_unit_norm_after_steps(tmp_path, axis, dim) -> None:
    sae = _deep(multiples=(2.0, 1.5))
    with torch.no_grad():
        for weight in sae.W_dec:
            weight.mul_(3.0)  # the trainer must restore the constraint from the first step on
    before = [w.detach().clone() for w in sae.W_dec]
    Trainer(sae, _cfg(5, 32, decoder_norm_axis=axis), tmp_path).fit(_batches(5, 32))
    for weight, start in zip(sae.decoder_matrices(), before, strict=True):
        assert not torch.allclose(weight, start / start.norm(dim=dim, keepdim=True))  # it did train
        torch.testing.assert_close(weight.norm(dim=dim), torch.ones(weight.shape[1 - dim]))


def test_gradient_projection_removes_exactly_the_parallel_component_of_every_decoder() -> None:
    sae = _deep(multiples=(2.0, 1.5)).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    x_hat, _ = sae(x)
    (x_hat - x).pow(2).sum().backward()
    raw = [w.grad.clone() for w in sae.W_dec]
    project_out_parallel_grad(sae.decoder_matrices(), "per_unit")
    for weight, g in zip(sae.W_dec, raw, strict=True):
        w = weight.detach()
        expected = g - (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
        torch.testing.assert_close(weight.grad, expected)
        assert (weight.grad * w).sum(1).abs().max() < 1e-10  # nothing left along any unit's direction
        assert (g * w).sum(1).abs().max() > 1e-3  # there was something to remove
    for weight in sae.W_enc:  # encoders are not constrained
        assert weight.grad is not None


def test_masked_adam_leaves_unselected_latents_untouched() -> None:
    sae = _deep(n=64, k=2)
    opt = MaskedAdam(sae.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for step in range(3):
        x = torch.randn(6, 8) * 2
        x_hat, latents = sae(x)
        opt.zero_grad()
        ((x_hat - x).pow(2).mean() + latents.values.pow(2).mean()).backward()
        idle = torch.ones(64, dtype=torch.bool)
        idle[latents.indices.reshape(-1)] = False
        sparse_params = {"W_enc.1": sae.W_enc[1], "b_enc.1": sae.b_enc[1], "W_dec.0": sae.W_dec[0]}
        before = {name: p.detach().clone() for name, p in sparse_params.items()}
        moments = {name: {key: value.clone() for key, value in opt.state[p].items() if key != "step"}
                   for name, p in sparse_params.items() if opt.state[p]}
        opt.step()
        assert idle.sum() >= 64 - 12
        for name, p in sparse_params.items():
            assert not p.grad[idle].any(), name
            assert torch.equal(p.detach()[idle], before[name][idle]), name  # idle latents: value untouched
            assert not torch.equal(p.detach()[~idle], before[name][~idle]), name  # selected ones moved
            for key, value in moments.get(name, {}).items():
                assert torch.equal(opt.state[p][key][idle], value[idle]), (step, name, key)


def test_activation_decay_adds_exactly_its_term(tmp_path) -> None:
    sae = _deep(multiples=(2.0,), preprocessing="token_l2")
    batch = _batches(1, 32)[0]
    with torch.no_grad():
        x_n, _ = sae.normalize(batch)
        x_hat, latents = sae(x_n)
        dense = latents.to_dense()
        expected_decay = dense.pow(2).mean().item()  # mean over batch × latents, unselected latents = 0
        expected_mse = (x_hat - x_n).pow(2).mean().item()
    result = Trainer(sae, _cfg(1, 32, activation_decay=0.25), tmp_path).fit([batch])
    assert result.final["activation_decay"] == pytest.approx(expected_decay, rel=1e-5)
    assert result.final["recon"] == pytest.approx(expected_mse, rel=1e-5)
    assert result.final["loss"] == pytest.approx(expected_mse + 0.25 * expected_decay, rel=1e-5)


DEAD = torch.tensor([5, 9, 20, 33, 40])


def _shallow_topk() -> TopKSAE:
    return TopKSAE(TopKSAEConfig(d_in=8, n_latents=48, k=3))


@pytest.mark.parametrize(
    ("make", "min_firing"),
    [(lambda: _deep(multiples=()), 5), (lambda: _deep(multiples=(2.0, 1.5)), 1), (_shallow_topk, 5)],
    ids=["deep-0", "deep-2", "topk"],
)
def test_resampling_revives_dead_latents_and_resets_their_moments(tmp_path, make, min_firing) -> None:
    sae: SparseAutoencoder = make()
    params = dict(sae.named_parameters())
    bias_name = next(name for name in sae.latent_parameters() if params[name].ndim == 1)
    with torch.no_grad():
        params[bias_name][DEAD] = -1e3  # these latents can never be selected
    data = _batches(6, 32)
    assert not torch.isin(sae.encode(data[0]).indices, DEAD).any()
    trainer = Trainer(sae, _cfg(4, 32, dead_window_tokens=64, resample_every_steps=2), tmp_path)
    trainer.fit(data[:2])  # 64 tokens: they are dead and resampled at step 2
    for name in sae.latent_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            state = trainer.optimizer.state[params[name]][key]
            assert not state[DEAD].any(), (name, key)
            assert state.any(), (name, key)  # the live latents keep theirs
    assert not params[bias_name][DEAD].any()  # bias zeroed
    assert not trainer.tracker.tokens_since_fired[DEAD].any()  # a fresh window
    fired = torch.cat([sae.encode(sae.normalize(x)[0]).indices.reshape(-1) for x in data])
    # A fresh random row competes again. Behind a ReLU layer (inputs >= 0) about half of them point away from the
    # data and stay silent until the next resampling, so there only some must fire.
    assert torch.isin(DEAD, fired).sum() >= min_firing


def test_resampling_leaves_live_latents_and_other_parameters_alone() -> None:
    sae = _deep(multiples=(2.0,))
    opt = MaskedAdam(sae.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    x = torch.randn(40, 8)
    x_hat, _ = sae(x)
    (x_hat - x).pow(2).sum().backward()
    opt.step()
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    dead = torch.zeros(48, dtype=torch.bool)
    dead[[0, 17]] = True
    assert resample_latents(sae, dead, opt, torch.Generator().manual_seed(0)) == 2
    for name, p in sae.named_parameters():
        if name in sae.latent_parameters():
            assert torch.equal(p[~dead], before[name][~dead]) and not torch.equal(p[dead], before[name][dead])
        else:
            assert torch.equal(p, before[name]), name  # dense layers and the output bias are not touched


def test_deep_sae_resumes_exactly(tmp_path) -> None:
    data = _batches(6, 32)
    cfg = _cfg(6, 32, dead_window_tokens=64, resample_every_steps=2, checkpoint_every_steps=3)

    def make(seed: int) -> DeepSAE:
        torch.manual_seed(seed)
        return _deep(multiples=(2.0, 1.5), preprocessing="token_l2")

    whole = make(0)
    Trainer(whole, cfg, tmp_path / "whole").fit(data)
    Trainer(make(0), cfg, tmp_path / "split").fit(data[:3])
    resumed = make(1)
    trainer = Trainer(resumed, cfg, tmp_path / "split")
    assert trainer.restore()
    trainer.fit(data)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
