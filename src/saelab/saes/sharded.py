"""A top-k SAE whose latents are split across the ranks of a process group: one dictionary wider than one device.

Rank r of N holds latents [r·n/N, (r+1)·n/N): its rows of W_enc, b_enc and W_dec (the per-latent parameters, and
with them their Adam moments, are 1/N per rank); b_dec and the input preprocessing are replicated. Every rank sees
the same batch (latent parallelism, not data parallelism) and ends up with the same loss.

Forward. Encode runs the fast `topk_encode` on the local shard (local GEMM + local top-k), all-gathers every rank's
k candidates (values, global indices) and keeps the global top-k, ties broken by the lower global index: the global
k largest lie among the union of the local k largest, so the selection is the unsharded SAE's. (Candidates arrive
clamped at 0, so where fewer than k pre-activations are positive the zero-valued winners may be other latents than
the unsharded SAE's raw-value order picks; they add nothing to x_hat and get no gradient. Under bf16 autocast,
pre-activations tie often and the unsharded top-k breaks ties in no fixed order: the selected values agree, the
latents holding tied values may not.) Decode sums each
rank's own winners' decoder rows (`sparse_decode` over the local rows), all-reduces the partial reconstructions and
adds b_dec. The output (x_hat and the `SparseLatents` with global indices) is the same on every rank.

Backward. The loss is replicated, so each rank backpropagates the same gradient of it; the collectives are the
autograd functions below, under that convention (no rank's gradient is counted N times):

- all-gather of the candidates: backward keeps this rank's slice (the others' slices belong to other ranks);
- all-reduce of the partial reconstructions: backward is the identity (each partial gets the replicated gradient);
- b_dec (and the input, if it needs a gradient) enters the local encoders through an identity whose backward
  all-reduces: each shard contributes its latents' part of the pre-bias gradient. b_dec's decoder-side gradient is
  replicated already. So every rank's rows get what the unsharded SAE's rows get, and b_dec the same on every rank.

Training with the generic trainer: the unit-norm decoder constraint is per latent row, so local; Adam is
elementwise, so local; gradient clipping needs the global norm (`clip_grad_norm_`); dead-latent statistics are
kept globally (the `SparseLatents` carry global indices and `n_latents`), a replicated [n] counter per rank, tiny
next to the n·d parameters. Checkpoints gather the shards (SAE and Adam moments) into the unsharded format, so a
sharded run resumes an unsharded one's checkpoint and vice versa; the final SAE is saved the same way, as a plain
`TopKSAE` every later tool reads. L1 (every latent's decoder norm) and resampling (a global choice of latents to
re-initialise) are not implemented: without `decoder_norms` / `latent_parameters` the base `check_training`
refuses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from saelab.errors import ConfigError
from saelab.saes.base import ForwardOutput, Latents, SparseAutoencoder, SparseLatents
from saelab.saes.initialization import batch_mean, init_dictionary
from saelab.saes.kernels import sparse_decode, topk_encode
from saelab.saes.topk import TopKSAE, TopKSAEConfig

ProcessGroup = Any  # torch.distributed.ProcessGroup, or None for the default group


# ---- collectives as autograd functions, for a loss that every rank computes identically -----------------------
class _GatherFromShards(torch.autograd.Function):
    """Forward: concatenate every rank's [B, m] along dim 1. Backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx: Any, local: Tensor, group: ProcessGroup) -> Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.rank, ctx.width = rank, local.shape[1]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        start = ctx.rank * ctx.width
        return grad[:, start : start + ctx.width].contiguous(), None


class _ReduceFromShards(torch.autograd.Function):
    """Forward: sum of every rank's partial. Backward: the (replicated) gradient passes to each partial unchanged."""

    @staticmethod
    def forward(ctx: Any, partial: Tensor, group: ProcessGroup) -> Tensor:
        out = partial.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _CopyToShards(torch.autograd.Function):
    """Forward: identity on a replicated tensor that feeds a shard. Backward: sum of every shard's gradient."""

    @staticmethod
    def forward(ctx: Any, replicated: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return replicated.view_as(replicated)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def gather_candidates(values: Tensor, indices: Tensor, group: ProcessGroup) -> tuple[Tensor, Tensor]:
    """Every rank's [B, m] candidates side by side, [B, N·m]; differentiable in `values` (see `_GatherFromShards`)."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(indices) for _ in range(world)]
    dist.all_gather(parts, indices.contiguous(), group=group)
    return _GatherFromShards.apply(values, group), torch.cat(parts, dim=1)


def select_topk(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of the candidates [B, m] per row, ties broken by the lower index, in index order (the unsharded
    exact selection's slot order, so sums over the slots match it). Deterministic, so every rank selects the same
    latents from the same gathered candidates."""
    by_index = indices.argsort(dim=1, stable=True)
    ranked = values.detach().gather(1, by_index).sort(dim=1, descending=True, stable=True).indices[:, :k]
    chosen = by_index.gather(1, ranked.sort(dim=1).values)
    return values.gather(1, chosen), indices.gather(1, chosen)


class ShardedTopKSAE(SparseAutoencoder):
    """`TopKSAE` with its latents split across the ranks of `group` (default: the whole world), `n_latents`
    divisible by the world size. `cfg` is the full SAE's config (global `n_latents`); `n_local` rows live here."""

    architecture = "topk"  # what it saves as: the gathered dictionary is a plain top-k SAE
    config_class = TopKSAEConfig
    cfg: TopKSAEConfig

    sharded = True

    def __init__(self, cfg: TopKSAEConfig, group: ProcessGroup = None, init: bool = True) -> None:
        super().__init__(cfg)
        if not dist.is_initialized():
            raise ConfigError("ShardedTopKSAE needs torch.distributed initialised (e.g. launched under torchrun)")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if cfg.n_latents % self.world:
            raise ConfigError(
                f"n_latents={cfg.n_latents} is not divisible by the {self.world} ranks sharing it; choose a multiple"
            )
        self.n_local = cfg.n_latents // self.world
        self.offset = self.rank * self.n_local
        d = cfg.d_in
        self.W_enc = nn.Parameter(torch.empty(self.n_local, d))
        self.b_enc = nn.Parameter(torch.zeros(self.n_local))
        self.W_dec = nn.Parameter(torch.empty(self.n_local, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if init:
            self._init_local()

    @torch.no_grad()
    def _init_local(self) -> None:
        """The unsharded init (row by row, so it does not depend on n) drawn from a stream per rank: the ranks
        share the caller's seed (one draw from the global generator), and would otherwise draw identical rows."""
        seed = int(torch.randint(2**62, (1,)).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + self.rank)
            init_dictionary(self.W_enc, self.W_dec)

    # ---- building from / gathering to a full SAE -----------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_full(cls, sae: TopKSAE, group: ProcessGroup = None) -> ShardedTopKSAE:
        """This rank's shard of a full `TopKSAE` (every rank holds the same one)."""
        if sae.W_dec is None:
            raise ConfigError("a tied top-k SAE cannot be sharded (its decoder is its encoder)")
        shard = cls(TopKSAEConfig.from_dict(sae.cfg.to_dict()), group=group, init=False).to(sae.device)
        shard.copy_from_full(sae)
        return shard

    @torch.no_grad()
    def copy_from_full(self, sae: TopKSAE) -> None:
        """Load this rank's rows (and b_dec) from a full `TopKSAE` of the same config (e.g. a saved one)."""
        if sae.cfg.to_dict() != self.cfg.to_dict():
            raise ConfigError(f"the full SAE's config {sae.cfg.to_dict()} is not this shard's {self.cfg.to_dict()}")
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(self, name).copy_(self.local_rows(getattr(sae, name)))
        self.b_dec.copy_(sae.b_dec)

    def is_sharded(self, param: Tensor) -> bool:
        """Whether `param` is one of the per-latent parameters split across ranks (dim 0 = latent)."""
        return any(param is p for p in self.sharded_parameters())

    @torch.no_grad()
    def gather_rows(self, local: Tensor, root_only: bool = False) -> Tensor:
        """Every rank's rows of a per-latent tensor [n_local, ...] (a parameter, an Adam moment) in latent order, as
        one CPU tensor. The shards pass through the device one at a time: a whole-dictionary buffer there would
        defeat the sharding. With `root_only`, rank 0 alone assembles it (CPU memory) and the others get `local`
        back. A collective: every rank must call it."""
        keep = self.rank == 0 or not root_only
        full = local.new_empty((self.n_latents, *local.shape[1:]), device="cpu") if keep else None
        buffer = torch.empty_like(local)
        for source in range(self.world):
            if source == self.rank:
                buffer.copy_(local)
            dist.broadcast(buffer, src=self._global_rank(source), group=self.group)
            if full is not None:
                full[source * self.n_local : (source + 1) * self.n_local].copy_(buffer)
        return full if full is not None else local

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def local_rows(self, full: Tensor) -> Tensor:
        """This rank's rows of a full per-latent tensor [n_latents, ...]."""
        return full[self.offset : self.offset + self.n_local]

    @torch.no_grad()
    def to_full(self, root_only: bool = False) -> TopKSAE | None:
        """The whole dictionary as a plain `TopKSAE` on the CPU, on every rank (with `root_only`, on rank 0 and
        None elsewhere). A collective: every rank must call it."""
        rows = {name: self.gather_rows(getattr(self, name).detach(), root_only) for name in ("W_enc", "b_enc", "W_dec")}
        if root_only and self.rank != 0:
            return None
        with torch.random.fork_rng(devices=[]):  # the constructor's init must not move the caller's stream
            full = TopKSAE(TopKSAEConfig.from_dict(self.cfg.to_dict())).to(self.W_enc.dtype)
        for name, tensor in rows.items():
            getattr(full, name).copy_(tensor)
        full.b_dec.copy_(self.b_dec.detach())
        return full

    def save(self, folder: str | Path) -> None:
        """Write the full SAE in the plain top-k format from rank 0 (a collective: every rank must call it)."""
        full = self.to_full(root_only=True)
        if full is not None:
            full.save(folder)
        self.barrier()

    def barrier(self) -> None:
        """Wait for every rank of the group (e.g. until rank 0 has written what the others will read)."""
        dist.barrier(group=self.group)

    # ---- the dictionary --------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.cfg.k

    def encode(self, x: Tensor) -> SparseLatents:
        return self._select(x, self.W_enc, self.b_enc, self.k, local_ids=None)

    def decode(self, latents: Latents) -> Tensor:
        """Σ over the selected latents of value·W_dec[latent] + b_dec; each rank adds its own rows' share."""
        if not isinstance(latents, SparseLatents):
            dense = latents.reshape(-1, self.n_latents)[:, self.offset : self.offset + self.n_local]
            partial = (dense @ self.W_dec).reshape(*latents.shape[:-1], self.d_in)
        else:
            local = latents.indices - self.offset
            mine = (local >= 0) & (local < self.n_local)
            values = torch.where(mine, latents.values, torch.zeros_like(latents.values))
            partial = sparse_decode(values, torch.where(mine, local, torch.zeros_like(local)), self.W_dec)
        lead = partial.shape[:-1]
        full = _ReduceFromShards.apply(partial.reshape(-1, self.d_in), self.group)
        return full.reshape(*lead, self.d_in) + self.b_dec

    def forward(self, x: Tensor) -> ForwardOutput:
        latents = self.encode(x)
        return ForwardOutput(self.decode(latents), latents)

    def auxk_latents(self, x: Tensor, dead_mask: Tensor, k_aux: int) -> SparseLatents:
        """The `k_aux` strongest latents among the dead ones (global boolean mask [n_latents]), for the AuxK loss:
        each rank's encoder GEMM covers only its own dead latents."""
        dead = dead_mask[self.offset : self.offset + self.n_local].nonzero().squeeze(1)
        k = min(k_aux, int(dead_mask.sum().item()))
        return self._select(x, self.W_enc[dead], self.b_enc[dead], k, dead)

    def _select(self, x: Tensor, weight: Tensor, bias: Tensor, k: int, local_ids: Tensor | None) -> SparseLatents:
        """Local top-k over `weight`'s rows (latents `local_ids` of this shard), then the global top-k of every
        rank's candidates. Ranks with fewer than k rows pad with -inf candidates, which never win."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_in)
        if flat.requires_grad:
            flat = _CopyToShards.apply(flat, self.group)
        pre_bias = _CopyToShards.apply(self.b_dec, self.group)
        k_local = min(k, weight.shape[0])
        if k_local > 0:
            values, indices = topk_encode(flat, weight, bias, k_local, pre_bias=pre_bias)
            indices = (indices if local_ids is None else local_ids[indices]) + self.offset
        else:
            values = flat.new_empty(flat.shape[0], 0) + 0 * pre_bias.sum()  # keeps the graph uniform across ranks
            indices = torch.empty(flat.shape[0], 0, dtype=torch.long, device=flat.device)
        pad = k - k_local  # padded on every rank (possibly by nothing): the same autograd graph everywhere
        values = torch.cat([values, values.new_full((flat.shape[0], pad), float("-inf"))], dim=1)
        indices = torch.cat([indices, indices.new_full((flat.shape[0], pad), self.n_latents)], dim=1)
        all_values, all_indices = gather_candidates(values, indices, self.group)
        values, indices = select_topk(all_values, all_indices, k)
        return SparseLatents(values.reshape(*lead, k), indices.reshape(*lead, k), self.n_latents)

    # ---- training hooks -------------------------------------------------------------------------------------------
    def decoder_matrices(self) -> list[Tensor]:
        """The local decoder rows: the unit-norm constraint is per latent, so each rank keeps its own."""
        return [self.W_dec]

    @torch.no_grad()
    def initialize_from_batch(self, x_n: Tensor) -> None:
        """b_dec starts at the first batch's mean, as a whole SAE's: the same batch on every rank, the same b_dec."""
        self.b_dec.copy_(batch_mean(x_n))
        dist.broadcast(self.b_dec.data, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def sharded_parameters(self) -> list[nn.Parameter]:
        """The parameters split across ranks (the rest are replicated)."""
        return [self.W_enc, self.b_enc, self.W_dec]

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The global L2 norm of the gradient: the sharded parameters' squared norms summed over ranks, the
        replicated b_dec's counted once (its gradient is the same on every rank)."""
        device = self.b_dec.device
        local = torch.zeros((), dtype=torch.float64, device=device)
        for p in self.sharded_parameters():
            if p.grad is not None:
                local += p.grad.double().square().sum()
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group)
        if self.b_dec.grad is not None:
            local += self.b_dec.grad.double().square().sum()
        return local.sqrt().to(self.b_dec.dtype)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the whole (unsharded) parameter set: every rank scales by the same
        factor. Returns the global norm before clipping."""
        total = self.grad_norm()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return total

    def num_parameters(self) -> int:
        """Of the whole (unsharded) SAE, as reports expect."""
        return self.n_latents * (2 * self.d_in + 1) + self.d_in

    def flops_per_token(self) -> int:
        """This rank's share: its encoder GEMM and at most k decoder rows (the collectives are not counted)."""
        return 2 * self.d_in * self.n_local + 2 * self.k * self.d_in
