import json

import numpy as np
import pytest
import torch

import saelab.interp.record as record_module
from saelab.errors import StoreError
from saelab.interp.record import LatentRecord, covered_tokens, record_latents
from saelab.saes import create_sae


def _sparse_latents(n_contexts: int = 6, length: int = 8, n: int = 5) -> torch.Tensor:
    latents = torch.randn(n_contexts, length, n)
    return latents * (torch.rand(n_contexts, length, n) < 0.3)


def test_record_holds_every_nonzero_activation_with_its_token(make_record) -> None:
    keep = torch.ones(6, 8, dtype=torch.bool)
    keep[:, 0] = False  # like a dropped BOS: not stored, so not recorded
    synthetic = make_record(_sparse_latents(), keep=keep)
    record, store = synthetic.record, synthetic.store
    stored = store.load("resid_post.0")  # the identity SAE's latent values are the stored activations
    assert record.n_tokens == store.n_tokens == 6 * 7
    assert record.counts.tolist() == (stored > 0).sum(0).tolist()
    np.testing.assert_allclose(record.frequency, (stored > 0).float().mean(0).numpy())
    for latent in range(5):
        tokens, values = record.activations(latent)
        expected = torch.nonzero(stored[:, latent] > 0).squeeze(1)
        assert tokens.tolist() == expected.tolist()
        np.testing.assert_allclose(values, stored[expected, latent].numpy())
    assert len(record._manifest["shards"]) == 6  # 42 tokens in chunks of 7
    np.testing.assert_allclose(record.maxima, stored.max(0).values.clamp_min(0).numpy())


def test_top_k_latents_are_recorded_sparsely(make_record, tmp_path) -> None:
    synthetic = make_record(_sparse_latents())
    sae = create_sae("topk", d_in=5, n_latents=12, k=3, hookpoint="resid_post.0")
    record = record_latents(sae, synthetic.store, tmp_path / "topk", "resid_post.0", show_progress=False)
    dense = sae.encode(synthetic.store.load("resid_post.0")).to_dense()
    assert record.counts.tolist() == (dense > 0).sum(0).tolist()
    tokens, values = record.activations(int(record.counts.argmax()))
    np.testing.assert_allclose(values, dense[tokens, int(record.counts.argmax())].detach().numpy(), rtol=1e-6)


def test_interrupted_record_resumes_to_the_same_files(make_record, monkeypatch) -> None:
    full = make_record(_sparse_latents(), name="full")
    original = record_module._encode_chunk
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(record_module, "_encode_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        record_latents(full.sae, full.store, full.record_dir.parent / "partial", "resid_post.0", chunk_tokens=7,
                       show_progress=False)
    partial_dir = full.record_dir.parent / "partial"
    manifest = json.loads((partial_dir / "record.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        LatentRecord(partial_dir)

    resumed = record_latents(full.sae, full.store, partial_dir, "resid_post.0", chunk_tokens=7, show_progress=False)
    assert calls["n"] == 3 + 5  # 48 tokens = 7 chunks of 7: only the 5 missing ones were encoded again
    assert resumed._manifest["shards"] == full.record._manifest["shards"]  # same ranges, same sha256
    for latent in range(5):
        np.testing.assert_array_equal(resumed.activations(latent)[1], full.record.activations(latent)[1])


def test_a_record_of_another_sae_or_setting_is_refused(make_record) -> None:
    synthetic = make_record(_sparse_latents())
    other = create_sae("relu", d_in=5, n_latents=5, hookpoint="resid_post.0")
    with pytest.raises(StoreError, match="different SAE or store.*sae"):
        record_latents(other, synthetic.store, synthetic.record_dir, "resid_post.0", chunk_tokens=7,
                       show_progress=False)
    with pytest.raises(StoreError, match="chunk_tokens"):
        record_latents(synthetic.sae, synthetic.store, synthetic.record_dir, "resid_post.0", chunk_tokens=8,
                       show_progress=False)


def test_a_corrupted_shard_is_reported(make_record) -> None:
    synthetic = make_record(_sparse_latents())
    shard = synthetic.record_dir / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(StoreError, match="shard_00001.*truncated"):
        LatentRecord(synthetic.record_dir)


def test_max_tokens_is_cut_back_to_whole_contexts(make_record) -> None:
    synthetic = make_record(_sparse_latents(), name="cut", max_tokens=20)  # contexts of 8: 20 -> 16
    assert covered_tokens(synthetic.store, 20) == 16
    assert covered_tokens(synthetic.store, 24) == 24
    assert covered_tokens(synthetic.store, None) == 48
    assert synthetic.record.n_tokens == 16
    assert all(tokens.max(initial=0) < 16 for tokens, _ in map(synthetic.record.activations, range(5)))
    with pytest.raises(StoreError, match="whole context"):
        covered_tokens(synthetic.store, 5)
