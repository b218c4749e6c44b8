"""The streamed shuffle buffer: every kept token once per epoch, the right rows, bounded memory, exact seeking."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from saelab.activations.harvest import HarvestConfig, harvest, store_writer
from saelab.activations.stream import TOKEN_INDEX, ActivationStream
from saelab.data.tokenize import DataConfig, context_mask
from saelab.errors import ConfigError, HookpointError
from saelab.models.hooks import capture

T = 8
HOOKPOINTS = ["resid_post.0", "resid_post.2"]


@pytest.fixture
def model(word_tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(word_tokenizer), max_position_embeddings=T,
    )).eval()


def _contexts(n: int = 10) -> torch.Tensor:
    contexts = torch.randint(4, 100, (n, T), generator=torch.Generator().manual_seed(1))
    contexts[:, 0] = 0  # BOS, excluded with the other specials
    contexts[2, 4] = 1  # an EOS inside a context: excluded too, so contexts keep different counts
    return contexts


def _stream(model, tokenizer, **kw) -> ActivationStream:
    args = dict(batch_size=8, buffer_tokens=24, contexts_per_forward=3, seed=0, token_index=True)
    return ActivationStream(model, tokenizer, _contexts(), HOOKPOINTS, DataConfig(context_length=T), **{**args, **kw})


def test_every_kept_token_once_per_epoch_with_its_own_rows(model, word_tokenizer) -> None:
    stream = _stream(model, word_tokenizer)
    contexts = _contexts()
    keep = context_mask(DataConfig(context_length=T), word_tokenizer, contexts)
    n_kept = int(keep.sum())
    assert stream.epoch_tokens == n_kept == 10 * 7 - 1
    n_batches = 2 * n_kept // 8 + 6  # past the end of the second epoch, to a block boundary (multiple of 3 batches)
    batches = list(itertools.islice(stream.batches(), n_batches - n_batches % 3))
    index = torch.cat([b[TOKEN_INDEX] for b in batches])
    assert torch.equal(index.sort().values, torch.arange(len(index)))  # the endless sequence, each token once
    assert len(index) >= 2 * n_kept
    reference = capture(model, contexts, HOOKPOINTS, stop_early=False)
    for hp in HOOKPOINTS:
        rows = torch.cat([b[hp] for b in batches])
        assert all(b[hp].shape == (8, 16) and b[hp].dtype == torch.float32 for b in batches)
        torch.testing.assert_close(rows, reference[hp][keep][index % n_kept], atol=1e-5, rtol=1e-5)
    assert not torch.equal(index[:24], torch.arange(24))  # shuffled within the block
    assert stream.max_buffered_tokens == 24  # one block per hookpoint, however many tokens went through


def test_batches_from_a_step_equal_the_uninterrupted_sequence(model, word_tokenizer) -> None:
    whole = list(itertools.islice(_stream(model, word_tokenizer).batches(), 14))
    for start in (0, 4, 7, 9):  # block starts and mid-block steps
        later = list(itertools.islice(_stream(model, word_tokenizer).batches(start), 14 - start))
        for a, b in zip(whole[start:], later, strict=True):
            assert all(torch.equal(a[key], b[key]) for key in a)
    other_seed = next(_stream(model, word_tokenizer, seed=1).batches())
    assert not torch.equal(other_seed[TOKEN_INDEX], whole[0][TOKEN_INDEX])


def test_memory_does_not_grow_with_the_tokens_streamed(model, word_tokenizer) -> None:
    stream = _stream(model, word_tokenizer, buffer_tokens=20)  # rounded down to whole batches: 16
    assert stream.block_tokens == 16
    for _ in itertools.islice(stream.batches(), 60):  # seven epochs
        pass
    assert stream.max_buffered_tokens == 16
    assert stream.forward_tokens <= (60 * 8 // 16 + 1) * 2 * 3 * T  # at most two forward batches per block


def test_bad_settings_are_refused_before_anything_runs(model, word_tokenizer) -> None:
    with pytest.raises(HookpointError):
        ActivationStream(model, word_tokenizer, _contexts(), ["resid_post.9"], DataConfig(context_length=T),
                         batch_size=8)
    with pytest.raises(ConfigError, match="buffer_tokens=4 is less than one batch"):
        _stream(model, word_tokenizer, buffer_tokens=4)


@pytest.mark.parametrize("shard_tokens", [20, 200])  # shards flushed often (resume overlaps them) or never (a gap)
def test_the_cache_equals_a_harvest_also_after_a_resume(model, word_tokenizer, tmp_path, shard_tokens) -> None:
    data = DataConfig(context_length=T)

    def harvest_cfg(name: str, resume: bool = False) -> HarvestConfig:
        return HarvestConfig(out_dir=str(tmp_path / name), model="tiny", hookpoints=HOOKPOINTS, data=data,
                             batch_size=3, dtype="float32", shard_tokens=shard_tokens, resume=resume)

    harvested = harvest(model, word_tokenizer, _contexts(), harvest_cfg("harvest"), show_progress=False)
    first = _stream(model, word_tokenizer, writer=functools.partial(store_writer, harvest_cfg("cache"), _contexts()))
    for _ in itertools.islice(first.batches(), 5):  # into the second block; the run stops here
        pass
    again = _stream(model, word_tokenizer,
                    writer=functools.partial(store_writer, harvest_cfg("cache", resume=True), _contexts()))
    for _ in itertools.islice(again.batches(3), 3):  # resumed from the checkpoint at step 3
        pass
    cached = again.finish_cache()
    assert cached.n_tokens == harvested.n_tokens == 69 and cached.manifest["complete"]
    for name in ("harvest", "cache"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(p.name for p in harvested.path.iterdir())
    for hp in HOOKPOINTS:
        assert torch.equal(cached.load(hp), harvested.load(hp))
    assert cached.manifest["shards"] == harvested.manifest["shards"]
