"""The shared interface: preprocessing round trips, latents, and every way a saved SAE folder can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from saelab.errors import CheckpointError, ConfigError
from saelab.saes import SparseLatents, TopKSAE, TopKSAEConfig, architectures, create_sae, load_sae


def _saved(tmp_path, **fields) -> TopKSAE:
    sae = TopKSAE(TopKSAEConfig(d_in=6, n_latents=12, k=3, **fields))
    sae.save(tmp_path)
    return sae


def test_builtin_architectures_are_registered_on_import() -> None:
    assert {"topk", "relu"} <= set(architectures())


def test_token_l2_normalise_denormalise_round_trip() -> None:
    sae = TopKSAE(TopKSAEConfig(d_in=6, n_latents=12, k=3, preprocessing="token_l2"))
    x = 5.0 * torch.randn(4, 7, 6) + 3.0
    x_n, stats = sae.normalize(x)
    torch.testing.assert_close(x_n.mean(-1), torch.zeros(4, 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(x_n.norm(dim=-1), torch.ones(4, 7))
    torch.testing.assert_close(sae.denormalize(x_n, stats), x)


def test_no_preprocessing_is_identity() -> None:
    sae = TopKSAE(TopKSAEConfig(d_in=6, n_latents=12, k=3))
    x = torch.randn(3, 6)
    x_n, stats = sae.normalize(x)
    assert x_n is x and sae.denormalize(x_n, stats) is x


def test_sparse_latents_to_dense() -> None:
    latents = SparseLatents(torch.tensor([[2.0, 1.0]]), torch.tensor([[3, 0]]), 5)
    assert torch.equal(latents.to_dense(), torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0]]))


def test_wrong_preprocessing_request_is_a_config_error(tmp_path) -> None:
    _saved(tmp_path, preprocessing="token_l2")
    with pytest.raises(ConfigError, match="preprocessing='token_l2'"):
        load_sae(tmp_path, preprocessing="none")


def test_truncated_weights_are_a_checkpoint_error(tmp_path) -> None:
    _saved(tmp_path)
    weights = tmp_path / TopKSAE.weights_file
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_sae(tmp_path)


def test_missing_or_misshapen_tensors_are_a_checkpoint_error(tmp_path) -> None:
    sae = _saved(tmp_path)
    state = {name: t.contiguous() for name, t in sae.state_dict().items()}
    weights = tmp_path / TopKSAE.weights_file
    save_file({k: v for k, v in state.items() if k != "b_enc"}, str(weights))
    with pytest.raises(CheckpointError, match=r"missing \['b_enc'\]"):
        load_sae(tmp_path)
    save_file({**state, "W_dec": torch.zeros(12, 5)}, str(weights))
    with pytest.raises(CheckpointError, match="W_dec: \\(12, 5\\) != \\(12, 6\\)"):
        load_sae(tmp_path)


def test_folder_without_cfg_or_weights_or_with_unknown_architecture(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no cfg.json"):
        load_sae(tmp_path)
    _saved(tmp_path)
    (tmp_path / TopKSAE.weights_file).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_sae(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "nope"}))
    with pytest.raises(CheckpointError, match="unknown architecture 'nope'"):
        load_sae(tmp_path)


def test_create_sae_by_name() -> None:
    sae = create_sae("relu", d_in=4, n_latents=8, tied=True)
    assert sae.architecture == "relu" and sae.cfg.tied
    with pytest.raises(ConfigError, match="unknown field"):
        create_sae("topk", d_in=4, n_latents=8, tied=True)
