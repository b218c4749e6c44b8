"""`saelab train --shard-latents true` in 2 gloo processes: the same SAE, metrics and run folder as the unsharded
command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab.activations.writer import StoreWriter
from saelab.cli import main
from saelab.errors import ConfigError
from saelab.saes import TopKSAE, load_sae
from saelab.saes.spec import SAESpec
from saelab.training.config import TrainerConfig
from saelab.training.entry import TrainConfig, train_from_config
from saelab.training.logger import read_records

D = 8


@pytest.fixture
def store(tmp_path):
    writer = StoreWriter(tmp_path / "store", model="synthetic", hookpoints=["resid_post.0"], dtype="float32",
                         context_length=4, shard_tokens=64)
    n = 32 * 4
    writer.append({"resid_post.0": torch.randn(n, D) * 3 + 1}, torch.arange(n) % 50, torch.arange(n) % 4,
                  torch.arange(n) // 4, n_contexts=32)
    return writer.finish()


def _args(store_path: str, out: Path) -> list[str]:
    return ["train", "--store", store_path, "--out-dir", str(out), "--sae.n-latents", "16", "--sae.k", "2",
            "--trainer.total-tokens", "128", "--trainer.batch-size", "32", "--trainer.progress", "false",
            "--trainer.log-every-steps", "1", "--trainer.grad-clip-norm", "0.1", "--trainer.lr", "0.01"]


def _check_command(rank: int, store_path: str, root: str) -> None:
    reference, sharded = Path(root) / f"reference{rank}", Path(root) / "sharded"
    assert main(_args(store_path, reference)) == 0
    assert main([*_args(store_path, sharded), "--shard-latents", "true"]) == 0
    want, got = load_sae(reference / "sae"), load_sae(sharded / "sae")
    assert type(got) is TopKSAE
    for name, tensor in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], tensor, msg=lambda m, n=name: f"{n}: {m}")
    records = read_records(sharded / "metrics.jsonl")
    assert len(records) == 4
    for a, b in zip(read_records(reference / "metrics.jsonl"), records, strict=True):
        torch.testing.assert_close(b["fvu"], a["fvu"])
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["sae"]["parameters"] == want.num_parameters() and summary["completed"]
    assert json.loads((sharded / "config.json").read_text())["command"]["shard_latents"] is True
    # A finished sharded run is reused: every process loads its rows of the saved SAE.
    assert main([*_args(store_path, sharded), "--shard-latents", "true", "--resume", "true"]) == 0


def test_sharded_command_equals_the_unsharded_one(run_in_group, store, tmp_path: Path) -> None:
    run_in_group(_check_command, str(store.path), str(tmp_path))


def test_sharding_needs_a_topk_sae_and_a_process_group(store, tmp_path: Path) -> None:
    cfg = TrainConfig(store=str(store.path), out_dir=str(tmp_path / "run"), shard_latents=True,
                      sae=SAESpec(n_latents=16, k=2), trainer=TrainerConfig(total_tokens=64, batch_size=32))
    with pytest.raises(ConfigError, match="torchrun"):
        train_from_config(cfg)
    with pytest.raises(ConfigError, match="cannot be sharded"):
        train_from_config(cfg.replace(sae=SAESpec(architecture="relu", n_latents=16, k=32)))
