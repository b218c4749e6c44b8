import itertools

import pytest
import torch

from saelab.errors import ConfigError, DataError

HPS = ["resid_post.0", "resid_post.1"]


def _collect(stream) -> tuple[torch.Tensor, torch.Tensor]:
    batches, index = zip(*stream, strict=True)
    return torch.cat(batches), torch.cat(index)


def test_every_token_exactly_once_per_epoch_with_matching_rows(make_store) -> None:
    store = make_store(n_contexts=24, shard_tokens=10).store
    stream = store.batches(HPS, batch_size=7, drop_last=False, buffer_shards=2, return_index=True, epochs=2, seed=3)
    rows, index = _collect(stream)
    n = store.n_tokens
    assert len(index) == 2 * n
    for epoch in range(2):
        part = index[epoch * n : (epoch + 1) * n]
        assert torch.equal(part.sort().values, torch.arange(n))
    assert torch.equal(rows, store.load(HPS)[index])
    assert not torch.equal(index[:n], torch.arange(n))  # actually shuffled
    assert not torch.equal(index[:n], index[n:])  # a new order each epoch


def test_same_seed_same_order(make_store) -> None:
    store = make_store().store
    first = _collect(store.batches(HPS, 5, seed=1, return_index=True))[1]
    again = _collect(store.batches(HPS, 5, seed=1, return_index=True))[1]
    other = _collect(store.batches(HPS, 5, seed=2, return_index=True))[1]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_shards_are_the_ranks_slices_of_the_same_batches(make_store) -> None:
    store = make_store(n_contexts=24, shard_tokens=10).store
    whole = list(store.batches(HPS, batch_size=7, drop_last=False, seed=3, return_index=True))
    parts = [list(store.batches(HPS, batch_size=7, drop_last=False, seed=3, return_index=True).shard(rank, 3))
             for rank in range(3)]
    for step, (batch, index) in enumerate(whole):
        assert torch.equal(torch.cat([part[step][0] for part in parts]), batch)
        assert torch.equal(torch.cat([part[step][1] for part in parts]), index)
        assert [len(part[step][1]) for part in parts] == [len(index) // 3 + (r >= 3 - len(index) % 3) for r in
                                                           range(3)]
    with pytest.raises(ConfigError, match="rank 3 is not in"):
        store.batches(HPS, batch_size=7).shard(3, 3)


def test_drop_last_gives_full_batches_without_repeats(make_store) -> None:
    store = make_store().store  # 48 tokens
    stream = store.batches("resid_post.0", batch_size=10, return_index=True)
    batches = list(stream)
    assert [len(b) for b, _ in batches] == [10, 10, 10, 10]
    index = torch.cat([i for _, i in batches])
    assert len(set(index.tolist())) == 40


def test_unshuffled_is_store_order(make_store) -> None:
    store = make_store().store
    rows = torch.cat(list(store.batches(HPS, 5, shuffle=False, drop_last=False)))
    assert torch.equal(rows, store.load(HPS))


def test_pool_stays_bounded_by_buffer_shards(make_store) -> None:
    store = make_store(n_contexts=36, shard_tokens=12).store  # 12 shards of 12 tokens
    for buffer_shards in (1, 3):
        stream = store.batches(HPS, batch_size=5, buffer_shards=buffer_shards, drop_last=False)
        seen = []
        for _ in stream:
            seen.append(stream.resident_tokens)
        assert stream.capacity_tokens == buffer_shards * 12 + 5 - 1
        assert max(seen) <= stream.max_resident_tokens <= stream.capacity_tokens
        assert stream.max_resident_tokens >= buffer_shards * 12 - 5  # the pool does fill up to its size
        assert stream.resident_tokens == 0


def test_position_filter(make_store) -> None:
    written = make_store(context_length=8, n_contexts=10)
    stream = written.store.batches(HPS, batch_size=4, drop_last=False, position_filter=3, return_index=True)
    rows, index = _collect(stream)
    kept = torch.nonzero(written.positions >= 3).flatten()
    assert torch.equal(index.sort().values, kept)
    assert torch.equal(written.store.positions()[index].min(), torch.tensor(3))


def test_normalized_float32_on_device(make_store) -> None:
    store = make_store(dtype="float16").store
    rows, index = _collect(store.batches(HPS, 8, normalize=True, return_index=True))
    assert rows.dtype == torch.float32 and rows.device == torch.device("cpu")
    assert torch.allclose(rows, store.load(HPS, normalize=True)[index])


def test_endless_epochs(make_store) -> None:
    store = make_store().store  # 48 tokens: 4 batches of 12 per epoch
    batches = list(itertools.islice(store.batches("resid_post.1", 12, epochs=None), 4 * 5 + 1))
    assert len(batches) == 21


def test_too_few_tokens_and_bad_arguments(make_store) -> None:
    store = make_store().store
    with pytest.raises(DataError, match="no batch of 100 tokens.*drop_last=False"):
        next(store.batches(HPS, batch_size=100))
    assert len(next(store.batches(HPS, batch_size=100, drop_last=False))) == 48
    with pytest.raises(ConfigError, match="batch_size"):
        store.batches(HPS, batch_size=0)
    with pytest.raises(ConfigError, match="epochs"):
        store.batches(HPS, batch_size=2, epochs=0)
