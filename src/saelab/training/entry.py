"""The one way to train an SAE: `train(sae, batches, trainer_cfg, out_dir)`, which every experiment and the
`saelab train` command call.

A training folder is a run folder (`saelab.run_folder`): `config.json` records the request (the SAE's config, the
trainer's, and a description of the data), `checkpoints/` lets an interrupted run continue exactly, `done/train.json`
marks a finished one (a rerun then loads the final SAE instead of training again), `summary.json` holds the final
metrics and `sae/` the trained SAE. A folder holding another request is refused rather than answered with its
old SAE.

Launched by torchrun with several processes, `train` runs data-parallel (`saelab.training.distributed`): every rank
passes the same global batches, keeps its slice of each, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.activations.normalize import estimate_norm_stats
from saelab.activations.store import ActivationStore
from saelab.config import Config, PresetConfig
from saelab.errors import CheckpointError, ConfigError, DataError
from saelab.run_folder import RunFolder
from saelab.saes.base import SparseAutoencoder, load_sae
from saelab.saes.spec import SAESpec, sae_from_spec
from saelab.training import checkpoint as ckpt
from saelab.training import distributed
from saelab.training.config import DEEP_SAE_RECIPE, TrainerConfig
from saelab.training.logger import read_records
from saelab.training.trainer import FINAL_SAE_DIR, METRICS_FILE, RESUMABLE_CHANGES, Trainer, TrainResult

TRAIN_STAGE = "train"


def train(
    sae: SparseAutoencoder,
    batches: Iterable[Tensor],
    cfg: TrainerConfig,
    out_dir: str | Path,
    *,
    resume: bool = True,
    data: dict[str, Any] | None = None,
    command: Config | None = None,
) -> TrainResult:
    """Train `sae` in place on `batches` (an iterable of `[B, d_in]` tensors that yields the same sequence on every
    call, e.g. `ActivationStore.batches` or `tensor_batches`) into the run folder `out_dir`.

    `data` describes what the batches are (a store and hookpoint, or a tensor's fingerprint) so that a folder is
    never reused for other data. With `resume`, a folder with checkpoints continues from the newest one and a
    finished folder loads its final SAE into `sae`; without it, such a folder is an error. `command` (e.g. the
    `saelab train` config) is recorded in `config.json` beside the request, so the run can be replayed.

    In a torchrun job of several processes, every rank calls this with the same arguments and the same `batches`
    (the global ones; `cfg.batch_size` is the global batch size); the ranks train one SAE together.
    """
    with distributed.session(cfg.device) as dist:
        if dist is not None:
            cfg = dataclasses.replace(cfg, device=str(dist.device))
        return _train(sae, batches, cfg, out_dir, resume, data, command, dist)


def _train(
    sae: SparseAutoencoder,
    batches: Iterable[Tensor],
    cfg: TrainerConfig,
    out_dir: str | Path,
    resume: bool,
    data: dict[str, Any] | None,
    command: Config | None,
    dist: distributed.Dist | None,
) -> TrainResult:
    folder = RunFolder(out_dir)
    request = {"sae": {"architecture": sae.architecture, **sae.cfg.to_dict()},
               "trainer": {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}, "data": data}
    if dist is not None:
        dist.check_same({**request, "resume": resume, "command": command.to_dict() if command is not None else None},
                        "training requests (SAE, trainer settings, data, command line or --resume)")

    def claim_folder() -> Any:
        finished = folder.result(TRAIN_STAGE)
        if not resume and (finished is not None or ckpt.latest_checkpoint(folder.path) is not None):
            raise CheckpointError(
                f"{folder.path} holds an earlier run; resume it (--resume true) or train into a new folder"
            )
        folder.check_config({**request, "command": command.to_dict() if command is not None else None},
                            ignore=frozenset({"command"}))
        return finished

    finished = claim_folder() if dist is None else dist.on_main(claim_folder)
    if finished is not None:
        sae.load_state_dict(load_sae(folder.path / FINAL_SAE_DIR).state_dict())
        records = read_records(folder.path / METRICS_FILE)
        return TrainResult(records=records, sae_dir=folder.path / FINAL_SAE_DIR,
                           metrics_path=folder.path / METRICS_FILE, **finished)
    trainer = Trainer(sae, cfg, folder.path, dist=dist)
    if resume:
        trainer.restore()
    started = time.perf_counter()
    result = trainer.fit(distributed.shard_batches(batches, dist))
    folder.timings[TRAIN_STAGE] = round(time.perf_counter() - started, 2)
    outcome = {"final": result.final, "steps": result.steps, "tokens_seen": result.tokens_seen,
               "completed": result.completed}

    def record_outcome() -> None:
        folder.write_summary({**outcome, "sae": {"architecture": sae.architecture, "n_latents": sae.n_latents,
                                                 "d_in": sae.d_in, "parameters": sae.num_parameters()},
                              "request": request, "world_size": 1 if dist is None else dist.world_size})
        if result.completed:
            folder.mark_done(TRAIN_STAGE, outcome)

    if dist is None:
        record_outcome()
    else:
        dist.on_main(record_outcome)
    return result


# ---- data sources -----------------------------------------------------------------------------------------------


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


def describe_tensor(x: Tensor, seed: int = 0) -> dict[str, Any]:
    """What `tensor_batches(x, ..., seed)` trains on, for `train(data=...)`: shape, dtype and a hash of the values."""
    digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {"tensor": {"shape": list(x.shape), "dtype": str(x.dtype), "sha256": digest}, "seed": seed}


def describe_store(store: ActivationStore, hookpoints: str | list[str], shuffle_seed: int) -> dict[str, Any]:
    """What `store.batches(hookpoints, ..., seed=shuffle_seed)` trains on, for `train(data=...)`."""
    return {"store": {"model": store.model_name, "hookpoints": hookpoints, "n_tokens": store.n_tokens},
            "seed": shuffle_seed}


def train_on_tensor(
    spec: SAESpec,
    x: Tensor,
    cfg: TrainerConfig,
    out_dir: str | Path,
    *,
    hookpoint: str | None = None,
    model_name: str | None = None,
    seed: int = 0,
) -> tuple[SparseAutoencoder, TrainResult]:
    """An SAE of `spec` trained on the rows of `x` (activations held in memory, or quantities derived from them that
    no store holds), its input scale (preprocessing="scale") estimated on `x` itself; resumable like `train`."""
    scale = estimate_norm_stats(x).scale if spec.preprocessing == "scale" else 1.0
    sae = sae_from_spec(spec, x.shape[1], scale, hookpoint, model_name, seed=cfg.seed)
    result = train(sae, tensor_batches(x, cfg.batch_size, seed), cfg, out_dir, data=describe_tensor(x, seed))
    return sae, result


def sae_for_store(spec: SAESpec, store: ActivationStore, hookpoint: str, seed: int = 0) -> SparseAutoencoder:
    """A fresh SAE sized for `hookpoint` of `store`, with the store's normalisation built in when asked."""
    scale = store.norm_stats(hookpoint).scale if spec.preprocessing == "scale" else 1.0
    return sae_from_spec(spec, store.dims[hookpoint], scale, hookpoint, store.model_name, seed=seed)


def resolve_hookpoint(store: ActivationStore, hookpoint: str | None) -> str:
    if hookpoint is None:
        if len(store.hookpoints) != 1:
            raise ConfigError(f"the store holds several hookpoints {store.hookpoints}; choose one with --hookpoint")
        return store.hookpoints[0]
    if hookpoint not in store.hookpoints:
        raise ConfigError(f"hookpoint {hookpoint!r} is not in the store; it holds {store.hookpoints}")
    return hookpoint


# ---- `saelab train` ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig(PresetConfig):
    """`preset="deep_sae"` (`--preset deep_sae`): the deep-SAE write-up's recipe, a deep SAE with one dense layer
    each side on per-token centred, L2-normalised inputs, trained with `DEEP_SAE_RECIPE`."""

    PRESETS = {
        "deep_sae": {
            "sae": {"architecture": "deep", "encoder_multiples": [2.0], "preprocessing": "token_l2"},
            "trainer": DEEP_SAE_RECIPE,
        }
    }

    preset: str | None = dataclasses.field(
        default=None, metadata={"help": "deep_sae = the deep-SAE write-up's recipe, under any other flag given"}
    )
    store: str = dataclasses.field(default="runs/activations", metadata={"help": "activation store folder"})
    hookpoint: str | None = dataclasses.field(default=None, metadata={"help": "default: the store's only one"})
    out_dir: str = dataclasses.field(default="runs/train", metadata={"help": "run folder (checkpoints, metrics)"})
    sae: SAESpec = dataclasses.field(default_factory=SAESpec)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    shuffle_seed: int = dataclasses.field(default=0, metadata={"help": "seed of the store's batch order"})


def train_from_config(cfg: TrainConfig, store: ActivationStore | None = None) -> tuple[SparseAutoencoder, TrainResult]:
    """`saelab train`: an SAE of `cfg.sae` on `cfg.hookpoint` of the store, trained into `cfg.out_dir`."""
    store = store or ActivationStore(cfg.store)
    hookpoint = resolve_hookpoint(store, cfg.hookpoint)
    sae = sae_for_store(cfg.sae, store, hookpoint, seed=cfg.trainer.seed)
    batches = store.batches(hookpoint, cfg.trainer.batch_size, shuffle=True, seed=cfg.shuffle_seed, epochs=None)
    data = describe_store(store, hookpoint, cfg.shuffle_seed)
    return sae, train(sae, batches, cfg.trainer, cfg.out_dir, resume=cfg.resume, data=data, command=cfg)
