"""The latent-sharded top-k SAE against the unsharded one with the same weights, in 2 gloo processes.

Each worker builds the same full `TopKSAE` (same seed), runs it unsharded as the reference, then its own shard,
and asserts; a failed assertion in a worker fails the test with its traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from saelab.metrics import fire_counts
from saelab.saes.base import TrainingContext, load_sae
from saelab.saes.sharded import ShardedTopKSAE, select_topk
from saelab.saes.topk import TopKSAE, TopKSAEConfig
from saelab.training.constraints import normalize_decoder, project_out_parallel_grad

WORLD = 2
D, N, K, B = 16, 64, 8, 48


def full_sae(seed: int = 0, **fields: object) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=D, n_latents=N, k=K, **fields))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def by_index(latents) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of each token sorted by index: the selection, independent of its order."""
    indices, order = latents.indices.sort(dim=-1)
    return indices, latents.values.gather(-1, order)


def _check_forward(rank: int) -> None:
    full, x = full_sae(), batch()
    shard = ShardedTopKSAE.from_full(full)
    want, got = full(x), shard(x)
    assert got.latents.n_latents == N
    want_idx, want_val = by_index(want.latents)
    got_idx, got_val = by_index(got.latents)
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got_val, want_val)
    torch.testing.assert_close(got.x_hat, want.x_hat)
    torch.testing.assert_close(shard.decode(got.latents.to_dense()), want.x_hat)  # dense latents decode alike
    torch.testing.assert_close(shard.to_full().W_dec, full.W_dec, rtol=0, atol=0)


def test_forward_equals_unsharded(run_in_group, topk_path) -> None:
    run_in_group(_check_forward)


def _loss(sae, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """FVU + activation decay + AuxK: every path a gradient takes through a top-k training loss."""
    ctx = TrainingContext(activation_decay=0.1, auxk_coefficient=0.5, k_aux=6)
    terms = sae.training_loss(x, sae(x), ctx, lambda: dead)
    return sum(term.weighted() for term in terms.values())


def _gathered_grads(shard: ShardedTopKSAE) -> dict[str, torch.Tensor]:
    grads = {}
    for name in ("W_enc", "b_enc", "W_dec"):
        local = getattr(shard, name).grad
        parts = [torch.empty_like(local) for _ in range(WORLD)]
        dist.all_gather(parts, local)
        grads[name] = torch.cat(parts)
    grads["b_dec"] = shard.b_dec.grad
    return grads


def _check_gradients(rank: int, dead_latents: list[int]) -> None:
    full, x = full_sae(), batch()
    dead = torch.zeros(N, dtype=torch.bool)
    dead[dead_latents] = True
    shard = ShardedTopKSAE.from_full(full)
    _loss(full, x, dead).backward()
    _loss(shard, x, dead).backward()
    grads = _gathered_grads(shard)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, getattr(full, name).grad, msg=lambda m, n=name: f"{n}: {m}")
    # b_dec's gradient is the same on every rank, bit for bit.
    others = [torch.empty_like(shard.b_dec.grad) for _ in range(WORLD)]
    dist.all_gather(others, shard.b_dec.grad)
    assert all(torch.equal(o, others[0]) for o in others)


@pytest.mark.parametrize(
    "dead_latents",
    [list(range(0, N, 3)), [1, 2, 5]],  # dead on both shards; dead only on rank 0 (rank 1 has no candidate)
    ids=["dead_everywhere", "dead_on_one_shard"],
)
def test_gradients_equal_unsharded(run_in_group, dead_latents: list[int]) -> None:
    run_in_group(_check_gradients, dead_latents)


def _train_step(sae, optimizer: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor, clip: float) -> None:
    """The trainer's step: backward, project decoder grads, clip (global norm), Adam, renormalise decoders."""
    optimizer.zero_grad(set_to_none=True)
    _loss(sae, x, dead).backward()
    project_out_parallel_grad(sae.decoder_matrices(), "per_unit")
    if isinstance(sae, ShardedTopKSAE):
        sae.clip_grad_norm_(clip)
    else:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
    optimizer.step()
    normalize_decoder(sae.decoder_matrices(), "per_unit")


def _check_adam_steps(rank: int) -> None:
    full = full_sae()
    normalize_decoder([full.W_dec.data], "per_unit")
    shard = ShardedTopKSAE.from_full(full)
    opt_full = torch.optim.Adam(full.parameters(), lr=1e-2)
    opt_shard = torch.optim.Adam(shard.parameters(), lr=1e-2)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::5] = True
    for step in range(3):
        x = batch(seed=10 + step)
        _train_step(full, opt_full, x, dead, clip=0.05)  # small enough that clipping is active
        _train_step(shard, opt_shard, x, dead, clip=0.05)
    gathered = shard.to_full()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(gathered, name), getattr(full, name), msg=lambda m, n=name: f"{n}: {m}")


def test_adam_steps_with_clipping_and_decoder_constraint_equal_unsharded(run_in_group) -> None:
    run_in_group(_check_adam_steps)


def _check_memory_and_save(rank: int, folder: str) -> None:
    full = full_sae()
    shard = ShardedTopKSAE.from_full(full)
    for name in ("W_enc", "b_enc", "W_dec"):
        assert getattr(shard, name).numel() * WORLD == getattr(full, name).numel()
    assert shard.b_dec.shape == full.b_dec.shape
    rng = torch.random.get_rng_state()
    assert (shard.to_full(root_only=True) is None) == (rank != 0)
    assert torch.equal(torch.random.get_rng_state(), rng)  # gathering does not move the caller's random stream
    shard.save(folder)
    loaded = load_sae(folder)
    assert type(loaded) is TopKSAE
    for name, tensor in full.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_memory_per_rank_and_save_as_full_topk(run_in_group, tmp_path: Path) -> None:
    run_in_group(_check_memory_and_save, str(tmp_path / "sae"))


def _check_fresh_init(rank: int) -> None:
    torch.manual_seed(0)
    shard = ShardedTopKSAE(TopKSAEConfig(d_in=D, n_latents=N, k=K))
    full = shard.to_full()
    # The ranks share the seed but not their rows; every decoder row starts at unit norm.
    half = N // WORLD
    assert not torch.allclose(full.W_enc[:half], full.W_enc[half:])
    torch.testing.assert_close(full.W_dec.norm(dim=1), torch.ones(N))
    counts = fire_counts(shard(batch()).latents)
    assert counts.shape == (N,) and int(counts.sum()) == B * K


def test_fresh_init_differs_per_rank(run_in_group) -> None:
    run_in_group(_check_fresh_init)


def test_select_topk_breaks_ties_by_lower_index() -> None:
    values = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]])
    indices = torch.tensor([[7, 9, 4, 1, 6]])
    chosen_values, chosen = select_topk(values, indices, 2)
    assert chosen.tolist() == [[4, 6]] and chosen_values.tolist() == [[2.0, 2.0]]


def test_needs_an_initialised_process_group() -> None:
    from saelab.errors import ConfigError

    with pytest.raises(ConfigError, match="torch.distributed"):
        ShardedTopKSAE(TopKSAEConfig(d_in=D, n_latents=N, k=K))
