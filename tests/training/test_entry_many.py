"""`train_many`: SAEs trained in step on one source equal each trained alone, and resume together exactly."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes.spec import SAESpec, sae_from_spec
from saelab.training.config import TrainerConfig
from saelab.training.entry import TrainJob, train, train_many

CFG = TrainerConfig(total_tokens=8 * 32, batch_size=32, warmup_steps=2, log_every_steps=2, checkpoint_every_steps=3,
                    progress=False)


def _source(n: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"a": torch.randn(32, 8, generator=generator), "b": torch.randn(32, 12, generator=generator) * 2 + 1}
            for _ in range(n)]


def _jobs(root, cfg: TrainerConfig = CFG) -> list[TrainJob]:
    spec = SAESpec(n_latents=16, k=2, preprocessing="none")
    return [TrainJob(sae_from_spec(spec, 8, 1.0), cfg, root / "a", ("a",)),
            TrainJob(sae_from_spec(spec, 12, 1.0), cfg, root / "b", ("b",)),
            TrainJob(sae_from_spec(spec, 20, 1.0), cfg, root / "ab", ("a", "b"))]


def _weights(folder) -> bytes:
    return (folder / "sae" / "sae_weights.safetensors").read_bytes()


def test_saes_in_step_equal_each_trained_alone(tmp_path) -> None:
    results = train_many(_jobs(tmp_path / "many"), _source(), run_dir=tmp_path / "many")
    assert [r.steps for r in results] == [8, 8, 8] and all(r.completed for r in results)
    spec = SAESpec(n_latents=16, k=2, preprocessing="none")
    train(sae_from_spec(spec, 8, 1.0), [s["a"] for s in _source()], CFG, tmp_path / "alone-a")
    train(sae_from_spec(spec, 20, 1.0), [torch.cat([s["a"], s["b"]], 1) for s in _source()], CFG, tmp_path / "alone-ab")
    assert _weights(tmp_path / "many" / "a") == _weights(tmp_path / "alone-a")
    assert _weights(tmp_path / "many" / "ab") == _weights(tmp_path / "alone-ab")
    summary = (tmp_path / "many" / "summary.json").read_text()
    assert all(f'"{name}"' in summary for name in ("a", "b", "ab"))


def test_an_interrupted_run_resumes_together_exactly(tmp_path) -> None:
    train_many(_jobs(tmp_path / "whole"), _source())

    def failing(step: int) -> Iterator[dict[str, torch.Tensor]]:
        yield from itertools.islice(_source(), step, 7)
        raise RuntimeError("source lost")

    with pytest.raises(RuntimeError, match="source lost"):
        train_many(_jobs(tmp_path / "split"), failing)
    seen: list[int] = []

    def resumed(step: int) -> Iterator[dict[str, torch.Tensor]]:
        seen.append(step)
        return iter(_source()[step:])

    train_many(_jobs(tmp_path / "split"), resumed)
    assert seen == [6]  # the newest checkpoint all three hold
    for name in ("a", "b", "ab"):
        assert _weights(tmp_path / "split" / name) == _weights(tmp_path / "whole" / name)


def test_one_source_needs_one_batch_size_and_separate_folders(tmp_path) -> None:
    jobs = _jobs(tmp_path)
    jobs[1].cfg = CFG.replace(batch_size=16, total_tokens=16 * 16)
    with pytest.raises(ConfigError, match="one batch size"):
        train_many(jobs, _source())
    jobs = _jobs(tmp_path)
    jobs[1].out_dir = jobs[0].out_dir
    with pytest.raises(ConfigError, match="share an output folder"):
        train_many(jobs, _source())
