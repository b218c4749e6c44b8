"""Matryoshka: the loss over nested prefixes, the smallest prefix learning to reconstruct alone, persistence."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.metrics import fraction_of_variance_unexplained
from saelab.saes import MatryoshkaSAE, SparseLatents, create_sae, load_sae
from saelab.saes.base import TrainingContext
from saelab.saes.losses import reconstruction_loss


def test_loss_is_the_mean_over_prefixes_of_each_prefix_reconstruction() -> None:
    torch.manual_seed(0)
    sae = create_sae("matryoshka", d_in=8, n_latents=32, k=3, prefixes=[4, 16], batch_topk=False).double()
    x = torch.randn(12, 8, dtype=torch.float64)
    out = sae(x)
    terms = sae.training_loss(x, out, TrainingContext(), lambda: None)
    assert set(terms) == {"recon", "recon_prefix_4", "recon_prefix_16"}
    dense = torch.zeros(12, 32, dtype=torch.float64).scatter(1, out.latents.indices, out.latents.values)
    for size, name in ((4, "recon_prefix_4"), (16, "recon_prefix_16"), (32, "recon")):
        x_hat = dense[:, :size] @ sae.W_dec[:size] + sae.b_dec  # by hand: only the first `size` latents
        torch.testing.assert_close(terms[name].value, reconstruction_loss(x, x_hat, "fvu"))
        assert terms[name].weight == pytest.approx(1 / 3)
    torch.testing.assert_close(terms["recon"].value, reconstruction_loss(x, out.x_hat, "fvu"))


def test_smallest_prefix_reconstructs_better_than_a_plain_topk_slice(fit, planted, tmp_path) -> None:
    data = planted(120, 128)
    held_out = torch.cat(planted(4, 128, seed=0, sample_seed=1))
    fvus = {}
    for name, arch, extra in (("matryoshka", "matryoshka", {"prefixes": [8], "batch_topk": False}),
                              ("topk", "topk", {})):
        torch.manual_seed(0)
        sae = create_sae(arch, d_in=16, n_latents=64, k=3, **extra)
        fit(sae, data, tmp_path / name)
        with torch.no_grad():
            latents = sae.encode(held_out)
            values = latents.values * (latents.indices < 8)
            x_hat = MatryoshkaSAE.decode_prefix(sae, SparseLatents(values, latents.indices, 64), 8) \
                if name == "matryoshka" else (torch.zeros(len(held_out), 64).scatter(1, latents.indices, values)
                                              @ sae.W_dec + sae.b_dec)
            fvus[name] = fraction_of_variance_unexplained(held_out, x_hat).item()
            fvus[name + "_full"] = fraction_of_variance_unexplained(held_out, sae(held_out).x_hat).item()
    assert fvus["matryoshka"] < fvus["topk"] - 0.1, fvus
    assert fvus["matryoshka_full"] < 0.35, fvus  # the whole dictionary still reconstructs


def test_batch_topk_flavour_trains_saves_and_exports(fit, planted, tmp_path) -> None:
    torch.manual_seed(0)
    sae = create_sae("matryoshka", d_in=16, n_latents=64, k=3, prefixes=[16], threshold_beta=0.9)
    result = fit(sae, planted(60, 128), tmp_path / "run")
    assert "recon_prefix_16" in result.final
    loaded = load_sae(tmp_path / "run" / "sae")
    assert isinstance(loaded, MatryoshkaSAE) and loaded.cfg.prefixes == [16]
    x = torch.cat(planted(1, 64, seed=0, sample_seed=2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
        torch.testing.assert_close(sae.as_jumprelu()(x).x_hat, sae(x).x_hat)


def test_bad_prefixes_are_refused() -> None:
    for prefixes in ([], [8, 4], [0], [64, 128]):
        with pytest.raises(ConfigError, match="prefixes"):
            create_sae("matryoshka", d_in=8, n_latents=64, k=2, prefixes=prefixes)
    plain = create_sae("matryoshka", d_in=8, n_latents=64, k=2, prefixes=[8], batch_topk=False)
    with pytest.raises(ConfigError, match="no JumpReLU form"):
        plain.as_jumprelu()
