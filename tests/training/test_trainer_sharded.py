"""The trainer on a latent-sharded top-k SAE (2 gloo processes) against the same run unsharded."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from saelab.errors import ConfigError
from saelab.saes.base import load_sae
from saelab.saes.sharded import ShardedTopKSAE
from saelab.saes.topk import TopKSAE, TopKSAEConfig
from saelab.training.checkpoint import latest_checkpoint
from saelab.training.config import TrainerConfig
from saelab.training.entry import tensor_batches
from saelab.training.logger import read_records
from saelab.training.trainer import Trainer

D, N, K, BATCH, STEPS = 16, 64, 4, 32, 6


def _cfg(**kw: object) -> TrainerConfig:
    # A short dead window and AuxK, so the dead-latent path runs; a small clip norm, so clipping is active.
    fields = dict(
        total_tokens=STEPS * BATCH, batch_size=BATCH, lr=1e-2, warmup_steps=2, grad_clip_norm=0.05,
        auxk_coefficient=1 / 32, k_aux=8, dead_window_tokens=2 * BATCH, checkpoint_every_steps=None,
        log_every_steps=1, progress=False,
    )
    return TrainerConfig(**{**fields, **kw})


def _full_sae() -> TopKSAE:
    torch.manual_seed(0)
    return TopKSAE(TopKSAEConfig(d_in=D, n_latents=N, k=K))


def _data() -> torch.Tensor:
    return torch.randn(4 * BATCH, D, generator=torch.Generator().manual_seed(3)) * 2 + 1


def _check_training(rank: int, root: str) -> None:
    root_path = Path(root)
    reference = Trainer(_full_sae(), _cfg(), root_path / f"reference{rank}").fit(tensor_batches(_data(), BATCH))
    shard = ShardedTopKSAE.from_full(_full_sae())
    result = Trainer(shard, _cfg(), root_path / "sharded").fit(tensor_batches(_data(), BATCH))
    assert result.steps == STEPS and result.completed
    # Every process sees the same loss, so the same records; the primary one alone writes them. The records are
    # Python floats of float32 results, and the all-reduce sums the ranks' partial reconstructions in another order
    # than one rank does: equal to float32 rounding (a float64 tolerance would ask for a bit-exact sum).
    for want, got in zip(reference.records, result.records, strict=True):
        for key in ("loss", "fvu", "recon", "auxk", "l0", "dead_fraction"):
            torch.testing.assert_close(got[key], want[key], rtol=4e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")
    assert any(record["dead_fraction"] > 0 for record in reference.records)  # AuxK had dead latents to fit
    trained = load_sae(result.sae_dir)
    assert type(trained) is TopKSAE
    for name, tensor in load_sae(reference.sae_dir).state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], tensor, msg=lambda m, n=name: f"{n}: {m}")
    assert len(read_records(result.metrics_path)) == STEPS


def test_training_steps_equal_the_unsharded_run(run_in_group, tmp_path: Path) -> None:
    run_in_group(_check_training, str(tmp_path))


def _partial(sae, root: Path, steps: int) -> None:
    """Train `steps` steps of the run and stop (the data runs out): a checkpoint at `steps`."""
    result = Trainer(sae, _cfg(checkpoint_every_steps=2), root).fit(islice(tensor_batches(_data(), BATCH), steps))
    assert not result.completed and latest_checkpoint(root).name == f"step_{steps:09d}"


def _resume(sae, root: Path) -> TopKSAE:
    trainer = Trainer(sae, _cfg(checkpoint_every_steps=2), root)
    assert trainer.restore()
    return load_sae(trainer.fit(tensor_batches(_data(), BATCH)).sae_dir)


def _check_checkpoints(rank: int, root: str) -> None:
    root_path = Path(root)
    continuous = Trainer(_full_sae(), _cfg(), root_path / f"continuous{rank}").fit(tensor_batches(_data(), BATCH))
    want = load_sae(continuous.sae_dir).state_dict()
    # A sharded run stopped at step 3 resumes sharded.
    _partial(ShardedTopKSAE.from_full(_full_sae()), root_path / "sharded", 3)
    resumed = {"sharded -> sharded": _resume(ShardedTopKSAE.from_full(_full_sae()), root_path / "sharded")}
    # Its checkpoint is the unsharded format: an unsharded run resumes it, and a sharded run resumes an unsharded
    # run's checkpoint.
    if rank == 0:
        _partial(_full_sae(), root_path / "unsharded", 3)
    dist.barrier()
    resumed["unsharded -> sharded"] = _resume(ShardedTopKSAE.from_full(_full_sae()), root_path / "unsharded")
    _partial(ShardedTopKSAE.from_full(_full_sae()), root_path / "cross", 3)
    dist.barrier()
    if rank == 0:
        resumed["sharded -> unsharded"] = _resume(_full_sae(), root_path / "cross")
    for how, sae in resumed.items():
        for name, tensor in want.items():
            torch.testing.assert_close(sae.state_dict()[name], tensor, msg=lambda m, n=name, h=how: f"{h} {n}: {m}")


def test_checkpoints_resume_across_sharded_and_unsharded_runs(run_in_group, tmp_path: Path) -> None:
    run_in_group(_check_checkpoints, str(tmp_path))


def _check_refusals(rank: int, root: str) -> None:
    shard = ShardedTopKSAE.from_full(_full_sae())
    with pytest.raises(ConfigError, match="resample"):
        Trainer(shard, _cfg(resample_every_steps=10), Path(root) / "c")
    with pytest.raises(ConfigError, match="l1_coefficient"):
        Trainer(shard, _cfg(l1_coefficient=1.0), Path(root) / "c")


def test_resampling_and_l1_are_refused(run_in_group, tmp_path: Path) -> None:
    run_in_group(_check_refusals, str(tmp_path))
