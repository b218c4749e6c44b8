"""The load-time self-check on a tiny Llama's real activations: an SAE that fits them passes; one read at the wrong
hookpoint kind, without its scaling factor, or with k misread fails naming the cause and `--self-check false`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab.activations.store import ActivationStore
from saelab.errors import ConfigError
from saelab.saes.batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.saes.self_check import self_check
from saelab.saes.topk import TopKSAE, TopKSAEConfig


@pytest.fixture
def tiny_store(saved_tiny_llama, tmp_path: Path):
    """(model folder, corpus, store of resid_post.0 and mlp_out.0) of a random 3-layer Llama (d = 32)."""
    from saelab.cli import main

    model_dir, corpus = saved_tiny_llama()
    assert main(["harvest", "--model", str(model_dir), "--hookpoints", "resid_post.0,mlp_out.0", "--data.source",
                 str(corpus), "--data.context-length", "16", "--data.n-tokens", "600",
                 "--out-dir", str(tmp_path / "store")]) == 0
    return model_dir, corpus, ActivationStore(tmp_path / "store")


def _pca_dictionary(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """±(the top-r principal directions of x) and x's mean: exactly one of each ± pair is positive per token, and
    decoding them gives the mean plus the PCA projection (what an SAE trained on x at least achieves)."""
    mean = x.mean(0)
    u = torch.linalg.svd(x - mean, full_matrices=False).Vh[:r]
    return torch.cat([u, -u]), mean


def _fitted(cls, cfg, x: torch.Tensor, r: int, scale: float = 1.0):
    directions, mean = _pca_dictionary(x * scale, r)
    sae = cls(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(directions)
        sae.W_dec.copy_(directions)
        sae.b_enc.zero_()
        sae.b_dec.copy_(mean)
    return sae.eval()


def test_a_fitting_sae_passes_and_reports_what_it_measured(tiny_store) -> None:
    *_, store = tiny_store
    x = store.load("resid_post.0")
    relu = _fitted(ReluSAE, ReluSAEConfig(d_in=32, n_latents=48, hookpoint="resid_post.0"), x, 24)
    found = self_check(relu, x[:512], source="relu")
    assert found["fvu"] < 0.2 and found["tokens"] == 512 and "expected_l0" not in found
    topk = _fitted(TopKSAE, TopKSAEConfig(d_in=32, n_latents=48, k=24), x, 24)
    assert self_check(topk, x, source="topk")["l0"] == pytest.approx(24)
    scale = 32 ** 0.5 / float(x.norm(dim=-1).mean())
    scaled = _fitted(ReluSAE, ReluSAEConfig(d_in=32, n_latents=48, preprocessing="scale", input_scale=scale), x, 24,
                     scale)
    found = self_check(scaled, x, source="scaled")
    assert found["input_norm"] == pytest.approx(found["expected_input_norm"], rel=1e-4) and found["fvu"] < 0.2


def test_the_wrong_hookpoint_kind_fails_with_fvu_above_one(tiny_store) -> None:
    *_, store = tiny_store
    sae = _fitted(ReluSAE, ReluSAEConfig(d_in=32, n_latents=48, hookpoint="resid_post.0"), store.load("resid_post.0"),
                  24)
    with pytest.raises(ConfigError, match=r"FVU = [\d.]+ >= 1.*hookpoint kind.*--self-check false"):
        self_check(sae, store.load("mlp_out.0"), source="sae", hookpoint="mlp_out.0")


def test_a_missing_scaling_factor_fails_on_the_input_norm(tiny_store) -> None:
    *_, store = tiny_store
    x = store.load("resid_post.0")
    scale = 32 ** 0.5 / float(x.norm(dim=-1).mean())  # about 49 here
    sae = _fitted(ReluSAE, ReluSAEConfig(d_in=32, n_latents=48, preprocessing="scale", input_scale=1.0), x, 24, scale)
    with pytest.raises(ConfigError, match=r"mean norm [\d.]+, [\d.]+x off the sqrt\(d_in\).*scaling factor"):
        self_check(sae, x, source="sae")


def test_a_misread_k_fails_on_the_l0(tiny_store) -> None:
    *_, store = tiny_store
    x = store.load("resid_post.0")
    # 16 principal directions ±: 16 latents are positive on every token, so k=32 can only ever pick 16
    with pytest.raises(ConfigError, match=r"mean L0 is 16, outside \[28.8, 32\] that k=32 implies"):
        self_check(_fitted(TopKSAE, TopKSAEConfig(d_in=32, n_latents=32, k=32), x, 16), x, source="topk")
    batchtopk = _fitted(BatchTopKSAE, BatchTopKSAEConfig(d_in=32, n_latents=48, k=4), x, 24)
    batchtopk.threshold.fill_(0.0)  # a threshold that keeps 24 latents a token, not about k=4
    with pytest.raises(ConfigError, match=r"mean L0 is 24, outside \[2, 8\] that k=4 implies.*threshold dropped"):
        self_check(batchtopk, x, source="batchtopk")


def test_evaluate_opens_hub_sources_and_stops_on_a_misfit_sae(tiny_store, tmp_path: Path, capsys,
                                                               hub_cache) -> None:
    from saelab.cli import main
    from saelab.saes.formats import write

    model_dir, corpus, store = tiny_store
    sae = _fitted(ReluSAE, ReluSAEConfig(d_in=32, n_latents=48, hookpoint="resid_post.0"), store.load("resid_post.0"),
                  24)
    sae.save(tmp_path / "fits")
    write(sae, tmp_path / "saelens", to="saelens")  # also as a SAELens folder in a hub repository
    sae.cfg.hookpoint = "blocks.0.hook_mlp_out"  # trained on resid_post.0, labelled as mlp_out.0
    sae.save(tmp_path / "mislabelled")
    common = ["--store", str(store.path), "--downstream", "false"]
    assert main(["evaluate", "--sae-dir", str(tmp_path / "fits"), *common, "--out-dir", str(tmp_path / "a")]) == 0
    # its TransformerLens hook name is read canonically
    hub_cache.add("someone/tiny-saes", hub_cache.files(tmp_path / "saelens", "layer_0/relu"))
    assert main(["evaluate", "--sae-dir", "hf:someone/tiny-saes/layer_0/relu", *common,
                 "--out-dir", str(tmp_path / "hub")]) == 0
    from_hub = json.loads((tmp_path / "hub" / "summary.json").read_text())
    assert from_hub["hookpoint"] == "resid_post.0"
    assert from_hub["fvu"] == pytest.approx(json.loads((tmp_path / "a" / "summary.json").read_text())["fvu"],
                                            rel=1e-4)
    assert main(["evaluate", "--sae-dir", str(tmp_path / "mislabelled"), *common,
                 "--out-dir", str(tmp_path / "b")]) != 0
    assert "FVU = " in capsys.readouterr().err
    assert not (tmp_path / "b" / "summary.json").exists()
    assert main(["evaluate", "--sae-dir", str(tmp_path / "mislabelled"), *common, "--self-check", "false",
                 "--out-dir", str(tmp_path / "c")]) == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["hookpoint"] == "mlp_out.0" and summary["fvu"] > 1


def test_evaluate_checks_saes_the_store_lacks_on_the_models_own_activations(tiny_store, tmp_path: Path,
                                                                            capsys) -> None:
    from saelab.cli import main

    model_dir, corpus, store = tiny_store
    sae = _fitted(ReluSAE, ReluSAEConfig(d_in=32, n_latents=48, hookpoint="resid_post.1"), store.load("resid_post.0"),
                  24)  # the tiny Llama's residual stream barely changes from layer 0 to 1
    sae.save(tmp_path / "fits")
    sae.cfg.hookpoint = "mlp_out.1"  # neither is in the store: both are checked on activations the model computes
    sae.save(tmp_path / "mislabelled")
    common = ["--store", str(store.path), "--model", str(model_dir), "--data.source", str(corpus),
              "--data.context-length", "16", "--data.n-tokens", "120", "--data.drop-first-positions", "1"]
    assert main(["evaluate", "--sae-dirs", str(tmp_path / "fits"), *common, "--out-dir", str(tmp_path / "a")]) == 0
    assert main(["evaluate", "--sae-dirs", str(tmp_path / "mislabelled"), *common,
                 "--out-dir", str(tmp_path / "b")]) != 0
    assert "at mlp_out.1" in capsys.readouterr().err
