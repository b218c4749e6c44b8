import json
import shutil

import numpy as np
import pytest
import torch

from saelab.activations.normalize import estimate_norm_stats
from saelab.activations.store import ActivationStore
from saelab.activations.writer import StoreWriter
from saelab.errors import DataError, StoreError
from saelab.io import sha256_file


def _writer(path, **overrides) -> StoreWriter:
    kwargs = dict(
        model="synthetic",
        hookpoints=["resid_post.0", "resid_post.1"],
        dtype="float32",
        context_length=4,
        shard_tokens=10,
        config={"batch_size": 3, "data": {"corpus": "kjv"}},
        source={"contexts_sha256": "abc"},
        volatile=("batch_size",),
    )
    kwargs.update(overrides)
    return StoreWriter(path, **kwargs)


def _acts(n_contexts: int = 12, context_length: int = 4) -> dict[str, torch.Tensor]:
    n = n_contexts * context_length
    return {"resid_post.0": torch.randn(n, 6) * 3, "resid_post.1": torch.randn(n, 4)}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(make_store, dtype) -> None:
    written = make_store(dtype=dtype)
    store = written.store
    assert store.dtype == getattr(torch, dtype)
    assert store.n_tokens == 48
    for hp, x in written.activations.items():
        loaded = store.load(hp)
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, x.to(getattr(torch, dtype)).float())
    assert torch.equal(store.token_ids(), written.token_ids)
    assert torch.equal(store.positions(), written.positions)
    assert torch.equal(store.context_index(), written.context_index)
    assert np.load(store.path / "shard_00000" / "act.resid_post.0.npy", mmap_mode="r").dtype == np.dtype(dtype)
    assert np.load(store.path / "shard_00000" / "token_ids.npy").dtype == np.int32
    assert np.load(store.path / "shard_00000" / "context_index.npy").dtype == np.int64


def test_manifest_contents(tmp_path, append_contexts) -> None:
    acts = _acts()
    writer = _writer(tmp_path / "s")
    append_contexts(writer, acts, context_length=4, contexts_per_append=3, start=0)
    store = writer.finish()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest == store.manifest
    assert manifest["format"] == "saelab.activation_store" and manifest["format_version"] == 1
    assert manifest["model"] == "synthetic"
    assert manifest["hookpoints"] == ["resid_post.0", "resid_post.1"]
    assert manifest["dims"] == {"resid_post.0": 6, "resid_post.1": 4}
    assert manifest["dtype"] == "float32" and manifest["context_length"] == 4
    assert manifest["n_tokens"] == 48 and manifest["n_contexts"] == 12 and manifest["complete"] is True
    assert manifest["config"] == {"batch_size": 3, "data": {"corpus": "kjv"}}
    assert manifest["source"] == {"contexts_sha256": "abc"}
    assert set(manifest["versions"]) == {"saelab", "torch", "transformers", "numpy"}
    # 3 contexts x 4 tokens per append, shard closes once it holds >= 10 tokens: 12 tokens per shard
    assert [s["n_tokens"] for s in manifest["shards"]] == [12, 12, 12, 12]
    assert [s["contexts"] for s in manifest["shards"]] == [[0, 3], [3, 6], [6, 9], [9, 12]]
    for shard in manifest["shards"]:
        for entry in [*shard["activations"].values(), *shard["tokens"].values()]:
            file = tmp_path / "s" / entry["file"]
            assert entry["sha256"] == sha256_file(file) and entry["bytes"] == file.stat().st_size
    first_shard = acts["resid_post.0"][:12]
    expected = estimate_norm_stats(first_shard)
    stats = store.norm_stats("resid_post.0")
    assert stats.n_tokens == 12
    assert stats.scale == pytest.approx(expected.scale)
    assert torch.allclose(stats.mean, first_shard.mean(0), atol=1e-6)


def test_shard_holds_whole_appends(tmp_path, append_contexts) -> None:
    writer = _writer(tmp_path / "s", shard_tokens=20)
    append_contexts(writer, _acts(n_contexts=11), context_length=4, contexts_per_append=2, start=0)
    store = writer.finish()
    assert [s["n_tokens"] for s in store.manifest["shards"]] == [24, 20]
    assert [s["contexts"] for s in store.manifest["shards"]] == [[0, 6], [6, 11]]


def test_nan_raises_with_location_and_keeps_written_shards(tmp_path, append_contexts) -> None:
    acts = _acts()
    acts["resid_post.1"][7 * 4 + 2, 1] = float("nan")  # context 7, position 2: in the third append
    writer = _writer(tmp_path / "s")
    with pytest.raises(DataError, match=r"resid_post\.1.*context 7 position 2.*float32.*--resume"):
        append_contexts(writer, acts, context_length=4, contexts_per_append=3, start=0)
    store = ActivationStore(tmp_path / "s", require_complete=False)
    store.verify_all()
    assert store.n_tokens == 24 and store.manifest["n_contexts"] == 6
    assert torch.equal(store.load("resid_post.1"), acts["resid_post.1"][:24])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json", "shard_00000", "shard_00001"]


def test_float16_overflow_suggests_float32(tmp_path, append_contexts) -> None:
    acts = _acts()
    acts["resid_post.0"][5, 0] = 1e6
    writer = _writer(tmp_path / "s", dtype="float16")
    with pytest.raises(DataError, match=r"context 1 position 1.*exceed the float16 range.*--dtype float32"):
        append_contexts(writer, acts, context_length=4, contexts_per_append=3, start=0)


def test_append_rejects_wrong_hookpoints_and_dims(tmp_path) -> None:
    writer = _writer(tmp_path / "s", shard_tokens=1000)
    ids = torch.zeros(2, dtype=torch.long)
    writer.append({"resid_post.0": torch.randn(2, 6), "resid_post.1": torch.randn(2, 4)}, ids, ids, ids, 1)
    with pytest.raises(DataError, match=r"dimension 5, the store holds dimension 4"):
        writer.append({"resid_post.0": torch.randn(2, 6), "resid_post.1": torch.randn(2, 5)}, ids, ids, ids, 1)
    with pytest.raises(DataError, match=r"activations for \['resid_post.0'\] given"):
        writer.append({"resid_post.0": torch.randn(2, 6)}, ids, ids, ids, 1)
    with pytest.raises(DataError, match=r"shape \(3, 6\), expected \[2, d\]"):
        writer.append({"resid_post.0": torch.randn(3, 6), "resid_post.1": torch.randn(2, 4)}, ids, ids, ids, 1)


@pytest.mark.parametrize("bad", ["a/b", ".hidden", ""])
def test_rejects_hookpoint_names_that_escape_the_folder(tmp_path, bad) -> None:
    with pytest.raises(StoreError, match="cannot be stored"):
        _writer(tmp_path / "s", hookpoints=[bad])


def test_existing_store_needs_resume_and_same_settings(tmp_path, append_contexts) -> None:
    writer = _writer(tmp_path / "s")
    append_contexts(writer, _acts(n_contexts=6), context_length=4, contexts_per_append=3, start=0)
    with pytest.raises(StoreError, match=r"already holds an activation store \(partial, 6 contexts\).*--resume"):
        _writer(tmp_path / "s")
    with pytest.raises(StoreError, match=r"different settings \(dtype, config\.data\)"):
        _writer(tmp_path / "s", resume=True, dtype="float16", config={"batch_size": 3, "data": {"corpus": "x"}})
    with pytest.raises(StoreError, match=r"different settings \(source\)"):
        _writer(tmp_path / "s", resume=True, source={"contexts_sha256": "other"})
    resumed = _writer(tmp_path / "s", resume=True, config={"batch_size": 5, "data": {"corpus": "kjv"}})
    assert resumed.n_contexts == 6
    assert resumed.dims == {"resid_post.0": 6, "resid_post.1": 4}


def test_refuses_non_empty_folder_without_manifest(tmp_path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and holds no manifest.json"):
        _writer(tmp_path / "s")


def test_resume_redoes_a_deleted_shard_and_everything_after(tmp_path, append_contexts) -> None:
    acts = _acts()
    writer = _writer(tmp_path / "s")
    append_contexts(writer, acts, context_length=4, contexts_per_append=3, start=0)
    writer.flush()
    shutil.rmtree(tmp_path / "s" / "shard_00001")
    resumed = _writer(tmp_path / "s", resume=True)
    assert resumed.n_contexts == 3
    assert not (tmp_path / "s" / "shard_00002").exists()
    append_contexts(resumed, acts, context_length=4, contexts_per_append=3, start=resumed.n_contexts)
    store = resumed.finish()
    assert store.n_shards == 4
    assert torch.equal(store.load("resid_post.0"), acts["resid_post.0"])


def test_resume_refuses_a_corrupted_shard(tmp_path, append_contexts) -> None:
    writer = _writer(tmp_path / "s")
    append_contexts(writer, _acts(n_contexts=6), context_length=4, contexts_per_append=3, start=0)
    file = tmp_path / "s" / "shard_00000" / "positions.npy"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard_00000.*positions\.npy.*sha256.*delete that shard folder.*--resume"):
        _writer(tmp_path / "s", resume=True)


def test_finish_without_tokens_raises(tmp_path) -> None:
    writer = _writer(tmp_path / "s")
    ids = torch.zeros(0, dtype=torch.long)
    writer.append({"resid_post.0": torch.zeros(0, 6), "resid_post.1": torch.zeros(0, 4)}, ids, ids, ids, 2)
    with pytest.raises(DataError, match="no tokens were kept"):
        writer.finish()
