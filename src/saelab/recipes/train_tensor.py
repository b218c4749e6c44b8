"""Train an SAE on activations held in memory with the one Trainer: a token range of a store, or quantities derived
from activations (an SAE's error components) that no store holds.

Runs are resumable like `saelab train`: an interrupted run continues from its newest checkpoint on the same batch
sequence (the order depends only on the seed), and a run folder whose final SAE is saved is loaded, not retrained.
The folder records what it was trained on (settings and a hash of the data), so a different request is refused
instead of silently answered with the old SAE.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.activations.normalize import estimate_norm_stats
from saelab.errors import CheckpointError, DataError
from saelab.io import atomic_write_json
from saelab.recipes.train import SAESpec, sae_from_spec
from saelab.saes import SparseAutoencoder, load_sae
from saelab.training.config import TrainerConfig
from saelab.training.trainer import FINAL_SAE_DIR, METRICS_FILE, Trainer

RUN_RECORD = "tensor_run.json"


def tensor_batches(x: Tensor, batch_size: int, seed: int = 0) -> Iterator[Tensor]:
    """Endless float32 batches of rows of `x` [N, d] (any dtype: float16 halves the memory), each epoch in a fresh
    random order. An epoch's last partial batch is dropped, since the trainer needs full batches."""
    if x.ndim != 2 or x.shape[0] < batch_size:
        raise DataError(f"need a [tokens, d] tensor with at least batch_size={batch_size} rows, got {tuple(x.shape)}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0] - batch_size + 1, batch_size):
            yield x[order[start : start + batch_size]].float()


def _fingerprint(x: Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def read_training_log(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records a run logged (`metrics.jsonl`): tokens, loss, fvu, l0, dead_fraction, ... per log step."""
    path = Path(out_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_on_tensor(
    spec: SAESpec,
    x: Tensor,
    trainer_cfg: TrainerConfig,
    out_dir: str | Path,
    *,
    hookpoint: str | None = None,
    model_name: str | None = None,
    seed: int = 0,
) -> tuple[SparseAutoencoder, list[dict[str, Any]]]:
    """(trained SAE, its training log) for an SAE of `spec` trained on the rows of `x`.

    The SAE's input scale (preprocessing="scale") is estimated on `x` itself. Trains into `out_dir`, resuming from
    its newest checkpoint; a folder that already holds the finished SAE of the same request is loaded instead.
    """
    out = Path(out_dir)
    request = {
        "spec": spec.to_dict(), "trainer": trainer_cfg.to_dict(), "seed": seed, "hookpoint": hookpoint,
        "data": {"shape": list(x.shape), "dtype": str(x.dtype), "sha256": _fingerprint(x)},
    }
    record = out / RUN_RECORD
    if record.exists():
        previous = json.loads(record.read_text())
        if previous != json.loads(json.dumps(request)):
            raise CheckpointError(
                f"{out} holds an SAE trained for another request (settings or data differ, see {record}); "
                "delete that folder to retrain, or choose another output folder"
            )
        if (out / FINAL_SAE_DIR / "cfg.json").exists():
            return load_sae(out / FINAL_SAE_DIR), read_training_log(out)
    atomic_write_json(record, request)
    scale = estimate_norm_stats(x).scale if spec.preprocessing == "scale" else 1.0
    trainer = Trainer(sae_from_spec(spec, x.shape[1], scale, hookpoint, model_name), trainer_cfg, out)
    trainer.restore()
    trainer.fit(tensor_batches(x, trainer_cfg.batch_size, seed))
    return trainer.sae, read_training_log(out)
