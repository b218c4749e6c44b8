"""The one training loop for every SAE. It knows only the SAE interface (`saelab.saes.base`): the SAE
normalises its input, runs its forward pass and names its own loss terms (`training_loss`), initialises itself from
the first batch (`initialize_from_batch`), says which matrices are unit-norm decoders (`decoder_matrices`) and, to
be resampled, which parameters hold per-latent slices (`latent_parameters`). So a new architecture changes nothing
here.

The trainer keeps what is the same for every SAE: the lr schedule, the decoder constraint, gradient clipping, the
optimiser, dead-latent tracking and resampling, checkpoints and logging. One step: normalise → forward → loss terms
→ backward → project decoder gradients → clip → optimiser step → renormalise decoders → count fired latents.
Batches are any iterable of `[B, d_in]` float tensors (e.g. `ActivationStore.batches`), or of (input `[B, d_in]`,
target `[B, d_out]`) pairs for an SAE that predicts another activation from its input (a transcoder): the SAE
normalises the target (`normalize_target`, which an autoencoder refuses), the loss terms get it as `ctx.target`,
and the logged FVU, the data-parallel FVU denominator and the first-batch init (`initialize_from_pair`) use it in
place of the input. That is the loop's only difference between the two. `saelab.training.entry.train` is the entry
point that wraps a run folder around this loop.

Data-parallel (`dist`, see `saelab.training.distributed`): each rank's batches are its slice of the global batch;
the step gets the whole batch's statistics before the loss (`TrainingContext.share`), sums gradients, fire counts
and logged statistics over the ranks after backward, and from there runs identically on every rank; rank 0 alone
writes files. Without `dist` the step makes no collective call and is exactly the one-process loop.

A latent-sharded SAE (`saelab.saes.sharded`, `sae.sharded`) trains in this loop in one process per shard: every
process runs it on the same batches, the SAE's own `clip_grad_norm_` uses the global norm, checkpoints and the final
SAE are gathered into the unsharded format, and only the primary process writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from saelab.errors import CheckpointError, ConfigError, DataError
from saelab.metrics import fire_counts, fraction_of_variance_unexplained, l0
from saelab.saes import certified
from saelab.saes.base import BatchShare, Latents, LossTerm, SparseAutoencoder, TrainingContext
from saelab.training import checkpoint as ckpt
from saelab.training.config import TrainerConfig, default_lr
from saelab.training.constraints import normalize_decoder, project_out_parallel_grad
from saelab.training.dead import DeadLatentTracker, resample_latents
from saelab.training.distributed import Dist, launched_world_size
from saelab.training.logger import MetricsLogger
from saelab.training.optim import build_optimizer
from saelab.training.schedule import lr_factor

METRICS_FILE = "metrics.jsonl"
FINAL_SAE_DIR = "sae"
# Settings that may differ between a checkpoint and the run resuming it without changing the numbers (`precision`:
# bf16-exact selection gives fp32's latents and values bit for bit).
RESUMABLE_CHANGES = frozenset(
    {"checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "device", "progress", "wandb_project",
     "wandb_run_name", "precision"}
)
# Settings added after runs were recorded without them, at the value that gives those runs' numbers: a request
# records them only when they differ from it, so earlier run folders still resume.
LATER_DEFAULTS = {"precision": "fp32"}


@dataclasses.dataclass
class TrainResult:
    final: dict[str, float]  # the last log record
    records: list[dict[str, Any]]  # every log record of the run (this process and the ones it resumed)
    steps: int
    tokens_seen: int
    completed: bool  # False when the batches ran out before cfg.total_tokens
    sae_dir: Path
    metrics_path: Path

    @property
    def curves(self) -> dict[str, list[float]]:
        """Every logged key -> its values at the logged steps."""
        curves: dict[str, list[float]] = {}
        for record in self.records:
            for key, value in record.items():
                curves.setdefault(key, []).append(value)
        return curves


class Trainer:
    """`Trainer(sae, cfg, out_dir).fit(batches)`; to continue a run, call `restore()` before `fit`.

    With `dist` (a data-parallel job), every rank builds its Trainer with the same settings (checked here, a
    collective), feeds it its slice of each global batch, and `cfg.batch_size` is the global batch."""

    def __init__(
        self, sae: SparseAutoencoder, cfg: TrainerConfig, out_dir: str | Path, dist: Dist | None = None,
        owned: bool = False,
    ) -> None:
        """`owned`: under torchrun, this process alone trains this SAE (on whole batches) and writes its folder,
        as with `--distribute-hookpoints`; otherwise a torchrun process must be given its `dist`."""
        cfg.validate()
        if dist is None and not owned and launched_world_size() > 1 and not sae.sharded:
            raise ConfigError(
                f"this process is one of {launched_world_size()} launched by torchrun, but its Trainer was given no "
                "`dist`: every process would train alone into the same folder. Train through "
                "saelab.training.entry.train (as `saelab train` does), or run this command without torchrun"
            )
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.dist = dist
        if dist is not None:
            dist.check_same({"trainer": {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES},
                             "sae": {"architecture": sae.architecture, **sae.cfg.to_dict()}},
                            "trainer and SAE settings")
        self.is_main = dist is None or dist.is_main
        self.sae = sae.to(cfg.device)
        self.context = TrainingContext(
            loss=cfg.loss, l1_coefficient=cfg.l1_coefficient, activation_decay=cfg.activation_decay,
            auxk_coefficient=cfg.auxk_coefficient, k_aux=cfg.k_aux if cfg.k_aux is not None else max(sae.d_in // 2, 1),
            resample=cfg.resample_every_steps is not None,
        )
        self.sae.check_training(self.context)
        self.base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.n_latents)
        self.optimizer = build_optimizer(list(sae.parameters()), cfg, self.base_lr)
        self.tracker = DeadLatentTracker(sae.n_latents, cfg.dead_window_tokens, device=cfg.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.tokens_seen = 0
        self.logger = MetricsLogger(
            self.out_dir / METRICS_FILE, cfg.wandb_project, cfg.wandb_run_name, wandb_config=cfg.to_dict(),
            write=self.is_main and sae.primary,
        )
        self._records: list[dict[str, Any]] = []
        self._short_batch_seen = False
        self._resampled_since_log = 0
        self._bar: tqdm | None = None
        self._window: _Window | None = None
        self._last_checkpoint = 0

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write a checkpoint. A sharded SAE's is the unsharded SAE's (every process gathers its rows of the SAE and
        the optimiser state; the primary one writes), so either kind of run resumes it."""
        gather = self._shard_rows(lambda t: self.sae.gather_rows(t, root_only=True))
        opt_tensors, opt_scalars = ckpt.optimizer_tensors(self.optimizer, gather)
        tensors = {
            **opt_tensors,
            "tracker.tokens_since_fired": self.tracker.tokens_since_fired.cpu(),
            "rng.generator": self.generator.get_state(),
        }
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict(),
                 "optimizer_scalars": opt_scalars, "short_batch_seen": self._short_batch_seen,
                 "world_size": 1 if self.dist is None else self.dist.world_size}
        if not self.sae.primary:
            self.sae.save(self.out_dir)  # this process's part of the gather; the primary one alone writes
            return ckpt.checkpoint_root(self.out_dir) / f"step_{self.step:09d}"
        return Path(self._on_main(lambda: str(ckpt.write_checkpoint(
            self.out_dir, self.step, self.sae.save, state, tensors, self.cfg.keep_checkpoints))))

    def _on_main(self, fn: Any) -> Any:
        """Run a file write on rank 0 only; every rank returns its result together (or raises its error)."""
        return fn() if self.dist is None else self.dist.on_main(fn)

    def _shard_rows(self, rows: Callable[[Tensor], Tensor]) -> Callable[[int, Tensor], Tensor] | None:
        """For a sharded SAE: (parameter index, optimiser state tensor) -> `rows` of it where the parameter is split
        by latent (a per-latent tensor, not a scalar), else the tensor as it is."""
        if not self.sae.sharded:
            return None
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        split = {i for i, p in enumerate(params) if self.sae.is_sharded(p)}
        return lambda index, tensor: rows(tensor) if index in split and tensor.ndim > 0 else tensor

    def restore(self, checkpoint: str | Path | None = None) -> bool:
        """Load a checkpoint (default: the run folder's latest) into this trainer and its SAE. Returns False when
        there is none to load. The config must match the checkpoint's except for `RESUMABLE_CHANGES`."""
        folder = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(self.out_dir)
        if folder is None:
            return False
        state, tensors = ckpt.read_checkpoint(folder)
        self._check_compatible(folder, state["config"])
        self._load_sae_weights(folder / ckpt.SAE_DIR)
        local = self._shard_rows(lambda t: self.sae.local_rows(t))
        if local is not None:  # this process's rows of the (unsharded) optimiser state
            tensors = {name: local(int(name.split(".")[1]), t) if name.startswith("optimizer.") else t
                       for name, t in tensors.items()}
        ckpt.load_optimizer_tensors(self.optimizer, tensors, state["optimizer_scalars"], folder)
        self.tracker.tokens_since_fired.copy_(tensors["tracker.tokens_since_fired"])
        self.generator.set_state(tensors["rng.generator"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self._short_batch_seen = state["short_batch_seen"]
        self._records = self.logger.keep_until(self.step)
        return True

    def _check_compatible(self, folder: Path, saved: dict[str, Any]) -> None:
        current = self.cfg.to_dict()
        differ = sorted(
            k for k in current.keys() | saved.keys()
            if k not in RESUMABLE_CHANGES
            and _jsonable(current.get(k, LATER_DEFAULTS.get(k))) != _jsonable(saved.get(k, LATER_DEFAULTS.get(k)))
        )
        if differ:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
            raise CheckpointError(
                f"{folder} was trained with different settings ({changes}); resume with the checkpoint's "
                "settings or start a new run folder"
            )

    def _load_sae_weights(self, folder: Path) -> None:
        saved_cfg = json.loads((folder / "cfg.json").read_text())
        expected = {"architecture": self.sae.architecture, **self.sae.cfg.to_dict()}
        if _jsonable(saved_cfg) != _jsonable(expected):
            raise CheckpointError(f"{folder}: the checkpoint's SAE ({saved_cfg}) is not this SAE ({expected})")
        if self.sae.sharded:  # the checkpoint holds the whole SAE: this process's rows of it, via the CPU
            state = load_file(str(folder / self.sae.weights_file))
            state = {name: self.sae.local_rows(t) if name != "b_dec" else t for name, t in state.items()}
        else:
            state = load_file(str(folder / self.sae.weights_file), device=str(self.sae.device))
        self.sae.load_state_dict(state)

    # ---- training ------------------------------------------------------------------------------------------
    def fit(self, batches: Iterable[Tensor], skip_consumed: bool = True) -> TrainResult:
        """Train until `cfg.total_tokens` or until `batches` runs out (then a checkpoint is written so the run can
        go on). After `restore()`, `batches` must yield the same sequence as the original run; the batches the
        checkpoint already consumed are skipped unless `skip_consumed=False` (the iterable is already positioned).
        """
        stream: Iterator[Tensor] = iter(batches)
        if skip_consumed and self.step > 0:
            stream = itertools.islice(stream, self.step, None)
        self.begin()
        try:
            for batch in stream if not self.done else ():
                self.train_on(batch)
                if self.done:
                    break  # before pulling another batch from the (possibly disk-backed) iterator
        except BaseException:
            self.abort()
            raise
        return self.finish()

    # The same loop one batch at a time, for callers that feed several trainers from one pass over the data:
    # begin(), then train_on(batch) until `done` (or the data ends), then finish().
    @property
    def done(self) -> bool:
        return self.tokens_seen >= self.cfg.total_tokens

    def begin(self) -> None:
        """Start (or, after `restore()`, continue) a run in this trainer's folder."""
        if self.step == 0:
            if ckpt.latest_checkpoint(self.out_dir) is not None:
                raise CheckpointError(
                    f"{self.out_dir} holds checkpoints of an earlier run; call restore() to continue it, "
                    "or train into a new folder"
                )
            self._records = self.logger.keep_until(0)
        if self.dist is not None and self.step == 0:  # replicas start identical whatever each rank built
            self.dist.broadcast_([p.data for p in self.sae.parameters()])
        self.sae.train()  # an SAE whose encoding differs in training (BatchTopK) learns in training mode
        self._bar = tqdm(total=self.cfg.total_tokens, initial=self.tokens_seen, unit="tok", unit_scale=True,
                         disable=not (self.cfg.progress and self.is_main and self.sae.primary), desc="train")
        self._window = _Window()
        self._last_checkpoint = self.step

    def train_on(self, batch: Tensor | tuple[Tensor, Tensor]) -> None:
        """One optimiser step on `batch` (inputs, or (input, target) pairs), with the logging and checkpoints that
        fall due after it."""
        cfg = self.cfg
        x, y = self._prepare(batch)
        tokens_before = self.tokens_seen
        self._window.add(self._train_step(x, y), self.tokens_seen - tokens_before)
        self._bar.update(self.tokens_seen - tokens_before)
        if self.step % cfg.log_every_steps == 0:
            self._log(self._window, self._bar)
        if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
            self.save_checkpoint()
            self._last_checkpoint = self.step

    def finish(self) -> TrainResult:
        """Log the last partial window, checkpoint an unfinished run, save the final SAE (a sharded SAE gathers
        itself on every process and the primary one writes it)."""
        self._close(flush=True)
        self.sae.eval()  # as `load_sae` returns it: what evaluation and splicing use
        if not self.done and self._last_checkpoint != self.step:
            self.save_checkpoint()
        sae_dir = self.out_dir / FINAL_SAE_DIR
        self._on_main(lambda: self.sae.save(sae_dir))
        return TrainResult(
            final=self._records[-1] if self._records else {}, records=list(self._records), steps=self.step,
            tokens_seen=self.tokens_seen, completed=self.done, sae_dir=sae_dir, metrics_path=self.logger.path,
        )

    def abort(self) -> None:
        """Close the progress bar and logger after a failure, logging and checkpointing nothing: the newest
        checkpoint stays the one a resumed run continues from."""
        self._close(flush=False)
        self.sae.eval()

    def _close(self, flush: bool) -> None:
        """Close the progress bar and logger, logging the last partial window first when `flush` (idempotent)."""
        if flush and self._window is not None and self._window.steps:
            self._log(self._window, self._bar)
        if self._bar is not None:
            self._bar.close()
        self._window = self._bar = None
        self.logger.close()

    def _prepare(self, batch: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
        x, y = (batch, None) if isinstance(batch, Tensor) else batch
        if x.ndim != 2 or x.shape[1] != self.sae.d_in:
            raise DataError(
                f"batch {self.step}: expected activations of shape [B, {self.sae.d_in}], got {tuple(x.shape)}; "
                "the store's hookpoint/dimension does not match the SAE's d_in"
            )
        if y is not None and (y.ndim != 2 or y.shape != (x.shape[0], self.sae.d_out)):
            raise DataError(
                f"batch {self.step}: expected targets of shape [{x.shape[0]}, {self.sae.d_out}], got "
                f"{tuple(y.shape)}; the target hookpoint's dimension does not match the SAE's d_out"
            )
        if self.dist is None:
            self._check_rows(x.shape[0])
        dtype = next(self.sae.parameters()).dtype
        return x.to(self.sae.device, dtype), None if y is None else y.to(self.sae.device, dtype)

    def _check_rows(self, rows: int) -> None:
        """Full batches of `batch_size` rows (global rows in a data-parallel job), at most one short one last."""
        if rows > self.cfg.batch_size or self._short_batch_seen:
            raise DataError(
                f"batch {self.step} has {rows} rows after a batch of fewer than batch_size={self.cfg.batch_size}"
                if self._short_batch_seen
                else f"batch {self.step} has {rows} rows but batch_size={self.cfg.batch_size}; make them agree"
            )
        self._short_batch_seen = rows < self.cfg.batch_size

    def _train_step(self, x: Tensor, y: Tensor | None) -> dict[str, Tensor]:
        sae, cfg, dist = self.sae, self.cfg, self.dist
        x_n, _ = sae.normalize(x)
        y_n = None if y is None else sae.normalize_target(y)
        target = x_n if y_n is None else y_n  # what the output should match
        context, share = self.context, None
        if y_n is not None:
            context = dataclasses.replace(context, target=y_n)
        if dist is not None:
            share = dist.share(target)
            context = dataclasses.replace(context, share=share)
            self._check_rows(share.n_tokens)
        if self.step == 0:
            gather = (lambda t: t) if dist is None else dist.gather_rows
            self._initialize(gather(x_n), None if y_n is None else gather(y_n))
        lr = self.base_lr * lr_factor(self.step, cfg.total_steps, cfg.warmup_steps, cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        with self._autocast(), certified.selection_precision(cfg.precision), certified.counted() as selection:
            output = sae(x_n)
            x_hat, latents = output
            terms = sae.training_loss(x_n, output, context, self.tracker.dead_mask)
            loss = terms["recon"].weighted()
            for name, term in terms.items():
                if name != "recon":
                    loss = loss + term.weighted()
        if dist is None:
            self._check_finite(loss, x)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist is not None:
            stats, counts = self._sum_over_ranks(dist, share, terms, loss, target, x_hat, latents)
            self._check_finite(stats["loss"], x)
        decoders = self._decoders()
        if cfg.unit_norm_decoder:
            project_out_parallel_grad(decoders, cfg.decoder_norm_axis)
        if cfg.grad_clip_norm is not None:
            sae.clip_grad_norm_(cfg.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # with many SAEs in one process, only one holds gradients at once
        if cfg.unit_norm_decoder:
            normalize_decoder(decoders, cfg.decoder_norm_axis)

        with torch.no_grad():
            if dist is None:
                n_tokens = x.shape[0]
                self.tracker.update(fire_counts(latents), n_tokens)
                stats = {name: term.value.detach() for name, term in terms.items()}
                stats["loss"] = loss.detach()
                stats["fvu"] = stats["recon"] if cfg.loss == "fvu" else fraction_of_variance_unexplained(target, x_hat)
                stats["l0"] = l0(latents)
            else:
                n_tokens = share.n_tokens
                self.tracker.update(counts, n_tokens)
            stats["lr"] = torch.tensor(lr)
            if selection.tokens:  # bf16-exact selections ran this step
                stats["certified_fraction"] = torch.tensor(selection.certified / selection.tokens)
        self.step += 1
        self.tokens_seen += n_tokens
        if cfg.resample_every_steps and self.step % cfg.resample_every_steps == 0:
            self._resampled_since_log += self._resample()
        return stats

    @torch.no_grad()
    def _sum_over_ranks(
        self, dist: Dist, share: BatchShare, terms: dict[str, LossTerm], loss: Tensor, target: Tensor, x_hat: Tensor,
        latents: Latents,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """One all_reduce SUM of every gradient, the fire counts and the statistics' shares: the summed share
        gradients are the global loss's gradient, and the statistics become the global batch's (see
        `saelab.training.distributed`). A gradient that is None on every rank stays None (Adam skips it)."""
        rows = target.shape[0]
        stats = {name: term.value.detach().float() for name, term in terms.items()}
        stats["loss"] = loss.detach().float()
        stats["fvu"] = (stats["recon"].clone() if self.cfg.loss == "fvu"
                        else ((x_hat - target).float().pow(2).sum() / share.x_sq_dev).float())
        stats["l0"] = l0(latents) * (rows / share.n_tokens) if rows else target.new_zeros(())
        counts = fire_counts(latents).float()
        params = [p for p in self.sae.parameters()]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=target.device)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dist.sum_([*(p.grad for p in params), counts, *stats.values(), present])
        for p, used in zip(params, present.tolist(), strict=True):
            if not used:
                p.grad = None
        return stats, counts

    def _check_finite(self, loss: Tensor, x: Tensor) -> None:
        if not torch.isfinite(loss):
            bad = "non-finite values in the input batch" if not torch.isfinite(x).all() else "a diverging loss"
            raise DataError(f"step {self.step}: the loss is {loss.item()} ({bad}); check the activations or lower lr")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.cfg.device).type, dtype=getattr(torch, self.cfg.autocast_dtype))

    def _decoders(self) -> list[Tensor]:
        with torch.no_grad():
            return self.sae.decoder_matrices()

    def _initialize(self, x_n: Tensor, y_n: Tensor | None) -> None:
        """Fresh run only: the decoder constraint from the start, then the data-dependent init on the first batch
        (after the constraint, so an init that measures the SAE's output sees the decoder it will train)."""
        if self.cfg.unit_norm_decoder:
            normalize_decoder(self._decoders(), self.cfg.decoder_norm_axis)
        with torch.no_grad():
            if y_n is None:
                self.sae.initialize_from_batch(x_n)
            else:
                self.sae.initialize_from_pair(x_n, y_n)

    def _resample(self) -> int:
        dead = self.tracker.dead_mask()
        count = resample_latents(self.sae, dead, self.optimizer, self.generator)
        if count:
            if self.cfg.unit_norm_decoder:
                normalize_decoder(self._decoders(), self.cfg.decoder_norm_axis)
            self.tracker.revive(dead)
        return count

    def _log(self, window: _Window, bar: tqdm) -> None:
        record = {"step": self.step, "tokens": self.tokens_seen, **window.means(),
                  "dead_fraction": self.tracker.dead_fraction()}
        if self.cfg.resample_every_steps:
            record["resampled"] = self._resampled_since_log
            self._resampled_since_log = 0
        window.reset()
        self.logger.log(record)
        self._records.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4g}", fvu=f"{record['fvu']:.4g}", l0=f"{record['l0']:.1f}",
                        dead=f"{record['dead_fraction']:.1%}", refresh=False)


class _Window:
    """Per-step statistics since the last log, averaged at log time (one host sync per log, not per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, stats: dict[str, Tensor], tokens: int) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.steps += 1
        self.tokens += tokens

    def means(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {key: value.float().cpu().item() / self.steps for key, value in self.sums.items()}
        out["tokens_per_s"] = self.tokens / elapsed
        return out


def _jsonable(value: Any) -> Any:
    """Compare configs as JSON would store them (tuples become lists)."""
    return json.loads(json.dumps(value))
