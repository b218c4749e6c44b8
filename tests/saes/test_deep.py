"""The deep SAE: architecture, init, fast path against the plain definition, shallow = TopKSAE, bad configs, I/O."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import ConfigError
from saelab.saes import DeepSAE, DeepSAEConfig, SparseLatents, TopKSAE, TopKSAEConfig, create_sae, load_sae
from saelab.saes.kernels import topk_encode_dense
from saelab.training.config import TrainerConfig
from saelab.training.trainer import Trainer


def _deep(d: int = 8, n: int = 40, k: int = 4, multiples: tuple[float, ...] = (2.0, 1.5), **fields) -> DeepSAE:
    return DeepSAE(DeepSAEConfig(d_in=d, n_latents=n, k=k, encoder_multiples=list(multiples), **fields))


def _randomise_biases(sae: DeepSAE) -> None:
    with torch.no_grad():
        for bias in [*sae.b_enc, *sae.b_dec]:
            bias.normal_(0.0, 0.1)


def _reference_forward(sae: DeepSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain definition with dense tensors only: Linear→ReLU layers, ReLU→top-k, dense decode."""
    h = x
    for weight, bias in zip(sae.W_enc[:-1], sae.b_enc[:-1], strict=True):
        h = torch.relu(F.linear(h, weight, bias))
    z = topk_encode_dense(h, sae.W_enc[-1], sae.b_enc[-1], sae.k)
    h = z
    for i, (weight, bias) in enumerate(zip(sae.W_dec, sae.b_dec, strict=True)):
        h = F.linear(h, weight.T, bias)
        if i < len(sae.W_dec) - 1:
            h = torch.relu(h)
    return h, z


def test_layers_mirror_the_encoder_widths() -> None:
    sae = _deep(d=8, n=40, multiples=(2.0, 1.5))
    assert [tuple(w.shape) for w in sae.W_enc] == [(16, 8), (12, 16), (40, 12)]
    assert [tuple(w.shape) for w in sae.decoder_matrices()] == [(40, 12), (12, 16), (16, 8)]  # [units_in, d_out]
    assert [b.numel() for b in sae.b_enc] == [16, 12, 40] and [b.numel() for b in sae.b_dec] == [12, 16, 8]
    assert sae.latent_parameters() == {"W_enc.2": 0, "b_enc.2": 0, "W_dec.0": 0}
    params = dict(sae.named_parameters())
    assert all(params[name].shape[dim] == 40 for name, dim in sae.latent_parameters().items())


@pytest.mark.parametrize("multiples", [(), (2.0,), (2.0, 1.5)])
def test_fast_path_forward_and_gradients_match_the_dense_definition(multiples) -> None:
    sae = _deep(multiples=multiples).double()
    _randomise_biases(sae)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    x_hat, latents = sae(x)
    ref_hat, ref_z = _reference_forward(sae, x)
    assert isinstance(latents, SparseLatents) and latents.values.shape == (3, 5, 4)
    torch.testing.assert_close(latents.to_dense(), ref_z)
    torch.testing.assert_close(x_hat, ref_hat)
    torch.testing.assert_close(sae.decode(ref_z), ref_hat)  # dense latents decode to the same point

    target = torch.randn_like(x)
    loss = (x_hat - target).pow(2).sum() + latents.values.pow(2).sum()
    fast = torch.autograd.grad(loss, list(sae.parameters()))
    ref_loss = (ref_hat - target).pow(2).sum() + ref_z.pow(2).sum()
    reference = torch.autograd.grad(ref_loss, list(sae.parameters()))
    for (name, _), got, want in zip(sae.named_parameters(), fast, reference, strict=True):
        torch.testing.assert_close(got, want, msg=name)


def test_bfloat16_autocast_keeps_the_reconstruction_and_float32_gradients() -> None:
    torch.manual_seed(0)
    sae = _deep(d=16, n=64, k=4)
    _randomise_biases(sae)
    x = torch.randn(32, 16)
    x_hat, latents = sae(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_hat, low_latents = sae(x)
        loss = (low_hat.float() - x).pow(2).mean()
    error = (low_hat.float() - x_hat).norm() / x_hat.norm()
    assert 0 < error < 0.1  # the matmuls ran in bf16 (not bit-identical) and stayed close
    assert (low_latents.to_dense() != 0).sum() >= 0.9 * (latents.to_dense() != 0).sum()
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_tied_init_makes_every_decoder_its_mirror_encoders_transpose() -> None:
    sae = _deep(d=16, n=64, multiples=(2.0, 3.0))
    for decoder, encoder in zip(sae.W_dec, reversed(sae.W_enc), strict=True):
        # As maps: decoder weight (nn.Linear layout, [d_out, units_in]) = encoder weight transposed, each unit's
        # column scaled to unit norm.
        as_linear = decoder.T
        torch.testing.assert_close(as_linear * encoder.norm(dim=1), encoder.T)
        torch.testing.assert_close(decoder.norm(dim=1), torch.ones(decoder.shape[0]))
    assert not any(b.any() for b in [*sae.b_enc, *sae.b_dec])


def test_untied_init_is_independent_but_still_unit_norm() -> None:
    sae = _deep(d=16, n=64, multiples=(2.0,), tied_init=False)
    for decoder, encoder in zip(sae.W_dec, reversed(sae.W_enc), strict=True):
        cosine = F.cosine_similarity(decoder, encoder, dim=1).abs().mean()
        assert cosine < 0.5  # a tied copy would have cosine 1
        torch.testing.assert_close(decoder.norm(dim=1), torch.ones(decoder.shape[0]))


def test_encoder_init_is_kaiming_normal() -> None:
    sae = _deep(d=64, n=512, k=8, multiples=(4.0,))
    for weight in sae.W_enc:
        fan_in = weight.shape[1]
        assert weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05)
        assert abs(weight.mean().item()) < 0.05 * weight.std().item()


def test_shallow_deep_sae_is_numerically_the_topk_sae(tmp_path) -> None:
    """No dense layers + the shallow convention: same weights -> same forward, same gradients, and the same
    training run (b_dec at the first batch's mean, masked Adam, activation decay, clipping, resampling, unit norm)."""
    topk = TopKSAE(TopKSAEConfig(d_in=8, n_latents=32, k=3, preprocessing="token_l2"))
    deep = _deep(d=8, n=32, k=3, multiples=(), pre_encoder_bias=True, preprocessing="token_l2")
    with torch.no_grad():
        topk.b_enc.normal_(0.0, 0.1)
        for mine, theirs in zip(deep.parameters(), topk.parameters(), strict=True):
            mine.copy_(theirs)
    assert deep.num_parameters() == topk.num_parameters() and deep.flops_per_token() == topk.flops_per_token()

    x = torch.randn(16, 8)
    for sae in (topk, deep):
        sae.zero_grad()
        x_hat, latents = sae(x)
        ((x_hat - x).pow(2).sum() + latents.values.sum()).backward()
    torch.testing.assert_close(deep(x).x_hat, topk(x).x_hat, rtol=0, atol=0)
    for mine, theirs in zip(deep.parameters(), topk.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=0)

    initial = [p.detach().clone() for p in deep.parameters()]
    batches = [torch.randn(32, 8) * 3 + 1 for _ in range(6)]
    cfg = TrainerConfig(total_tokens=6 * 32, batch_size=32, lr=1e-2, warmup_steps=0, loss="mse",
                        activation_decay=1e-3, optimizer="masked_adam", dead_window_tokens=64,
                        resample_every_steps=2, progress=False, checkpoint_every_steps=None, log_every_steps=1)
    resampled = Trainer(topk, cfg, tmp_path / "topk").fit(batches).curves["resampled"]
    assert Trainer(deep, cfg, tmp_path / "deep").fit(batches).curves["resampled"] == resampled and sum(resampled) > 0
    for (name, mine), theirs, before in zip(deep.named_parameters(), topk.parameters(), initial, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=name)
        assert not torch.equal(mine, before), name


def test_geometric_median_init_only_under_the_shallow_convention() -> None:
    x = torch.randn(50, 8) + 3.0
    own_biases = _deep(multiples=())
    own_biases.init_b_dec_geometric_median(x)
    assert not own_biases.output_bias.any()
    convention = _deep(multiples=(2.0,), pre_encoder_bias=True)
    convention.init_b_dec_geometric_median(x)
    assert convention.output_bias.norm() > 1.0
    # and with dense layers the output bias is subtracted from the input before the first Linear
    z_shifted = convention.encode(x + convention.output_bias.detach()).to_dense()
    without = _deep(multiples=(2.0,))
    without.load_state_dict(convention.state_dict())
    torch.testing.assert_close(z_shifted, without.encode(x).to_dense())


def test_sizes_are_counted_honestly() -> None:
    d, n, k = 8, 40, 4
    sae = _deep(d=d, n=n, k=k, multiples=(2.0,))
    h = 2 * d
    assert sae.num_parameters() == (d * h + h) + (h * n + n) + (n * h + h) + (h * d + d)
    assert sae.flops_per_token() == 2 * d * h + 2 * h * n + 2 * k * h + 2 * h * d


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"encoder_multiples": [0.0]}, r"encoder_multiples\[0\]=0.0 gives 0 units"),
        ({"encoder_multiples": [2.0, -1.0]}, r"encoder_multiples\[1\]=-1.0"),
        ({"encoder_multiples": [1.3]}, r"gives 10.4 units for d_in=8"),
        ({"encoder_multiples": [float("nan")]}, "positive whole number"),
        ({"k": 41}, "exceeds n_latents=40"),
        ({"k": 0}, "must be positive"),
    ],
)
def test_bad_configs_are_clear_errors(fields, message) -> None:
    with pytest.raises(ConfigError, match=message):
        DeepSAEConfig.from_dict({"d_in": 8, "n_latents": 40, "k": 4, **fields})


def test_fractional_multiples_that_give_whole_units_are_fine() -> None:
    sae = create_sae("deep", d_in=30, n_latents=20, k=2, encoder_multiples=[0.1, 2.5])
    assert [w.shape[0] for w in sae.W_enc] == [3, 75, 20]


def test_save_load_round_trip_and_preprocessing_mismatch(tmp_path) -> None:
    sae = _deep(preprocessing="token_l2", hookpoint="resid_post.3")
    _randomise_biases(sae)
    sae.save(tmp_path)
    loaded = load_sae(tmp_path, preprocessing="token_l2")
    assert isinstance(loaded, DeepSAE) and loaded.cfg == sae.cfg
    x = torch.randn(6, 8) * 4 + 2
    torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x))
    with pytest.raises(ConfigError, match="trained with preprocessing='token_l2' but 'none' was requested"):
        load_sae(tmp_path, preprocessing="none")
