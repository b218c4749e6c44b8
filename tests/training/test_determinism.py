"""Two identical training runs in one process give bit-identical weights, at two threads (the default thread count
on a 2-core machine; the suite itself runs single-threaded), when the SAE is built under `seeded(cfg.seed)`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from saelab.saes import MultiLayerSAE, MultiLayerSAEConfig, SparseAutoencoder, TopKSAE, TopKSAEConfig, native, seeded
from saelab.training.config import TrainerConfig
from saelab.training.trainer import Trainer


@pytest.fixture
def two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def structured_batches(d: int, batch: int, steps: int, seed: int = 0) -> list[Tensor]:
    """Sums of 4 of 256 random unit directions with log-normal magnitudes, plus an offset and noise: popular
    directions make popular latents, where accumulation order matters."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(256, d, generator=gen), dim=1)
    offset = torch.randn(d, generator=gen)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, 256, (batch, 4), generator=gen)
        mags = torch.exp(0.5 * torch.randn(batch, 4, generator=gen))
        x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=mags, mode="sum")
        out.append(x + offset + 0.05 * torch.randn(batch, d, generator=gen))
    return out


def train(build: Callable[[], SparseAutoencoder], cfg: TrainerConfig, batches: list[Tensor], out: Path
          ) -> tuple[str, list[float]]:
    """(sha256 of the saved weights, every step's loss) of one run, the SAE built under `seeded(cfg.seed)`."""
    torch.rand(17)  # whatever the global generator did before must not matter
    with seeded(cfg.seed):
        sae = build()
    result = Trainer(sae, cfg, out).fit(batches)
    return hashlib.sha256((result.sae_dir / sae.weights_file).read_bytes()).hexdigest(), result.curves["loss"]


def assert_identical_runs(build: Callable[[], SparseAutoencoder], cfg: TrainerConfig, batches: list[Tensor],
                          tmp_path: Path) -> None:
    first = train(build, cfg, batches, tmp_path / "first")
    second = train(build, cfg, batches, tmp_path / "second")
    differs = next((step for step, (a, b) in enumerate(zip(first[1], second[1], strict=True), 1) if a != b), None)
    assert differs is None, f"the logged loss first differs at step {differs}"
    assert first[0] == second[0], "the final weights differ"


def config(steps: int, batch: int, **fields) -> TrainerConfig:
    """Batches of 2,048 tokens x k = 32 selections: above the size (32,768) from which torch's CPU indexing backward
    runs on several threads, so a per-latent sum left to it would vary."""
    return TrainerConfig(total_tokens=steps * batch, batch_size=batch, warmup_steps=2, log_every_steps=1,
                         checkpoint_every_steps=None, progress=False, seed=3, **fields)


@pytest.mark.parametrize("use_native", [True, False])
def test_topk_runs_are_bitwise_identical(two_threads, monkeypatch, tmp_path, use_native: bool) -> None:
    if use_native and native.library() is None:
        pytest.skip("no C compiler here: the native top-k kernel cannot be built")
    if not use_native:
        monkeypatch.setattr(native, "library", lambda: None)
    d, steps, batch = 32, 3, 2048
    # AuxK on from the start (a short dead window) and the L1 term: every per-latent accumulation of the step runs.
    cfg = config(steps, batch, auxk_coefficient=1 / 32, k_aux=32, dead_window_tokens=batch, l1_coefficient=1e-3)
    assert_identical_runs(lambda: TopKSAE(TopKSAEConfig(d_in=d, n_latents=512, k=32)), cfg,
                          structured_batches(d, batch, steps), tmp_path)


def test_multilayer_runs_with_post_activation_bias_are_bitwise_identical(two_threads, tmp_path) -> None:
    d, steps, batch = 32, 3, 2048

    def build() -> MultiLayerSAE:
        return MultiLayerSAE(MultiLayerSAEConfig(
            d_in=d, n_latents=512, k=32, layers=[0, 1], hookpoints=["resid_post.0", "resid_post.1"],
            slice_widths=[16, 16], layer_scales=[1.0, 1.0], post_act_bias=True))

    assert_identical_runs(build, config(steps, batch, resample_every_steps=2, dead_window_tokens=batch),
                          structured_batches(d, batch, steps, seed=1), tmp_path)
