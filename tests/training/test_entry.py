"""`saelab train`: the architecture-independent SAE spec (deep fields included) and the deep-SAE recipe preset."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.activations.writer import StoreWriter
from saelab.cli import main
from saelab.errors import ConfigError
from saelab.saes import DeepSAE, TopKSAE, load_sae
from saelab.saes.spec import SAESpec
from saelab.training.config import DEEP_SAE_RECIPE
from saelab.training.entry import TrainConfig, sae_for_store

D = 8


@pytest.fixture
def store(tmp_path):
    writer = StoreWriter(tmp_path / "store", model="synthetic", hookpoints=["resid_post.0"], dtype="float32",
                         context_length=4, shard_tokens=64)
    n = 32 * 4
    writer.append({"resid_post.0": torch.randn(n, D) * 3 + 1}, torch.arange(n) % 50, torch.arange(n) % 4,
                  torch.arange(n) // 4, n_contexts=32)
    return writer.finish()


def test_spec_builds_a_deep_sae_and_leaves_unset_fields_to_the_architecture(store) -> None:
    sae = sae_for_store(SAESpec(architecture="deep", n_latents=24, k=3, encoder_multiples=[2.0, 1.5],
                            preprocessing="token_l2", tied_init=False), store, "resid_post.0")
    assert isinstance(sae, DeepSAE) and sae.cfg.encoder_multiples == [2.0, 1.5] and not sae.cfg.tied_init
    assert sae.cfg.hookpoint == "resid_post.0" and sae.cfg.model_name == "synthetic"
    default_depth = sae_for_store(SAESpec(architecture="deep", n_latents=24, k=3), store, "resid_post.0")
    assert default_depth.cfg.encoder_multiples == [2.0]  # DeepSAEConfig's own default
    assert isinstance(sae_for_store(SAESpec(n_latents=24, k=3), store, "resid_post.0"), TopKSAE)


def test_deep_fields_on_another_architecture_are_an_error(store) -> None:
    with pytest.raises(ConfigError, match="sae.encoder_multiples does not apply to architecture 'topk'"):
        sae_for_store(SAESpec(n_latents=24, k=3, encoder_multiples=[2.0]), store, "resid_post.0")


def test_deep_sae_preset_is_the_writeups_recipe_under_explicit_fields() -> None:
    cfg = TrainConfig.from_dict({"preset": "deep_sae", "trainer": {"lr": 1e-3}, "sae": {"n_latents": 64}})
    assert (cfg.sae.architecture, cfg.sae.encoder_multiples, cfg.sae.preprocessing) == ("deep", [2.0], "token_l2")
    assert cfg.sae.n_latents == 64 and cfg.trainer.lr == 1e-3
    recipe = {k: v for k, v in DEEP_SAE_RECIPE.items() if k != "lr"}
    assert {k: getattr(cfg.trainer, k) for k in recipe} == recipe
    assert TrainConfig.from_dict({}).trainer.optimizer == "adam"  # no preset, no recipe


def test_train_command_with_the_preset(store, tmp_path) -> None:
    out = tmp_path / "run"
    code = main(["train", "--preset", "deep_sae", "--store", str(store.path), "--out-dir", str(out),
                 "--sae.n-latents", "24", "--sae.k", "3", "--sae.encoder-multiples", "2,1.5",
                 "--trainer.total-tokens", "96", "--trainer.batch-size", "32", "--trainer.progress", "false"])
    assert code == 0
    sae = load_sae(out / "sae", preprocessing="token_l2")
    assert isinstance(sae, DeepSAE) and [w.shape[0] for w in sae.W_enc] == [16, 12, 24]
    saved = json.loads((out / "config.json").read_text())["command"]
    assert saved["preset"] == "deep_sae" and saved["trainer"]["optimizer"] == "masked_adam"
    for weight in sae.decoder_matrices():
        torch.testing.assert_close(weight.norm(dim=1), torch.ones(weight.shape[0]))
