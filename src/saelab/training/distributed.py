"""Data-parallel training on torch.distributed: the plumbing, in one place, so the trainer and the SAEs stay plain.

Launch: `torchrun --nproc-per-node N -m saelab train ...` (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT); `session(device)` joins the process group from those (gloo on CPU, NCCL on CUDA, one GPU per
local rank) and yields a `Dist`, or None when the process is alone, so a one-process run makes no collective call.

The scheme. Every rank reads the same shuffled global batch of `batch_size` rows and keeps rows
[r·B/N, (r+1)·B/N) (`shard_batches`). The SAE and optimiser are replicated. Per step:

1. `Dist.share(x_n)`: one all_gather of each slice's (row count, Σx, Σ||x − mean_slice||²), combined exactly
   (Chan's parallel variance) into the whole batch's token count and Σ||x − mean||², the pooled FVU's denominator.
   The trainer passes it to the loss terms as `TrainingContext.share`, so each rank's loss is its share of the
   global loss (e.g. SSE_r / TSS_global) and the shares sum to the one-process loss; AuxK asks `share.sq_dev` for
   its residual's global variance (one more all_gather while latents are dead).
2. `Dist.sum_(tensors)`: after backward, one all_reduce SUM of a flat buffer holding every gradient, the step's
   fire counts and its logged statistics. Summed share gradients are the gradient of the global loss, so no
   1/N rescaling is needed; the dead-latent tracker then counts fires over the global batch, and the logged
   loss, fvu and l0 are the global ones.
3. Decoder projection, clipping, the optimiser step, renormalisation and resampling then run identically on every
   rank (same gradients, same seeded generator), so the replicas stay equal without broadcasting weights.

Why an explicit all_reduce instead of DistributedDataParallel: the loss terms are not a mean over ranks (DDP's
averaging would need every term rescaled by N), AuxK runs the encoder outside `forward` (DDP hooks only `forward`),
and fusing the fire counts and statistics into the gradient buffer makes a step one collective. An SAE's backward is
a few large GEMMs, so DDP's overlap of communication with backward buys little here.

Files: rank 0 alone writes (checkpoints, metrics.jsonl, the final SAE, run-folder files), via `on_main`, which
also hands rank 0's outcome (or its error) to every rank, so the ranks leave a write together and fail together;
the step's all_reduce before it is the barrier that makes every rank's state the one written. Every rank reads the
checkpoint on resume, so the run folder (and the store) must be visible to every rank: one machine, or a shared
filesystem. The global batches do not depend on N, so a run may resume with another world size: it continues the
same run, equal to float tolerance rather than bit for bit; with the same world size it continues exactly.

Devices: `--trainer.device cuda` gives each process the GPU of its local rank (NCCL); anything else runs on gloo.

Faults: a collective that fails (a peer died) raises `DistributedError`, one line, on the survivors; torchrun also
stops the other ranks with SIGTERM, which becomes the same error. Collectives time out after `SAELAB_DIST_TIMEOUT_S`
seconds (default 300) for a peer that hangs without dying. Checkpoints are written atomically, so the last one
survives any of this.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor

from saelab import errors
from saelab.errors import ConfigError, DistributedError, SaelabError
from saelab.saes.base import BatchShare

T = TypeVar("T")
TIMEOUT_ENV = "SAELAB_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0


def launched_world_size() -> int:
    """How many processes the launcher (torchrun) started for this job; 1 when not launched by one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclasses.dataclass
class Dist:
    """This process's place in a data-parallel job and the collectives the trainer needs (all on `device`)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- batches -------------------------------------------------------------------------------------------
    def bounds(self, rows: int) -> tuple[int, int]:
        """This rank's rows [r·B/N, (r+1)·B/N) of a global batch of `rows` (sizes differ by at most one)."""
        return self.rank * rows // self.world_size, (self.rank + 1) * rows // self.world_size

    def share(self, x: Tensor) -> BatchShare:
        """The whole batch's token count and pooled-FVU denominator from this rank's slice `x` [b, d] (one
        all_gather); see the module docstring."""
        n, sq_dev = self._pooled(x)
        return BatchShare(n_tokens=n, x_sq_dev=sq_dev, sq_dev=lambda t: self._pooled(t)[1])

    def _pooled(self, x: Tensor) -> tuple[int, Tensor]:
        x = x.reshape(-1, x.shape[-1])
        return pooled_sq_dev(self.gather(slice_moments(x)), x.dtype)

    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's slice concatenated in rank order (the global batch), for the first-batch data init."""
        x = x.reshape(-1, x.shape[-1]).contiguous()
        counts = self.gather(torch.tensor([x.shape[0]], device=x.device)).reshape(-1).tolist()
        padded = x.new_zeros(max(counts), x.shape[1])
        padded[: x.shape[0]] = x
        parts = self.gather(padded).reshape(self.world_size, -1, x.shape[1])
        return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])

    # ---- collectives -----------------------------------------------------------------------------------------
    def gather(self, x: Tensor) -> Tensor:
        """all_gather of same-shaped tensors, stacked [N, ...]."""
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        with _collective("all_gather", self.rank):
            torch_dist.all_gather(out, x.contiguous())
        return torch.stack(out)

    def sum_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor over the ranks, in place, with one all_reduce of a flat float buffer (float64 if any
        tensor is, else float32; integer counts below 2^24 stay exact)."""
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        with _collective("all_reduce", self.rank):
            torch_dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_(self, tensors: list[Tensor]) -> None:
        """Rank 0's values into every rank's tensors (the replicas start identical whatever each rank built)."""
        with _collective("broadcast", self.rank):
            for t in tensors:
                torch_dist.broadcast(t, src=0)

    def barrier(self) -> None:
        with _collective("barrier", self.rank):
            torch_dist.barrier()

    def all_to_all(self, parts: list[Tensor], counts: list[int]) -> list[Tensor]:
        """Send `parts[r]` (a 1-D tensor) to rank r; returns what each rank sent here, of `counts[r]` elements
        (every part one dtype; empty parts are fine). What `--distribute-hookpoints` moves its activations with."""
        flat = torch.cat([p.reshape(-1).to(self.device) for p in parts])
        out = flat.new_empty(sum(counts))
        with _collective("all_to_all", self.rank):
            torch_dist.all_to_all_single(out, flat.contiguous(), list(counts), [p.numel() for p in parts])
        return list(out.split(list(counts)))

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's picklable `value`, in rank order (small things: steps held, final metrics)."""
        out: list[Any] = [None] * self.world_size
        with _collective("all_gather_object", self.rank):
            torch_dist.all_gather_object(out, value)
        return out

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on some rank (every rank gets the same answer)."""
        count = torch.tensor([float(flag)], device=self.device)
        self.sum_([count])
        return bool(count.item() > 0)

    # ---- agreement -------------------------------------------------------------------------------------------
    def check_same(self, value: Any, what: str) -> None:
        """Raise ConfigError on every rank unless every rank passed the same JSON-able `value` (compared by
        hash): ranks launched with different settings would otherwise train different models, or hang."""
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()[:8]
        mine = torch.tensor([int.from_bytes(digest, "big", signed=True)], dtype=torch.long, device=self.device)
        hashes = self.gather(mine).reshape(-1).tolist()
        differ = [rank for rank, h in enumerate(hashes) if h != hashes[0]]
        if differ:
            raise ConfigError(
                f"the ranks were given different {what}: rank(s) {differ} differ from rank 0; launch every rank "
                "with the same command and configuration"
            )

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only (e.g. a file write) and return its result on every rank; a SaelabError it raises
        is raised on every rank. The ranks leave together, so none reads before rank 0 has written."""
        payload: list[Any] = [None]
        result: Any = None
        if self.is_main:
            try:
                result = fn()
                payload[0] = ("ok", result)
            except SaelabError as exc:
                payload[0] = ("error", type(exc).__name__, str(exc))
            except BaseException as exc:
                payload[0] = ("error", "DistributedError", f"rank 0 failed: {type(exc).__name__}: {exc}")
                self._broadcast_object(payload)
                raise
        self._broadcast_object(payload)
        if payload[0][0] == "error":
            _, kind, message = payload[0]
            raise getattr(errors, kind, DistributedError)(message)
        return result if self.is_main else payload[0][1]

    def _broadcast_object(self, payload: list[Any]) -> None:
        with _collective("broadcast", self.rank):
            torch_dist.broadcast_object_list(payload, src=0, device=self.device)


def slice_moments(x: Tensor) -> Tensor:
    """(rows, Σ_t x_t, Σ_t ||x_t − mean_slice||²) of one slice `x` [b, d], float64 [d + 2]: what `pooled_sq_dev`
    combines. The deviations are from the slice's own mean, as in the one-process FVU, so no precision is lost to
    cancellation however far the data sit from the origin."""
    rows = x.shape[0]
    total = x.sum(0)
    m2 = torch.linalg.vector_norm(x - total / max(rows, 1)).square()
    count = torch.tensor([rows], dtype=torch.float64, device=x.device)
    return torch.cat([count, total.double(), m2.double().reshape(1)])


def pooled_sq_dev(moments: Tensor, dtype: torch.dtype) -> tuple[int, Tensor]:
    """(tokens, Σ_t ||x_t − mean||²) of the whole batch from every slice's `slice_moments` [N, d + 2], by Chan's
    parallel variance: Σ_r M2_r + Σ_r n_r ||mean_r − mean||²."""
    counts, sums, m2s = moments[:, 0], moments[:, 1:-1], moments[:, -1]
    n = counts.sum()
    means = sums / counts.clamp_min(1).unsqueeze(1)
    between = (counts * (means - sums.sum(0) / n.clamp_min(1)).square().sum(1)).sum()
    return int(n.item()), (m2s.sum() + between).to(dtype)


def shard_batches(batches: Iterable[Tensor], dist: Dist | None) -> Iterable[Tensor]:
    """This rank's slice of each global batch (the batches themselves when alone). A source that can produce only
    its slice (a `shard(rank, world_size)` method, e.g. `BatchStream`) is asked to, saving the rest's copy."""
    if dist is None:
        return batches
    shard = getattr(batches, "shard", None)
    if callable(shard):
        return shard(dist.rank, dist.world_size)
    return _sliced(batches, dist)


def _sliced(batches: Iterable[Tensor], dist: Dist) -> Iterator[Tensor]:
    """Rows of each batch, or of both members of each (input, target) pair."""
    for batch in batches:
        lo, hi = dist.bounds((batch if isinstance(batch, Tensor) else batch[0]).shape[0])
        yield batch[lo:hi] if isinstance(batch, Tensor) else tuple(t[lo:hi] for t in batch)


def device_for(device: str, local_rank: int) -> str:
    """One GPU per process on a node: "cuda" becomes "cuda:<local rank>"; other devices are kept."""
    return f"cuda:{local_rank}" if device == "cuda" else device


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[Dist | None]:
    """Join the torchrun-launched job for the block (None when this process is alone: no process group, no
    collective). The process group is made on first use and kept until the process exits, so several trainings in
    one job (an experiment's sweep) share it: re-making a group under torchrun's store races with the old one."""
    world = launched_world_size()
    if world <= 1:
        yield None
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for(device, local_rank)
    torch_device = torch.device(device)
    if not torch_dist.is_initialized():
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        try:
            torch_dist.init_process_group(backend, timeout=timeout)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {rank}: cannot join the process group ({_first_line(exc)})") from None
        atexit.register(_leave)
    previous = signal.signal(signal.SIGTERM, _stopped(rank))
    try:
        yield Dist(rank=rank, world_size=world, device=torch_device)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _leave() -> None:
    if torch_dist.is_initialized():
        with contextlib.suppress(Exception):
            torch_dist.destroy_process_group()


def _stopped(rank: int) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        raise DistributedError(
            f"rank {rank} was stopped (SIGTERM): another rank failed or the job was cancelled; the last checkpoint "
            "is intact, rerun with --resume true to continue"
        )

    return handler


@contextlib.contextmanager
def _collective(name: str, rank: int) -> Iterator[None]:
    """Turn a failed collective (a peer died or timed out) into one clear line."""
    try:
        yield
    except RuntimeError as exc:
        raise DistributedError(
            f"rank {rank}: {name} failed ({_first_line(exc)}); another rank died or hung, see its output. The last "
            "checkpoint is intact: rerun with --resume true to continue"
        ) from None


def _first_line(exc: BaseException) -> str:
    """The gist of a backend error: its first line without the C++ source location, cut to 120 characters."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 120 else line[:117] + "..."


def hookpoint_owners(hookpoints: list[str], world_size: int) -> dict[str, int]:
    """Which rank trains the SAE of each hookpoint under `--distribute-hookpoints`: the i-th hookpoint goes to
    rank i mod N, so every rank owns some as long as there are at least N, and the counts differ by at most one."""
    if len(hookpoints) < world_size:
        raise ConfigError(
            f"--distribute-hookpoints gives each of the {world_size} processes the SAEs of some hookpoints, but only "
            f"{len(hookpoints)} were given ({hookpoints}); name at least {world_size}, launch fewer processes, or "
            "train data-parallel without --distribute-hookpoints"
        )
    return {hookpoint: i % world_size for i, hookpoint in enumerate(hookpoints)}
