"""Training an SAE on an in-memory tensor: shuffled batches, and runs that resume or are reused, never confused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from saelab.errors import CheckpointError, DataError
from saelab.saes.spec import SAESpec
from saelab.training.config import TrainerConfig
from saelab.training.entry import tensor_batches, train_on_tensor


def test_batches_visit_every_row_once_per_epoch_in_a_seeded_order() -> None:
    x = torch.arange(12, dtype=torch.float16)[:, None].expand(12, 3)
    stream = tensor_batches(x, batch_size=5, seed=1)
    epoch = [next(stream) for _ in range(2)]  # 12 rows: two full batches, the last 2 rows dropped
    rows = torch.cat(epoch)[:, 0]
    assert all(b.dtype == torch.float32 and b.shape == (5, 3) for b in epoch)
    assert rows.unique().numel() == 10
    next_epoch = torch.cat([next(stream) for _ in range(2)])[:, 0]
    assert not torch.equal(next_epoch, rows)  # reshuffled
    again = tensor_batches(x, batch_size=5, seed=1)
    assert torch.equal(torch.cat([next(again) for _ in range(2)])[:, 0], rows)
    with pytest.raises(DataError, match="batch_size=20"):
        next(tensor_batches(x, batch_size=20))


def _planted(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1)
    idx = torch.rand(n, 24, generator=g).argsort(dim=1)[:, :3]
    return torch.zeros(n, 24).scatter_(1, idx, 1 + torch.rand(n, 3, generator=g)) @ atoms * 5


def test_trains_then_reuses_the_finished_run_and_refuses_other_data(tmp_path: Path) -> None:
    x = _planted(2_048, seed=0).half()
    spec = SAESpec(n_latents=32, k=3)
    trainer = TrainerConfig(total_tokens=4_096, batch_size=256, lr=3e-3, warmup_steps=2, log_every_steps=4,
                            checkpoint_every_steps=None, progress=False)
    sae, result = train_on_tensor(spec, x, trainer, tmp_path / "run")
    log = result.records
    assert sae.n_latents == 32 and sae.cfg.k == 3
    assert sae.cfg.input_scale == pytest.approx(math.sqrt(16) / x.float().norm(dim=1).mean().item(), rel=1e-4)
    assert log[-1]["tokens"] == 4_096 and log[-1]["fvu"] < log[0]["fvu"]

    weights = tmp_path / "run" / "sae" / sae.weights_file
    stamp = weights.stat().st_mtime_ns
    again, again_result = train_on_tensor(spec, x, trainer, tmp_path / "run")
    log_again = again_result.records
    assert weights.stat().st_mtime_ns == stamp and log_again == log
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value)

    with pytest.raises(CheckpointError, match="another request"):
        train_on_tensor(spec, _planted(2_048, seed=1).half(), trainer, tmp_path / "run")
    with pytest.raises(CheckpointError, match="another request"):
        train_on_tensor(spec.replace(n_latents=48), x, trainer, tmp_path / "run")
