"""The one way to train SAEs: `train(sae, batches, trainer_cfg, out_dir)`, which every experiment and the
`saelab train` command call, is the one-SAE case of `train_many(jobs, source)`, which trains several SAEs in step on
one source of batches (`saelab train --model`: one forward pass feeding an SAE per hookpoint).

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
import functools
import hashlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.activations.layout import MANIFEST_NAME
from saelab.activations.normalize import NormStats, estimate_norm_stats
from saelab.activations.store import ActivationStore
from saelab.config import Config, PresetConfig
from saelab.data.tokenize import DataConfig, build_contexts
from saelab.errors import CheckpointError, ConfigError, DataError, StoreError
from saelab.models.hookpoints import canonical_hookpoint
from saelab.run_folder import RunFolder
from saelab.saes.base import SparseAutoencoder, load_sae
from saelab.saes.initialization import seeded
from saelab.saes.multilayer import MultiLayerSAE, MultiLayerSAEConfig
from saelab.saes.sharded import ShardedTopKSAE
from saelab.saes.spec import SAESpec, Target, sae_from_spec
from saelab.saes.topk import TopKSAE
from saelab.training import checkpoint as ckpt
from saelab.training import distributed
from saelab.training.config import DEEP_SAE_RECIPE, TrainerConfig
from saelab.training.logger import read_records
from saelab.training.trainer import (
    FINAL_SAE_DIR,
    LATER_DEFAULTS,
    METRICS_FILE,
    RESUMABLE_CHANGES,
    Trainer,
    TrainResult,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TRAIN_STAGE = "train"
T = TypeVar("T")


@dataclasses.dataclass
class TrainJob:
    """One SAE of a `train_many` run: trained on the concatenation of `inputs` (keys of the source's batches, in
    this order) into its own run folder `out_dir`; `data` describes those batches (see `train`)."""

    sae: SparseAutoencoder
    cfg: TrainerConfig
    out_dir: str | Path
    inputs: tuple[str, ...] = ("x",)
    data: dict[str, Any] | None = None
    # The key of the activation the SAE predicts (a transcoder's target), when the source's batches carry one: the
    # trainer then gets (input, target) pairs.
    target: str | None = None

    @property
    def name(self) -> str:
        return Path(self.out_dir).name


# What `train_many` reads: an iterable of {input name: [B, d] tensor} that yields the same sequence on every call,
# or a function of the number of batches already consumed returning the rest (a source that can seek cheaply).
BatchSource = Iterable[Mapping[str, Tensor]] | Callable[[int], Iterable[Mapping[str, Tensor]]]


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
    call, e.g. `ActivationStore.batches` or `tensor_batches`; or of (input, target) pairs for a transcoder, e.g.
    `TargetPairs`) into the run folder `out_dir`.

    `data` describes what the batches are (a store and hookpoint, or a tensor's fingerprint) so that a folder is
    never reused for other data. With `resume`, a folder with checkpoints continues from the newest one and a
    finished folder loads its final SAE into `sae`; without it, such a folder is an error. `command` (e.g. the
    `saelab train` config) is recorded in `config.json` beside the request, so the run can be replayed.

    In a torchrun job of several processes, every rank calls this with the same arguments and the same `batches`
    (the global ones; `cfg.batch_size` is the global batch size); the ranks train one SAE together.
    """
    job = TrainJob(sae, cfg, out_dir, data=data, target=_Named.TARGET)
    (result,) = train_many([job], _Named(batches, "x"), resume=resume, command=command)
    return result


def train_many(
    jobs: Sequence[TrainJob],
    batches: BatchSource,
    *,
    resume: bool = True,
    command: Config | None = None,
    run_dir: str | Path | None = None,
    progress_stats: Callable[[], dict[str, str]] | None = None,
    peers: distributed.Dist | None = None,
) -> list[TrainResult]:
    """Train several SAEs in step on one source of batches (e.g. one forward pass feeding an SAE per hookpoint),
    each into its own run folder exactly as `train` does for one; returns their results in the order of `jobs`.

    All SAEs take one optimiser step per batch, so their checkpoints fall at the same steps and the source's
    position is the step count: a resumed run restores every unfinished SAE to the newest checkpoint step they all
    share. `run_dir`, when given, gets `config.json` (the `command`) and a `summary.json` with every SAE's final
    metrics side by side. `progress_stats` adds fields (e.g. forward tokens/s) to the progress bar.

    Under torchrun every rank calls this with the same arguments and source; each keeps its slice of every global
    batch, the ranks train each SAE together, and rank 0 alone writes the folders.
    A latent-sharded SAE (`ShardedTopKSAE`) is trained by all ranks together on the same (whole) batches: its
    collectives are its own, and the ranks share only the folder writes.
    With `peers` (`--distribute-hookpoints`), `jobs` are this process's own SAEs, which it trains alone on whole
    batches and writes itself; the source shares its work with the `peers`, so every process keeps pulling batches
    until all are done, the ranks resume from one common step, and rank 0 writes `run_dir`'s summary of all SAEs.
    """
    if peers is not None:
        return _train_many(jobs, batches, resume, command, run_dir, progress_stats, None, None, peers)
    with distributed.session(jobs[0].cfg.device if jobs else "cpu") as group:
        sharded = any(job.sae.sharded for job in jobs)
        if group is not None:
            if not sharded:
                jobs = [dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, device=str(group.device)))
                        for job in jobs]
            group.check_same({"jobs": [_request(job) for job in jobs], "resume": resume,
                              "command": command.to_dict() if command is not None else None},
                             "training requests (SAE, trainer settings, data, command line or --resume)")
        dist = None if sharded else group
        return _train_many(jobs, _sharded(batches, dist), resume, command, run_dir, progress_stats, dist, group)


def _train_many(
    jobs: Sequence[TrainJob],
    batches: BatchSource,
    resume: bool,
    command: Config | None,
    run_dir: str | Path | None,
    progress_stats: Callable[[], dict[str, str]] | None,
    dist: distributed.Dist | None,
    files: distributed.Dist | None,
    peers: distributed.Dist | None = None,
) -> list[TrainResult]:
    """`train_many` for data-parallel ranks (`dist`), or alone; `files` is the group whose rank 0 writes the SAE
    folders; `peers` the group of a run whose hookpoints are distributed (see `train_many`)."""
    if len({Path(job.out_dir).resolve() for job in jobs}) != len(jobs):
        raise ConfigError("two SAEs of one run share an output folder; give each its own")
    sizes = {job.cfg.batch_size for job in jobs}
    if len(sizes) != 1:
        raise ConfigError(f"SAEs fed from one source need one batch size, got {sorted(sizes)}")
    combined = len(jobs) > 1 or progress_stats is not None  # then one bar for all SAEs, not one each
    opened = [_open_job(job, resume, command, combined, dist, files, owned=peers is not None) for job in jobs]
    trainers = [t for t in opened if isinstance(t, Trainer)]
    step = _restore_together(trainers, peers) if resume else 0
    writer = files if peers is None else peers  # whose rank 0 writes run_dir
    if run_dir is not None:
        _on_main(writer, lambda: RunFolder(run_dir).save_config(command.to_dict() if command is not None else {}))
    started = time.perf_counter()
    shown = combined and any(j.cfg.progress for j in jobs) and (writer is None or writer.is_main)
    bar = tqdm(total=max((t.cfg.total_tokens for t in trainers), default=0), initial=step * sizes.pop(),
               unit="tok", unit_scale=True, desc="train", disable=not shown)
    for trainer in trainers:
        trainer.begin()
    active = [(job, t) for job, t in zip(jobs, opened, strict=True) if isinstance(t, Trainer) and not t.done]
    try:
        stream = _from_step(batches, step) if _any_active(active, peers) else iter(())
        window_start, window_tokens = time.perf_counter(), 0
        for batch in stream:
            for job, trainer in active:
                trainer.train_on(_job_input(batch, job.inputs, job.target))
            rows = next(iter(batch.values())).shape[0]
            bar.update(rows)
            window_tokens += rows
            elapsed = time.perf_counter() - window_start
            if elapsed > 2.0:
                bar.set_postfix({"train_tok/s": f"{window_tokens / elapsed:.3g}", **(progress_stats or dict)()})
                window_start, window_tokens = time.perf_counter(), 0
            active = [(job, t) for job, t in active if not t.done]
            if not _any_active(active, peers):
                break  # before pulling another batch from the (possibly expensive) source
    except BaseException:
        for trainer in trainers:
            trainer.abort()
        bar.close()
        raise
    bar.close()
    elapsed = round(time.perf_counter() - started, 2)
    results = [t if isinstance(t, TrainResult) else _finish_job(job, t, elapsed, files)
               for job, t in zip(jobs, opened, strict=True)]
    if run_dir is not None:
        side_by_side = {job.name: {**{k: r.final.get(k) for k in ("fvu", "l0", "dead_fraction")}, "steps": r.steps,
                                   "tokens_seen": r.tokens_seen, "completed": r.completed}
                        for job, r in zip(jobs, results, strict=True)}
        if peers is not None:  # every process's SAEs, in the order of the command's hookpoints
            side_by_side = {name: entry for part in peers.gather_objects(side_by_side) for name, entry in part.items()}
            side_by_side = dict(sorted(side_by_side.items(), key=lambda item: _order(command, item[0])))
        folder = RunFolder(run_dir)
        folder.timings[TRAIN_STAGE] = elapsed
        summary = {"saes": side_by_side, "completed": all(entry["completed"] for entry in side_by_side.values()),
                   "world_size": 1 if writer is None else writer.world_size}
        if peers is not None:
            summary["distribute_hookpoints"] = True
        _on_main(writer, lambda: folder.write_summary(summary, command))
    return results


def _request(job: TrainJob) -> dict[str, Any]:
    sae, cfg = job.sae, job.cfg
    return {"sae": {"architecture": sae.architecture, **sae.cfg.to_dict()},
            "trainer": {k: v for k, v in cfg.to_dict().items()
                        if k not in RESUMABLE_CHANGES and LATER_DEFAULTS.get(k, object()) != v},
            "data": job.data}


def _open_job(
    job: TrainJob, resume: bool, command: Config | None, quiet: bool, dist: distributed.Dist | None,
    files: distributed.Dist | None, owned: bool = False,
) -> Trainer | TrainResult:
    """A fresh trainer for the job's folder, or the result of the finished run it holds (loaded into `job.sae`);
    a folder of another request, or an earlier run without `resume`, is refused (on every rank)."""
    folder = RunFolder(job.out_dir)

    def claim() -> Any:
        if not resume:
            _refuse_earlier_run(folder)
        folder.check_config({**_request(job), "command": command.to_dict() if command is not None else None},
                            ignore=frozenset({"command"}))
        return folder.result(TRAIN_STAGE)

    finished = _on_main(files, claim)
    if finished is not None:
        final = load_sae(folder.path / FINAL_SAE_DIR)
        if isinstance(job.sae, ShardedTopKSAE):
            job.sae.copy_from_full(final)
        else:
            job.sae.load_state_dict(final.state_dict())
        records = read_records(folder.path / METRICS_FILE)
        return TrainResult(records=records, sae_dir=folder.path / FINAL_SAE_DIR,
                           metrics_path=folder.path / METRICS_FILE, **finished)
    return Trainer(job.sae, dataclasses.replace(job.cfg, progress=False) if quiet else job.cfg, folder.path, dist=dist,
                   owned=owned)


def _refuse_earlier_run(folder: RunFolder) -> None:
    if folder.is_done(TRAIN_STAGE) or ckpt.latest_checkpoint(folder.path) is not None:
        raise CheckpointError(
            f"{folder.path} holds an earlier run; resume it (--resume true) or train into a new folder"
        )


def _restore_together(trainers: list[Trainer], peers: distributed.Dist | None = None) -> int:
    """Restore every trainer to the newest checkpoint step all of them hold (a crash between two SAEs'
    checkpoints leaves one a step ahead), with `peers` those of every process too; returns that step, where the
    shared source continues."""
    if len(trainers) == 1 and peers is None:
        trainers[0].restore()
        return trainers[0].step
    held = [ckpt.checkpoint_steps(t.out_dir) for t in trainers]
    everywhere = held if peers is None else [steps for part in peers.gather_objects(held) for steps in part]
    if not any(everywhere):
        return 0
    common = set.intersection(*(set(steps) for steps in everywhere))
    if not common:
        raise CheckpointError(
            "the SAEs of this run hold checkpoints of different steps "
            f"({', '.join(f'{t.out_dir.name}: {sorted(s) or None}' for t, s in zip(trainers, held, strict=True))}), "
            "so they cannot continue together; delete the run folder to start over"
        )
    step = max(common)
    for trainer, steps in zip(trainers, held, strict=True):
        trainer.restore(steps[step])
    return step


def _any_active(active: Sequence[Any], peers: distributed.Dist | None) -> bool:
    """Whether some SAE still trains: here, or with `peers` on any process (they all pull the source together)."""
    return bool(active) if peers is None else peers.any(bool(active))


def _order(command: Config | None, name: str) -> int:
    hookpoints = getattr(command, "streamed_hookpoints", [])
    return hookpoints.index(name) if name in hookpoints else len(hookpoints)


def _from_step(batches: BatchSource, step: int) -> Iterator[Mapping[str, Tensor]]:
    if callable(batches):
        return iter(batches(step))
    return itertools.islice(iter(batches), step, None)


def _job_input(
    batch: Mapping[str, Tensor], inputs: Sequence[str], target: str | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """The job's input (its inputs concatenated), paired with its target when the batch carries one."""
    x = batch[inputs[0]] if len(inputs) == 1 else torch.cat([batch[name] for name in inputs], dim=1)
    return (x, batch[target]) if target is not None and target in batch else x


def _finish_job(job: TrainJob, trainer: Trainer, elapsed: float, dist: distributed.Dist | None) -> TrainResult:
    """Save the final SAE and write the job folder's summary (and done-marker when complete)."""
    result = trainer.finish()
    folder = RunFolder(job.out_dir)
    folder.timings[TRAIN_STAGE] = elapsed
    sae = job.sae
    outcome = {"final": result.final, "steps": result.steps, "tokens_seen": result.tokens_seen,
               "completed": result.completed}

    def record_outcome() -> None:
        folder.write_summary({**outcome, "sae": {"architecture": sae.architecture, "n_latents": sae.n_latents,
                                                 "d_in": sae.d_in, "parameters": sae.num_parameters()},
                              "request": _request(job), "world_size": 1 if dist is None else dist.world_size})
        if result.completed:
            folder.mark_done(TRAIN_STAGE, outcome)

    _on_main(dist, record_outcome)
    return result


def _on_main(dist: distributed.Dist | None, fn: Callable[[], T]) -> T:
    """`fn()` here when alone; under torchrun on rank 0, its result (or error) shared with every rank."""
    return fn() if dist is None else dist.on_main(fn)


def _sharded(batches: BatchSource, dist: distributed.Dist | None) -> BatchSource:
    """This rank's rows of every global batch of the source (the source itself when alone)."""
    if dist is None:
        return batches
    if isinstance(batches, _Named):  # plain batches: a source that can produce only its slice is asked to
        return _Named(distributed.shard_batches(batches.batches, dist), batches.name)

    def rows(dicts: Iterable[Mapping[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        for batch in dicts:
            lo, hi = dist.bounds(next(iter(batch.values())).shape[0])
            yield {name: x[lo:hi] for name, x in batch.items()}

    if callable(batches):
        return lambda step: rows(batches(step))
    return _Rows(batches, rows)


class _Rows:
    """A re-iterable source mapped through `rows` on every iteration."""

    def __init__(self, batches: Iterable[Mapping[str, Tensor]], rows: Callable[..., Iterator[dict[str, Tensor]]]):
        self.batches, self.rows = batches, rows

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.rows(self.batches)


class _Named:
    """Plain `[B, d]` batches as `{name: batch}` dicts (an (input, target) pair as `{name: input, TARGET:
    target}`), re-iterable like the batches they wrap."""

    TARGET = "target"

    def __init__(self, batches: Iterable[Tensor | tuple[Tensor, Tensor]], name: str) -> None:
        self.batches, self.name = batches, name

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return ({self.name: batch} if isinstance(batch, Tensor) else {self.name: batch[0], self.TARGET: batch[1]}
                for batch in self.batches)


class TargetPairs:
    """(input, target) pairs from batches of the two hookpoints concatenated (`store.batches([input, target])`,
    one row = one token at both sites): the first `d_in` features are the input. Re-iterable like the batches."""

    def __init__(self, batches: Iterable[Tensor], d_in: int) -> None:
        self.batches, self.d_in = batches, d_in

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return ((batch[:, : self.d_in], batch[:, self.d_in :]) for batch in self.batches)


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
    target: Tensor | None = None,
    target_hookpoint: str | None = None,
) -> tuple[SparseAutoencoder, TrainResult]:
    """An SAE of `spec` trained on the rows of `x` (activations held in memory, or quantities derived from them that
    no store holds), its input scale (preprocessing="scale") estimated on `x` itself; resumable like `train`. With
    `target` (rows paired with x's), the transcoder predicting it (`target_hookpoint`), its target scale estimated
    on `target`."""
    scale = estimate_norm_stats(x).scale if spec.preprocessing == "scale" else 1.0
    if target is None:
        sae = sae_from_spec(spec, x.shape[1], scale, hookpoint, model_name, seed=cfg.seed)
        return sae, train(sae, tensor_batches(x, cfg.batch_size, seed), cfg, out_dir, data=describe_tensor(x, seed))
    if target.shape[0] != x.shape[0]:
        raise DataError(f"the target has {target.shape[0]} rows, the input {x.shape[0]}; pair them row by row")
    goal = Target(target_hookpoint or "target", target.shape[1], estimate_norm_stats(target).scale)
    sae = sae_from_spec(spec, x.shape[1], scale, hookpoint, model_name, seed=cfg.seed, target=goal)
    pairs = torch.cat([x, target.to(x.dtype)], dim=1)
    batches = TargetPairs(tensor_batches(pairs, cfg.batch_size, seed), x.shape[1])
    return sae, train(sae, batches, cfg, out_dir, data=describe_tensor(pairs, seed))


def sae_for_store(
    spec: SAESpec, store: ActivationStore, hookpoint: str, seed: int = 0, target_hookpoint: str | None = None
) -> SparseAutoencoder:
    """A fresh SAE sized for `hookpoint` of `store` (a transcoder predicting `target_hookpoint`, when given), with
    the store's normalisation of each hookpoint built in when asked."""
    scale = store.norm_stats(hookpoint).scale if spec.preprocessing == "scale" else 1.0
    target = None
    if target_hookpoint is not None:
        target = Target(target_hookpoint, store.dims[target_hookpoint], store.norm_stats(target_hookpoint).scale)
    return sae_from_spec(spec, store.dims[hookpoint], scale, hookpoint, store.model_name, seed=seed, target=target)


def resolve_hookpoint(store: ActivationStore, hookpoint: str | None) -> str:
    if hookpoint is None:
        if len(store.hookpoints) != 1:
            raise ConfigError(f"the store holds several hookpoints {store.hookpoints}; choose one with --hookpoint")
        return store.hookpoints[0]
    hookpoint = canonical_hookpoint(hookpoint)
    if hookpoint not in store.hookpoints:
        raise ConfigError(f"hookpoint {hookpoint!r} is not in the store; it holds {store.hookpoints}")
    return hookpoint


# ---- `saelab train` ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig(PresetConfig):
    """`saelab train`: from an activation store (`--store`, one SAE on `--hookpoint`), or streamed from a model
    (`--model`, one SAE per hookpoint of `--hookpoints`, all fed by one forward pass per batch of contexts, and
    optionally one multi-layer SAE over their concatenation).

    `preset="deep_sae"` (`--preset deep_sae`): the deep-SAE write-up's recipe, a deep SAE with one dense layer
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
    store: str | None = dataclasses.field(default=None, metadata={"help": "activation store folder (or --model)"})
    hookpoint: str | None = dataclasses.field(default=None, metadata={"help": "--store: default the store's only one"})
    model: str | None = dataclasses.field(
        default=None, metadata={"help": "stream activations of this model (HF name or path) instead of a store"}
    )
    hookpoints: list[str] = dataclasses.field(
        default_factory=list, metadata={"help": "--model: comma-separated hookpoints, one SAE each"}
    )
    target_hookpoint: list[str] = dataclasses.field(
        default_factory=list,
        metadata={"help": "train transcoders: the hookpoint each predicts from its input hookpoint (e.g. mlp_out.3 "
                          "from mlp_in.3); with --model one per --hookpoints entry, in order"},
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    multilayer: bool = dataclasses.field(
        default=False, metadata={"help": "--model: also one multi-layer SAE over the concatenated resid_post layers"}
    )
    buffer_tokens: int = dataclasses.field(
        default=65_536, metadata={"help": "--model: shuffle buffer per hookpoint in tokens (memory is this x d x 4 B)"}
    )
    contexts_per_forward: int = dataclasses.field(default=8, metadata={"help": "--model: contexts per forward pass"})
    model_dtype: Literal["float32", "bfloat16", "float16"] = dataclasses.field(
        default="float32", metadata={"help": "--model: dtype the model runs in"}
    )
    device: str = dataclasses.field(default="cpu", metadata={"help": "--model: device the model runs on"})
    cache_to: str | None = dataclasses.field(
        default=None, metadata={"help": "--model: also write the activations into this store (as harvest would)"}
    )
    cache_dtype: Literal["float16", "float32"] = dataclasses.field(
        default="float16", metadata={"help": "storage dtype of --cache-to"}
    )
    cache_shard_tokens: int = dataclasses.field(default=65_536, metadata={"help": "tokens per shard of --cache-to"})
    out_dir: str = dataclasses.field(
        default="runs/train", metadata={"help": "run folder; with --model one sub-folder per SAE"}
    )
    sae: SAESpec = dataclasses.field(default_factory=SAESpec)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    shuffle_seed: int = dataclasses.field(default=0, metadata={"help": "seed of the batch order"})
    shard_latents: bool = dataclasses.field(
        default=False,
        metadata={"help": "split a top-k SAE's latents across the processes of a torchrun launch (each reads the "
                          "same batches; NCCL on CUDA, else gloo)"},
    )
    distribute_hookpoints: bool = dataclasses.field(
        default=False,
        metadata={"help": "--model under torchrun: each process trains the SAEs of some of the hookpoints on whole "
                          "batches, the forward passes shared out and the activations sent to their owners"},
    )
    features_tokens: int = dataclasses.field(
        default=0,
        metadata={"help": "--store: afterwards record this many store tokens and write the feature browser to "
                          "OUT_DIR/features (loads the store's model for token texts and logit effects); 0: none"},
    )

    def check_source(self) -> None:
        """Exactly one of --store / --model (checked when the command runs: a config may name its source later)."""
        if (self.store is None) == (self.model is None):
            raise ConfigError(
                "give exactly one data source: --store DIR (a harvested activation store) or --model NAME "
                f"(stream its activations); got {'both' if self.store is not None else 'neither'}"
            )

    def validate(self) -> None:
        if self.target_hookpoint:
            inputs = self.streamed_hookpoints if self.model is not None else [self.hookpoint or "the store's"]
            if len(self.target_hookpoint) != len(inputs) or self.multilayer or self.distribute_hookpoints:
                raise ConfigError(
                    f"--target-hookpoint names one target per input hookpoint ({len(inputs)} given: {inputs}; got "
                    f"{self.target_hookpoint}), and transcoders train without --multilayer and "
                    "--distribute-hookpoints"
                )
        if self.distribute_hookpoints and (self.model is None or self.multilayer or self.cache_to is not None
                                           or self.shard_latents):
            raise ConfigError(
                "--distribute-hookpoints shares the SAEs of a streamed run's hookpoints out over the processes: it "
                "needs --model with --hookpoints, and cannot be combined with --store (one SAE), --multilayer (one "
                "SAE over every hookpoint), --cache-to (no process sees every hookpoint) or --shard-latents"
            )
        if self.features_tokens < 0 or (self.features_tokens and self.model is not None):
            raise ConfigError("--features-tokens needs --store (a positive count of its tokens to record); for a "
                              "streamed run, --cache-to a store and browse a trained SAE with `saelab train --store`")
        if self.model is None:
            if len(self.hookpoints) > 1 or self.multilayer or self.cache_to is not None:
                raise ConfigError(
                    "--hookpoints (several), --multilayer and --cache-to need --model; with --store, train one SAE "
                    "on --hookpoint"
                )
            return
        if not self.hookpoints and self.hookpoint is None:
            raise ConfigError("--model needs hookpoints to train on, e.g. --hookpoints resid_post.3,resid_post.6")
        if self.buffer_tokens < self.trainer.batch_size or self.contexts_per_forward < 1:
            raise ConfigError(
                f"--buffer-tokens ({self.buffer_tokens}) must hold at least one batch ({self.trainer.batch_size}) "
                "and --contexts-per-forward must be at least 1"
            )
        if self.multilayer:
            layers = [_layer_of(hp) for hp in self.streamed_hookpoints]
            if None in layers or len(layers) < 2:
                raise ConfigError(
                    f"--multilayer needs two or more resid_post.L hookpoints, got {self.streamed_hookpoints}"
                )

    @property
    def streamed_hookpoints(self) -> list[str]:
        return list(dict.fromkeys(self.hookpoints or [self.hookpoint]))


def train_from_config(
    cfg: TrainConfig, store: ActivationStore | None = None
) -> tuple[SparseAutoencoder, TrainResult] | dict[str, tuple[SparseAutoencoder, TrainResult]]:
    """`saelab train`: with `--store`, an SAE of `cfg.sae` on `cfg.hookpoint` of the store, trained into
    `cfg.out_dir`; with `--model`, `train_streamed`."""
    cfg.check_source()
    if cfg.model is not None:
        return train_streamed(cfg)
    store = store or ActivationStore(cfg.store)
    hookpoint = resolve_hookpoint(store, cfg.hookpoint or (cfg.hookpoints[0] if cfg.hookpoints else None))
    target = resolve_hookpoint(store, cfg.target_hookpoint[0]) if cfg.target_hookpoint else None
    trainer_cfg = cfg.trainer
    sae = sae_for_store(cfg.sae, store, hookpoint, seed=cfg.trainer.seed, target_hookpoint=target)
    if cfg.shard_latents:
        sae, trainer_cfg = _shard(sae, trainer_cfg)
    read = hookpoint if target is None else [hookpoint, target]
    batches = store.batches(read, cfg.trainer.batch_size, shuffle=True, seed=cfg.shuffle_seed, epochs=None)
    if target is not None:
        batches = TargetPairs(batches, store.dims[hookpoint])
    data = describe_store(store, read, cfg.shuffle_seed)
    result = train(sae, batches, trainer_cfg, cfg.out_dir, resume=cfg.resume, data=data, command=cfg)
    if cfg.features_tokens:
        write_store_features(sae, store, hookpoint, cfg)
    return sae, result


def write_store_features(sae: SparseAutoencoder, store: ActivationStore, hookpoint: str, cfg: TrainConfig) -> Path:
    """The feature browser of a trained SAE in `cfg.out_dir/features`, recorded over `cfg.features_tokens` of the
    store (token texts and the unembedding come from the store's model)."""
    from saelab.interp.examples import TokenText
    from saelab.models.loading import load_model
    from saelab.report.run_features import write_run_features

    model, tokenizer = load_model(store.model_name, "cpu", torch.float32)
    index, _ = write_run_features(sae, store, hookpoint, cfg.out_dir, TokenText(tokenizer),
                                  max_tokens=cfg.features_tokens, unembedding=model.get_output_embeddings().weight,
                                  title=f"{sae.architecture} SAE on {store.model_name} {hookpoint}")
    return index


MULTILAYER_DIR = "multilayer"
NORM_STATS_STAGE = "norm_stats"


def train_streamed(
    cfg: TrainConfig, model: nn.Module | None = None, tokenizer: PreTrainedTokenizerBase | None = None
) -> dict[str, tuple[SparseAutoencoder, TrainResult]]:
    """`saelab train --model`: one SAE per hookpoint (and with `multilayer` one over their concatenation), all
    trained in step on one stream of the model's activations (`ActivationStream`), each into
    `cfg.out_dir/<hookpoint>/` (`multilayer/`); returns {folder name: (sae, result)}. With `target_hookpoint`,
    the SAE of each input hookpoint is a transcoder predicting its target, which the stream reads in the same
    forward pass (same tokens, same shuffle), in the folder of its input hookpoint.

    Nothing is written before the hookpoints are checked against the model. Input scales (preprocessing="scale",
    and the multi-layer SAE's per-layer scales) are estimated on the stream's first block once and kept in the run
    folder's `done/norm_stats.json`, so a resumed run rebuilds the same SAEs.

    With `distribute_hookpoints` (under torchrun), process r trains the SAEs of hookpoints r, r + N, ... alone on
    whole batches: each runs a share of the forward passes and sends every hookpoint's rows to its owner
    (`ActivationStream`'s exchange), so an SAE sees exactly the batches of a one-process run and each process holds
    only its SAEs, their optimiser state and their shuffle buffers. Each process returns only its own SAEs.
    """
    if cfg.distribute_hookpoints:
        if distributed.launched_world_size() <= 1:
            raise ConfigError("--distribute-hookpoints shares hookpoints between processes: launch with torchrun "
                              "--nproc-per-node N (N ≤ the number of hookpoints), or drop the flag")
        with distributed.session(cfg.trainer.device) as peers:
            assert peers is not None
            return _train_streamed(cfg, model, tokenizer, peers)
    return _train_streamed(cfg, model, tokenizer, None)


def _train_streamed(
    cfg: TrainConfig, model: nn.Module | None, tokenizer: PreTrainedTokenizerBase | None,
    peers: distributed.Dist | None,
) -> dict[str, tuple[SparseAutoencoder, TrainResult]]:
    """`train_streamed`, with `peers` the process group its hookpoints are distributed over (returns this
    process's SAEs only)."""
    from saelab.activations.harvest import HarvestConfig, store_writer
    from saelab.activations.stream import ActivationStream
    from saelab.models.hookpoints import resolve_hookpoint as resolve_model_hookpoint
    from saelab.models.loading import load_model

    if model is None or tokenizer is None:
        model, tokenizer = load_model(cfg.model, cfg.device, getattr(torch, cfg.model_dtype))
    # a bad name fails here, before anything is read or written; aliases become canonical names
    hookpoints = list(dict.fromkeys(resolve_model_hookpoint(model, hp).name for hp in cfg.streamed_hookpoints))
    # transcoders: input hookpoint -> the hookpoint it predicts; the stream reads both
    paired = zip(hookpoints, cfg.target_hookpoint, strict=True) if cfg.target_hookpoint else ()
    targets = {hp: resolve_model_hookpoint(model, t).name for hp, t in paired}
    read = list(dict.fromkeys([*hookpoints, *targets.values()]))
    owners = distributed.hookpoint_owners(hookpoints, peers.world_size) if peers is not None else None
    if cfg.cache_to is not None and not cfg.resume and (Path(cfg.cache_to) / MANIFEST_NAME).exists():
        raise StoreError(f"--cache-to {cfg.cache_to} already holds a store; pass --resume true to continue it, or "
                         "choose another folder")
    out = RunFolder(cfg.out_dir)
    if not cfg.resume:  # refused now rather than after the first forward passes
        for name in [*hookpoints, *([MULTILAYER_DIR] if cfg.multilayer else [])]:
            _refuse_earlier_run(RunFolder(out.path / name))
    contexts = build_contexts(cfg.data, tokenizer, show_progress=cfg.trainer.progress)
    cache = None
    if cfg.cache_to is not None:
        harvest_cfg = HarvestConfig(out_dir=cfg.cache_to, model=cfg.model, hookpoints=read, data=cfg.data,
                                    batch_size=cfg.contexts_per_forward, dtype=cfg.cache_dtype,
                                    model_dtype=cfg.model_dtype, shard_tokens=cfg.cache_shard_tokens,
                                    device=cfg.device, resume=cfg.resume)
        cache = functools.partial(store_writer, harvest_cfg, contexts)
    stream = ActivationStream(model, tokenizer, contexts, read, cfg.data, batch_size=cfg.trainer.batch_size,
                              buffer_tokens=cfg.buffer_tokens, contexts_per_forward=cfg.contexts_per_forward,
                              seed=cfg.shuffle_seed, writer=cache, exchange=peers, owners=owners)
    stats = {hp: NormStats.from_dict(d) for hp, d in _norm_stats(out, stream, peers).items()}
    if set(stats) != set(read):
        raise CheckpointError(
            f"{out.path} holds a run on hookpoints {sorted(stats)}, not {read}; resume it with those, or "
            "train into a new folder"
        )
    source = {"model": cfg.model, "model_dtype": cfg.model_dtype, "data": cfg.data.to_dict(),
              "contexts_sha256": hashlib.sha256(contexts.numpy().tobytes()).hexdigest(),
              "buffer_tokens": cfg.buffer_tokens, "contexts_per_forward": cfg.contexts_per_forward,
              "seed": cfg.shuffle_seed}
    jobs, requests = [], []
    for hp in hookpoints:
        scale = stats[hp].scale if cfg.sae.preprocessing == "scale" else 1.0
        t = targets.get(hp)
        target = None if t is None else Target(t, stats[t].mean.numel(), stats[t].scale)
        sae = sae_from_spec(cfg.sae, stats[hp].mean.numel(), scale, hp, cfg.model, seed=cfg.trainer.seed,
                            target=target)
        job = TrainJob(sae, cfg.trainer, out.path / hp, (hp,), {**source, "hookpoints": [hp, *([t] if t else [])]},
                       target=t)
        requests.append(_request(job))
        if owners is None or owners[hp] == peers.rank:  # type: ignore[union-attr]
            jobs.append(job)  # another process's SAE is built only for its request, then dropped
    if peers is not None:
        peers.check_same({"jobs": requests, "resume": cfg.resume, "command": cfg.to_dict()},
                         "training requests (SAE, trainer settings, data, command line or --resume)")
        jobs = [dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, device=str(peers.device))) for job in jobs]
    if cfg.multilayer:
        layered = sorted(hookpoints, key=_layer_of)
        widths = [stats[hp].mean.numel() for hp in layered]
        ml_cfg = MultiLayerSAEConfig(
            d_in=sum(widths), n_latents=cfg.sae.n_latents, k=cfg.sae.k, model_name=cfg.model,
            layers=[_layer_of(hp) for hp in layered], hookpoints=layered, slice_widths=widths,
            layer_scales=[stats[hp].scale for hp in layered],
        )
        ml_cfg.validate()
        with seeded(cfg.trainer.seed):
            sae = MultiLayerSAE(ml_cfg)
        jobs.append(TrainJob(sae, cfg.trainer, out.path / MULTILAYER_DIR, tuple(layered),
                             {**source, "hookpoints": layered}))

    def speed() -> dict[str, str]:
        return {"forward_tok/s": f"{stream.forward_tokens / max(stream.forward_seconds, 1e-9):.3g}"}

    results = train_many(jobs, stream.batches, resume=cfg.resume, command=cfg, run_dir=out.path,
                         progress_stats=speed, peers=peers)
    if cache is not None:
        stream.finish_cache()
    return {job.name: (job.sae, result) for job, result in zip(jobs, results, strict=True)}


def _norm_stats(out: RunFolder, stream: Any, peers: distributed.Dist | None) -> dict[str, dict[str, Any]]:
    """The stream's input statistics per hookpoint, estimated once and kept in the run folder; with `peers` each
    process estimates those of its own hookpoints, rank 0 records them all."""
    def estimate() -> dict[str, dict[str, Any]]:
        return {hp: s.to_dict() for hp, s in stream.norm_stats().items()}

    if peers is None:
        return out.once(NORM_STATS_STAGE, estimate)
    recorded = peers.on_main(lambda: out.result(NORM_STATS_STAGE))  # one answer for every rank: all estimate, or none
    if recorded is not None:
        return recorded
    merged = {hp: d for part in peers.gather_objects(estimate()) for hp, d in part.items()}
    return peers.on_main(lambda: out.once(NORM_STATS_STAGE, lambda: merged))


def _layer_of(hookpoint: str) -> int | None:
    kind, _, layer = hookpoint.rpartition(".")
    return int(layer) if kind == "resid_post" and layer.isdigit() else None


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
