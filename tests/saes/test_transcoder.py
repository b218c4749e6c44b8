"""TopKTranscoder against its formula computed directly, its gradients, its two scales and persistence (sparsify's
parity is in tests/saes/formats; training is in tests/training/test_entry_transcoder.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import ConfigError
from saelab.saes import TopKSAE, TopKSAEConfig, load_sae
from saelab.saes.base import TrainingContext
from saelab.saes.initialization import seeded
from saelab.saes.kernels import topk_encode_dense
from saelab.saes.latents import to_dense
from saelab.saes.spec import SAESpec, Target, sae_from_spec
from saelab.saes.transcoder import TopKTranscoder, TopKTranscoderConfig


def _tc(d: int = 5, n: int = 9, k: int = 2, dtype: torch.dtype = torch.float32, **fields) -> TopKTranscoder:
    with seeded(0):
        tc = TopKTranscoder(TopKTranscoderConfig(d_in=d, n_latents=n, k=k, **fields)).to(dtype)
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
    return tc


@pytest.mark.parametrize("transcode, skip, d_out", [(True, True, 5), (True, False, 5), (False, True, 5),
                                                     (True, True, 3), (True, False, 7)])
def test_forward_is_the_formula(transcode: bool, skip: bool, d_out: int) -> None:
    tc = _tc(transcode=transcode, skip_connection=skip, d_out=d_out)
    x = torch.randn(7, 5)
    pre = torch.relu((x if transcode else x - tc.b_dec) @ tc.W_enc.T + tc.b_enc)
    top = pre.topk(2, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    want = z @ tc.W_dec + tc.b_dec + (x @ tc.W_skip.T if skip else 0)
    out = tc(x)
    torch.testing.assert_close(to_dense(out.latents), z)
    torch.testing.assert_close(out.x_hat, want)
    assert out.x_hat.shape == (7, d_out) and tc.d_out == d_out
    assert (tc.W_skip is not None) == skip
    if skip:
        assert tc.W_skip.shape == (d_out, 5)


@pytest.mark.parametrize("skip", [False, True])
def test_gradcheck_through_the_sparse_path(skip: bool) -> None:
    tc = _tc(d=6, n=12, k=2, dtype=torch.float64, d_out=4, skip_connection=skip)
    x = torch.randn(5, 6, dtype=torch.float64)
    names = ("W_enc", "b_enc", "W_dec", "b_dec", *(("W_skip",) if skip else ()))

    def x_hat(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(tc, dict(zip(names, values, strict=True)), (x,)).x_hat

    torch.autograd.gradcheck(x_hat, tuple(getattr(tc, n).detach().clone().requires_grad_() for n in names))


def test_autograd_matches_the_dense_reference() -> None:
    tc = _tc(d=6, n=12, k=3, dtype=torch.float64, d_out=4, skip_connection=True)
    ref = _tc(d=6, n=12, k=3, dtype=torch.float64, d_out=4, skip_connection=True)
    ref.load_state_dict(tc.state_dict())
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    (tc(x).x_hat - y).pow(2).sum().backward()
    z = topk_encode_dense(x, ref.W_enc, ref.b_enc, 3, pre_bias=None)
    (z @ ref.W_dec + ref.b_dec + F.linear(x, ref.W_skip) - y).pow(2).sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
        torch.testing.assert_close(getattr(tc, name).grad, getattr(ref, name).grad, msg=name)


def test_input_and_target_have_their_own_scales() -> None:
    tc = _tc(d=5, d_out=3, preprocessing="scale", input_scale=2.0, target_scale=0.25)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    torch.testing.assert_close(tc.normalize(x)[0], 2.0 * x)
    torch.testing.assert_close(tc.normalize_target(y), 0.25 * y)
    torch.testing.assert_close(tc.reconstruct(x), tc(2.0 * x).x_hat / 0.25)


def test_training_loss_compares_the_output_with_the_target() -> None:
    tc = _tc(d=5, d_out=3)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    out = tc(x)
    terms = tc.training_loss(x, out, TrainingContext(target=y), lambda: torch.zeros(9, dtype=torch.bool))
    want = (out.x_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    torch.testing.assert_close(terms["recon"].value, want)


def test_an_autoencoder_refuses_a_target() -> None:
    sae = TopKSAE(TopKSAEConfig(d_in=5, n_latents=9, k=2))
    with pytest.raises(ConfigError, match="takes no separate target.*--target-hookpoint"):
        sae.normalize_target(torch.randn(2, 5))


def test_pair_init_starts_b_dec_at_the_target_mean_and_centres_the_pre_activations() -> None:
    tc = _tc(d=5, d_out=3)
    x, y = torch.randn(64, 5) + 2, torch.randn(64, 3) - 1
    tc.initialize_from_pair(x, y)
    torch.testing.assert_close(tc.b_dec, y.mean(0))
    torch.testing.assert_close((x @ tc.W_enc.T + tc.b_enc).mean(0), torch.zeros(9), atol=1e-5, rtol=0)


def test_save_and_load_round_trip(tmp_path) -> None:
    tc = _tc(d=5, d_out=3, skip_connection=True, preprocessing="scale", input_scale=1.5, target_scale=0.5,
             hookpoint="mlp_in.1", target_hookpoint="mlp_out.1")
    tc.save(tmp_path)
    back = load_sae(tmp_path)
    assert isinstance(back, TopKTranscoder) and back.cfg == tc.cfg
    x = torch.randn(6, 5)
    torch.testing.assert_close(back.reconstruct(x), tc.reconstruct(x))


def test_spec_with_a_target_builds_a_transcoder_and_refuses_other_architectures() -> None:
    tc = sae_from_spec(SAESpec(n_latents=16, k=2, skip_connection=True), 5, 2.0, "mlp_in.0",
                       target=Target("mlp_out.0", 3, 0.5))
    assert isinstance(tc, TopKTranscoder) and tc.cfg.skip_connection and tc.d_out == 3
    assert (tc.cfg.input_scale, tc.cfg.target_scale, tc.cfg.target_hookpoint) == (2.0, 0.5, "mlp_out.0")
    with pytest.raises(ConfigError, match="transcoder, which is top-k"):
        sae_from_spec(SAESpec(architecture="relu"), 5, 1.0, target=Target("mlp_out.0", 3))
    with pytest.raises(ConfigError, match="sae.skip_connection does not apply"):
        sae_from_spec(SAESpec(skip_connection=True), 5, 1.0)


def test_token_l2_and_a_wider_bypass_are_refused() -> None:
    with pytest.raises(ConfigError, match="token_l2"):
        TopKTranscoderConfig(d_in=5, n_latents=9, k=2, preprocessing="token_l2").validate()
    with pytest.raises(ConfigError, match="d_out == d_in"):
        TopKTranscoderConfig(d_in=5, n_latents=9, k=2, transcode=False, d_out=3).validate()
