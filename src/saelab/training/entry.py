"""The one way to train an SAE: `train(sae, batches, trainer_cfg, out_dir)`, which every experiment and the
`saelab train` command call.

A training folder is a run folder (`saelab.run_folder`): `config.json` records the request (the SAE's config, the
trainer's, and a description of the data), `checkpoints/` lets an interrupted run continue exactly, `done/train.json`
marks a finished one (a rerun then loads the final SAE instead of training again), `summary.json` holds the final
metrics and `sae/` the trained SAE. A folder holding another request is refused rather than answered with its
old SAE.
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
from saelab.saes.sharded import ShardedTopKSAE
from saelab.saes.spec import SAESpec, sae_from_spec
from saelab.saes.topk import TopKSAE
from saelab.training import checkpoint as ckpt
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
    """
    folder = RunFolder(out_dir)
    request = {"sae": {"architecture": sae.architecture, **sae.cfg.to_dict()},
               "trainer": {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}, "data": data}
    finished = folder.result(TRAIN_STAGE)
    if not resume and (finished is not None or ckpt.latest_checkpoint(folder.path) is not None):
        raise CheckpointError(
            f"{folder.path} holds an earlier run; resume it (--resume true) or train into a new folder"
        )
    # A sharded run's processes all check the folder (so all refuse alike); the primary one alone writes to it.
    folder.check_config({**request, "command": command.to_dict() if command is not None else None},
                        ignore=frozenset({"command"}), record=sae.primary)
    if finished is not None:
        final = load_sae(folder.path / FINAL_SAE_DIR)
        if isinstance(sae, ShardedTopKSAE):
            sae.copy_from_full(final)
        else:
            sae.load_state_dict(final.state_dict())
        records = read_records(folder.path / METRICS_FILE)
        return TrainResult(records=records, sae_dir=folder.path / FINAL_SAE_DIR,
                           metrics_path=folder.path / METRICS_FILE, **finished)
    trainer = Trainer(sae, cfg, folder.path)
    if resume:
        trainer.restore()
    started = time.perf_counter()
    result = trainer.fit(batches)
    folder.timings[TRAIN_STAGE] = round(time.perf_counter() - started, 2)
    outcome = {"final": result.final, "steps": result.steps, "tokens_seen": result.tokens_seen,
               "completed": result.completed}
    if sae.primary:
        folder.write_summary({**outcome, "sae": {"architecture": sae.architecture, "n_latents": sae.n_latents,
                                                 "d_in": sae.d_in, "parameters": sae.num_parameters()},
                              "request": request})
        if result.completed:
            folder.mark_done(TRAIN_STAGE, outcome)
    if isinstance(sae, ShardedTopKSAE):
        sae.barrier()  # the folder is complete when any process returns
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
    shard_latents: bool = dataclasses.field(
        default=False,
        metadata={"help": "split a top-k SAE's latents across the processes of a torchrun launch (each reads the "
                          "same batches; NCCL on CUDA, else gloo)"},
    )


def train_from_config(cfg: TrainConfig, store: ActivationStore | None = None) -> tuple[SparseAutoencoder, TrainResult]:
    """`saelab train`: an SAE of `cfg.sae` on `cfg.hookpoint` of the store, trained into `cfg.out_dir`."""
    store = store or ActivationStore(cfg.store)
    hookpoint = resolve_hookpoint(store, cfg.hookpoint)
    trainer_cfg = cfg.trainer
    sae = sae_for_store(cfg.sae, store, hookpoint, seed=cfg.trainer.seed)
    if cfg.shard_latents:
        sae, trainer_cfg = _shard(sae, trainer_cfg)
    batches = store.batches(hookpoint, cfg.trainer.batch_size, shuffle=True, seed=cfg.shuffle_seed, epochs=None)
    data = describe_store(store, hookpoint, cfg.shuffle_seed)
    return sae, train(sae, batches, trainer_cfg, cfg.out_dir, resume=cfg.resume, data=data, command=cfg)


def _shard(sae: SparseAutoencoder, cfg: TrainerConfig) -> tuple[ShardedTopKSAE, TrainerConfig]:
    """This process's shard of `sae` (built whole on the CPU from the seed, so a sharded run starts from the
    unsharded run's weights) and the trainer settings for it: this process's GPU. Joins the
    process group torchrun describes unless one is already up."""
    import os

    import torch.distributed as dist

    if not isinstance(sae, TopKSAE):
        raise ConfigError(f"--shard-latents shards a top-k SAE; architecture {sae.architecture!r} cannot be sharded")
    on_cuda = cfg.device.startswith("cuda")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError("--shard-latents needs several processes: launch with torchrun --nproc-per-node N")
        dist.init_process_group("nccl" if on_cuda else "gloo")
    if on_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        cfg = cfg.replace(device=f"cuda:{local_rank}")
    return ShardedTopKSAE.from_full(sae), cfg
