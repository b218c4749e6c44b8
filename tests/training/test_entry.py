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


def _small_run(store, out, **trainer) -> list[str]:
    args = ["train", "--store", str(store.path), "--out-dir", str(out), "--sae.n-latents", "16", "--sae.k", "2",
            "--trainer.total-tokens", "96", "--trainer.batch-size", "32", "--trainer.progress", "false"]
    return args + [item for key, value in trainer.items() for item in (f"--trainer.{key}", str(value))]


def test_a_finished_run_is_reused_only_when_asked_and_only_for_the_same_request(store, tmp_path) -> None:
    out = tmp_path / "run"
    assert main(_small_run(store, out)) == 0
    assert json.loads((out / "done" / "train.json").read_text())["completed"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens_seen"] == 96 and "provenance" in summary and summary["timings_s"]["train"] >= 0
    weights = (out / "sae" / "sae_weights.safetensors").read_bytes()
    assert main(_small_run(store, out)) == 2  # no --resume: an earlier run is never overwritten silently
    assert main(_small_run(store, out) + ["--resume", "true"]) == 0
    assert (out / "sae" / "sae_weights.safetensors").read_bytes() == weights
    assert main(_small_run(store, out, lr=0.5) + ["--resume", "true"]) == 2  # another request


def test_two_identical_runs_write_identical_weights(store, tmp_path) -> None:
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 1000 + ord(name))  # the global generator must not matter
        assert main(_small_run(store, tmp_path / name)) == 0
    a, b = ((tmp_path / name / "sae" / "sae_weights.safetensors").read_bytes() for name in ("a", "b"))
    assert a == b


def test_train_ends_with_the_feature_browser_when_asked(saved_tiny_llama, tmp_path, open_page) -> None:
    from saelab.activations.harvest import HarvestConfig, harvest
    from saelab.data.tokenize import DataConfig
    from saelab.interp.record import LatentRecord
    from saelab.models.loading import load_model

    folder, _ = saved_tiny_llama(hidden_size=16, num_hidden_layers=2)
    model, tokenizer = load_model(str(folder), "cpu", torch.float32)
    contexts = torch.randint(4, 100, (24, 12))
    contexts[:, 0] = tokenizer.bos_token_id
    harvest_cfg = HarvestConfig(out_dir=str(tmp_path / "lm-store"), model=str(folder), hookpoints=["resid_post.1"],
                                data=DataConfig(context_length=12), batch_size=8, dtype="float32")
    harvest(model, tokenizer, contexts, harvest_cfg, show_progress=False)
    out = tmp_path / "run"
    assert main(["train", "--store", harvest_cfg.out_dir, "--out-dir", str(out), "--sae.n-latents", "16",
                 "--sae.k", "2", "--trainer.total-tokens", "96", "--trainer.batch-size", "32",
                 "--trainer.progress", "false", "--features-tokens", "120"]) == 0
    record = LatentRecord(out / "features" / "record")
    assert record.n_tokens <= 120 and record.n_latents == 16
    page, _ = open_page((out / "features" / "index.html").as_uri() + "#sort=count&dir=desc",
                        ready="document.body.dataset.ready")
    shown = page.evaluate("Array.from(document.querySelectorAll('#latents tbody tr')).map(r => "
                          "+r.cells[2].textContent)")
    assert shown == sorted(record.counts.tolist(), reverse=True)
    with pytest.raises(ConfigError, match="--features-tokens needs --store"):
        TrainConfig(model="m", hookpoints=["resid_post.0"], features_tokens=10).validate()
