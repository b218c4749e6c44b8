"""bf16-exact selection: the same positive latents as the fp32 path on random and real activations, values within
the fp32 rounding bound, uncertifiable tokens (ties, near-ties) recomputed in fp32, and training that follows
the fp32 run. bf16 is forced on machines without fast bf16 (the same result, slower)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saelab.activations.store import ActivationStore
from saelab.saes import certified, create_sae
from saelab.saes.kernels import topk_encode
from saelab.training.config import TrainerConfig
from saelab.training.trainer import Trainer


def _active(values: torch.Tensor, indices: torch.Tensor) -> list[set[int]]:
    return [set(row[v > 0].tolist()) for v, row in zip(values, indices, strict=True)]


def _dense(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(values.shape[0], n).scatter(1, indices, values)


def _both(x, weight, bias, k):
    """(fp32 selection, bf16-exact selection, certified fraction) through the public top-k entry point."""
    with torch.no_grad():
        ref = topk_encode(x, weight, bias, k)
        with certified.selection_precision("bf16-exact", force=True), certified.counted() as selection:
            got = topk_encode(x, weight, bias, k)
    assert selection.tokens == x.shape[0]
    return ref, got, selection.certified / selection.tokens


def _check_equal(ref, got, x, weight, bias):
    assert _active(*ref) == _active(*got)
    # values: fp32 dot products in another order, within the fp32 rounding bound 2·(d + 1)·2^-24·Σ|x_i w_i| + |b|
    scale = x.abs() @ weight.abs().t() + bias.abs()
    bound = 2 * (x.shape[1] + 1) * certified.FP32_UNIT * scale
    diff = (_dense(*ref, weight.shape[0]) - _dense(*got, weight.shape[0])).abs()
    assert (diff <= bound).all()


@pytest.mark.parametrize("k", [4, 32])
def test_random_activations_select_the_fp32_latents(topk_path, k):
    torch.manual_seed(0)
    x = torch.randn(700, 64) * torch.rand(700, 1) * 5
    weight, bias = torch.randn(1024, 64) / 8, torch.randn(1024) / 10
    ref, got, fraction = _both(x, weight, bias, k)
    _check_equal(ref, got, x, weight, bias)
    assert fraction > 0.5


def test_real_activations_select_the_fp32_latents(saved_tiny_llama, tmp_path: Path):
    from saelab.cli import main

    model_dir, corpus = saved_tiny_llama()
    assert main(["harvest", "--model", str(model_dir), "--hookpoints", "resid_post.1", "--data.source", str(corpus),
                 "--data.context-length", "16", "--data.n-tokens", "800", "--out-dir", str(tmp_path / "store")]) == 0
    x = ActivationStore(tmp_path / "store").load("resid_post.1", normalize=True)
    torch.manual_seed(3)
    sae = create_sae("topk", d_in=x.shape[1], n_latents=256, k=8)
    sae.initialize_from_batch(x)
    xc = x - sae.b_dec.detach()
    ref, got, fraction = _both(xc, sae.W_enc.detach(), sae.b_enc.detach(), sae.k)
    _check_equal(ref, got, xc, sae.W_enc.detach(), sae.b_enc.detach())
    assert fraction > 0.5


def test_ties_and_near_ties_fall_back_to_fp32():
    """Latents 0 and 1 share an encoder row (an exact tie for every token), latent 2 is latent 3 nudged by one part
    in 10^7 (a near-tie no bf16 score can order): tokens whose k-th place falls on them cannot be certified, and
    the fp32 recomputation gives the fp32 path's choice."""
    torch.manual_seed(1)
    d, n, k = 32, 64, 3
    weight = torch.randn(n, d)
    weight[1] = weight[0]
    weight[3] = weight[2] * (1 + 1e-7)
    bias = torch.zeros(n)
    x = torch.randn(400, d)
    scores = x @ weight.t()
    kth = scores.topk(k, dim=1).indices
    ambiguous = ((kth == 0) | (kth == 1) | (kth == 2) | (kth == 3)).any(dim=1)
    assert ambiguous.sum() > 10
    ref, got, fraction = _both(x, weight, bias, k)
    assert _active(*ref) == _active(*got)
    assert fraction <= 1 - ambiguous.float().mean().item() + 0.05
    assert fraction < 1


def test_only_positive_latents_are_compared():
    """Fewer than k positive pre-activations: the positive ones are certified, the zeros (clamped) carry nothing."""
    torch.manual_seed(2)
    x = torch.randn(50, 16)
    weight, bias = torch.randn(128, 16), torch.full((128,), -9.0)
    ref, got, fraction = _both(x, weight, bias, 8)
    assert _active(*ref) == _active(*got)
    assert sum(len(a) < 8 for a in _active(*ref)) > 40
    assert fraction > 0.5


def test_without_fast_bf16_the_fp32_path_runs(monkeypatch):
    monkeypatch.setattr(certified, "bf16_gemm_available", lambda device: False)
    monkeypatch.delenv(certified.FORCE_ENV, raising=False)
    x, weight, bias = torch.randn(20, 8), torch.randn(32, 8), torch.zeros(32)
    with certified.selection_precision("bf16-exact"), certified.counted() as selection:
        got = topk_encode(x, weight, bias, 4)
    assert selection.tokens == 0  # nothing ran on the bf16 path
    assert torch.equal(got.values, topk_encode(x, weight, bias, 4).values)
    with pytest.raises(ValueError, match="bf16-exact"), certified.selection_precision("bf16"):
        pass


def test_training_follows_the_fp32_run(tmp_path: Path, monkeypatch):
    """Same latents at every step; the weights differ from the fp32 run's only by fp32 rounding."""
    torch.manual_seed(4)
    data = [torch.randn(256, 32) for _ in range(6)]

    def run(precision: str, folder: str):
        torch.manual_seed(0)
        sae = create_sae("topk", d_in=32, n_latents=256, k=8)
        cfg = TrainerConfig(total_tokens=6 * 256, batch_size=256, progress=False, log_every_steps=1,
                            checkpoint_every_steps=None, lr=1e-3, precision=precision)
        Trainer(sae, cfg, tmp_path / folder).fit(data)
        return sae, (tmp_path / folder / "metrics.jsonl").read_text()

    fp32, _ = run("fp32", "fp32")
    monkeypatch.setenv(certified.FORCE_ENV, "1")
    exact, metrics = run("bf16-exact", "bf16")
    assert "certified_fraction" in metrics
    for a, b in zip(fp32.parameters(), exact.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_runs_recorded_before_the_precision_setting_still_resume(tmp_path: Path):
    """A run folder whose config predates `precision` is the fp32 request, not another one."""
    import json

    from saelab.training.entry import train

    data = [torch.randn(64, 8) for _ in range(2)]
    cfg = TrainerConfig(total_tokens=128, batch_size=64, progress=False, checkpoint_every_steps=None)
    torch.manual_seed(0)
    train(create_sae("topk", d_in=8, n_latents=32, k=2), data, cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "precision" not in saved["trainer"]
    train(create_sae("topk", d_in=8, n_latents=32, k=2), data, cfg, tmp_path / "run")  # the finished run, reused
    with pytest.raises(Exception, match="another request"):
        train(create_sae("topk", d_in=8, n_latents=32, k=2), data,
              TrainerConfig(total_tokens=128, batch_size=64, progress=False, precision="bf16-exact"), tmp_path / "run")
