import json
import math

import pytest
import torch

from saelab.activations.store import ActivationStore
from saelab.errors import StoreError

HPS = ["resid_post.0", "resid_post.1"]


def test_missing_or_foreign_or_incomplete_store(tmp_path, make_store) -> None:
    with pytest.raises(StoreError, match="does not exist.*saelab harvest"):
        ActivationStore(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="is not an activation store"):
        ActivationStore(tmp_path / "empty")
    store = make_store().store
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["complete"] = False
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"incomplete.*after 12 contexts.*--resume"):
        ActivationStore(store.path)
    assert ActivationStore(store.path, require_complete=False).n_tokens == 48


def test_truncated_shard_is_reported_at_open(make_store) -> None:
    store = make_store().store
    file = store.path / "shard_00002" / "act.resid_post.1.npy"
    file.write_bytes(file.read_bytes()[:-16])
    fix = "delete that shard folder and re-run harvest with --resume"
    with pytest.raises(StoreError, match=rf"shard_00002.*truncated.*{fix}"):
        ActivationStore(store.path)


def test_flipped_byte_is_reported_on_first_read(make_store) -> None:
    store = make_store().store
    file = store.path / "shard_00001" / "act.resid_post.0.npy"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01
    file.write_bytes(bytes(data))
    opened = ActivationStore(store.path)  # sizes match: hashes are checked lazily
    assert opened.load("resid_post.0", 0, 12).shape == (12, 6)  # shard 0 is fine
    with pytest.raises(StoreError, match=r"shard_00001.*act\.resid_post\.0\.npy does not match its sha256.*--resume"):
        opened.load("resid_post.0", 0, 13)
    with pytest.raises(StoreError, match="shard_00001"):
        ActivationStore(store.path).verify_all()
    assert ActivationStore(store.path, verify=False).load("resid_post.0").shape == (48, 6)


def test_concatenation_and_layer_slices(make_store) -> None:
    written = make_store(dims={"resid_post.0": 6, "resid_post.1": 4, "mlp_out.1": 3})
    store = written.store
    order = ["mlp_out.1", "resid_post.0", "resid_post.1"]
    both = store.load(order)
    slices = store.layer_slices(order)
    assert slices == [slice(0, 3), slice(3, 9), slice(9, 13)]
    assert both.shape == (48, 13)
    for hp, sl in zip(order, slices, strict=True):
        assert torch.equal(both[:, sl], written.activations[hp])


def test_unknown_or_duplicate_hookpoint(make_store) -> None:
    store = make_store().store
    holds = r"holds \['resid_post\.0', 'resid_post\.1'\]"
    with pytest.raises(StoreError, match=rf"\['resid_post\.7'\] are not in store.*{holds}"):
        store.load(["resid_post.0", "resid_post.7"])
    with pytest.raises(StoreError, match="duplicates"):
        store.layer_slices(["resid_post.0", "resid_post.0"])


def test_ranges_cross_shard_boundaries(make_store) -> None:
    written = make_store()
    store = written.store
    assert torch.equal(store.load(HPS, 5, 31), torch.cat([written.activations[hp] for hp in HPS], 1)[5:31])
    assert torch.equal(store.context_index(11, 37), written.context_index[11:37])
    assert torch.equal(store.positions(-5, None), written.positions[-5:])
    assert store.load("resid_post.0", 30, 20).shape == (0, 6)


def test_normalize_is_opt_in_and_per_hookpoint(make_store) -> None:
    store = make_store().store
    raw = store.load(HPS)
    normalized = store.load(HPS, normalize=True)
    for hp, sl in zip(HPS, store.layer_slices(HPS), strict=True):
        stats = store.norm_stats(hp)
        assert torch.allclose(normalized[:, sl], raw[:, sl] * stats.scale)
        first_shard = normalized[:12, sl]  # statistics come from the first shard
        assert first_shard.norm(dim=1).mean().item() == pytest.approx(math.sqrt(store.dims[hp]), rel=1e-5)
        assert torch.allclose(stats.invert(normalized[:, sl]), raw[:, sl], atol=1e-5)


def test_store_without_contexts(make_store) -> None:
    store = make_store().store
    with pytest.raises(StoreError, match="written without its contexts.*build_contexts"):
        store.contexts()
    assert repr(store).endswith("48 tokens, float32, {resid_post.0: 6, resid_post.1: 4})")
