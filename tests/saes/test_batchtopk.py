"""BatchTopK: exact batch-wide selection on the sparse path, its inference threshold, training, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import ConfigError
from saelab.metrics import fraction_of_variance_unexplained, l0
from saelab.saes import BatchTopKSAE, create_sae, load_sae, to_dense
from saelab.saes.base import BatchShare, TrainingContext


def _sae(d: int = 8, n: int = 32, k: int = 2, dtype: torch.dtype = torch.float64, seed: int = 0) -> BatchTopKSAE:
    torch.manual_seed(seed)
    sae = create_sae("batchtopk", d_in=d, n_latents=n, k=k).to(dtype)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def dense_batch_topk(sae: BatchTopKSAE, x: torch.Tensor) -> torch.Tensor:
    """The definition: ReLU pre-activations of the whole batch, keep its k·B largest entries."""
    z = torch.relu(F.linear(x - sae.b_dec, sae.W_enc, sae.b_enc))
    flat = z.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(sae.k * x.shape[0]).indices] = True
    return (flat * keep).reshape(z.shape)


@pytest.mark.parametrize("dominant", [False, True])
def test_training_selection_equals_the_dense_definition(dominant: bool) -> None:
    sae = _sae(k=2)
    x = torch.randn(16, 8, dtype=torch.float64)
    if dominant:  # one token holds far more than 4k of the batch's 32 largest: the candidate count must grow
        x[3] = sae.W_enc[:20].sum(0) * 50
    out = sae(x)
    want = dense_batch_topk(sae, x)
    torch.testing.assert_close(to_dense(out.latents), want)
    torch.testing.assert_close(out.x_hat, want @ sae.W_dec + sae.b_dec)
    assert l0(out.latents).item() == pytest.approx(2.0)  # k on average over the batch
    if dominant:
        assert int((want[3] > 0).sum()) > 4 * sae.k


def test_gradcheck_through_the_sparse_path() -> None:
    # the selection is piecewise constant, so away from its boundaries the map is smooth: check it numerically
    sae = _sae(d=6, n=12, k=2)
    x = torch.randn(5, 6, dtype=torch.float64)
    names = ("W_enc", "b_enc", "W_dec", "b_dec")

    def x_hat(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(sae, dict(zip(names, values, strict=True)), (x,)).x_hat

    torch.autograd.gradcheck(x_hat, tuple(getattr(sae, n).detach().clone().requires_grad_() for n in names))


def test_autograd_through_the_sparse_path_matches_the_dense_definition() -> None:
    sae = _sae(d=6, n=12, k=2)
    x = torch.randn(7, 6, dtype=torch.float64)
    ref = _sae(d=6, n=12, k=2)
    ours_loss = sae(x).x_hat.pow(2).sum()
    ours_loss.backward()
    mask = dense_batch_topk(ref, x) > 0
    z = torch.relu(F.linear(x - ref.b_dec, ref.W_enc, ref.b_enc)) * mask
    (z @ ref.W_dec + ref.b_dec).pow(2).sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref, name).grad, msg=name)


def test_trains_and_its_threshold_gives_about_k_latents_on_held_out_tokens(fit, planted, tmp_path) -> None:
    torch.manual_seed(0)
    # 150 steps: a running average that forgets within the run (the default 0.999 suits runs of thousands)
    sae = create_sae("batchtopk", d_in=16, n_latents=64, k=3, threshold_beta=0.9)
    result = fit(sae, planted(150, 128), tmp_path)
    assert result.completed and not sae.training  # eval mode after training: the threshold decides
    held_out = torch.cat(planted(4, 128, seed=0, sample_seed=1))
    with torch.no_grad():
        out = sae(held_out)
        fvu = fraction_of_variance_unexplained(held_out, out.x_hat).item()
    assert fvu < 0.25, fvu
    assert l0(out.latents).item() == pytest.approx(3.0, rel=0.10)
    assert sae.threshold > 0
    loaded = load_sae(tmp_path / "sae")
    assert isinstance(loaded, BatchTopKSAE) and not loaded.training
    assert torch.equal(loaded.threshold, sae.threshold)
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out).x_hat, out.x_hat)


def test_as_jumprelu_computes_the_inference(planted, tmp_path) -> None:
    sae = _sae(d=8, n=32, k=2, dtype=torch.float32)
    sae(torch.randn(64, 8))  # one training-mode batch sets the threshold
    sae.eval()
    x = torch.randn(20, 8)
    jump = sae.as_jumprelu()
    with torch.no_grad():
        torch.testing.assert_close(jump(x).x_hat, sae(x).x_hat)
        torch.testing.assert_close(to_dense(jump(x).latents), to_dense(sae(x).latents))


def test_refuses_what_it_cannot_do() -> None:
    untrained = _sae().eval()
    with pytest.raises(ConfigError, match="no inference threshold"):
        untrained(torch.randn(3, 8, dtype=torch.float64))
    sae = _sae()
    x = torch.randn(4, 8, dtype=torch.float64)
    share = BatchShare(n_tokens=8, x_sq_dev=torch.tensor(1.0), sq_dev=lambda t: t.sum())
    with pytest.raises(ConfigError, match="data-parallel"):
        sae.training_loss(x, sae(x), TrainingContext(share=share), lambda: torch.zeros(32, dtype=torch.bool))
    with pytest.raises(ConfigError, match="threshold_beta"):
        create_sae("batchtopk", d_in=8, n_latents=32, k=2, threshold_beta=1.0)


def test_exports_to_saelens_as_jumprelu_and_round_trips(tmp_path) -> None:
    from saelab.saes import formats

    sae = _sae(d=8, n=32, k=2, dtype=torch.float32)
    sae(torch.randn(64, 8))
    sae.eval()
    formats.write(sae, tmp_path / "saelens", to="saelens")
    back = formats.load_any(tmp_path / "saelens")
    assert back.architecture == "jumprelu"
    x = torch.randn(20, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, atol=1e-5, rtol=1e-5)
    formats.write(sae, tmp_path / "own", to="saelab")  # saelab's own folder keeps it a BatchTopK
    assert isinstance(formats.load_any(tmp_path / "own"), BatchTopKSAE)


def test_two_identical_runs_give_identical_weights_at_two_threads(fit, planted, tmp_path) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for name in ("a", "b"):
            torch.manual_seed(0)
            sae = create_sae("batchtopk", d_in=16, n_latents=64, k=3)
            fit(sae, planted(20, 128), tmp_path / name)
            runs.append(sae.state_dict())
    finally:
        torch.set_num_threads(previous)
    for name, value in runs[0].items():
        assert torch.equal(runs[1][name], value), name
