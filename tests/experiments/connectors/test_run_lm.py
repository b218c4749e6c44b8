"""The language-model connector recipe end to end on a tiny random Llama and a word-level tokenizer (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.data.tokenize import DataConfig
from saelab.errors import ConfigError
from saelab.experiments.connectors.connector import ConnectorConfig
from saelab.experiments.connectors.run_lm import LMConnectorsConfig, run
from saelab.training.config import TrainerConfig
from saelab.training.entry import SAESpec


def tiny_config(model: Path, corpus: Path, out: Path, **changes) -> LMConnectorsConfig:
    cfg = LMConnectorsConfig(
        out_dir=str(out), model=str(model), layer=1, layers=[0, 2], validation_tokens=200,
        data=DataConfig(source=str(corpus), context_length=16, drop_first_positions=2, n_tokens=2_400),
        analysis_tokens=500, downstream_contexts=4,
        sae=SAESpec(architecture="topk", n_latents=64, k=4, preprocessing="scale"),
        trainer=TrainerConfig(total_tokens=1_024, batch_size=128, warmup_steps=2, log_every_steps=2,
                              checkpoint_every_steps=None, progress=False),
        connector=ConnectorConfig(epochs=2, batch_size=128, lr=1e-3, l1_coefficient=0.0, mlp_hidden=32),
        reference=ConnectorConfig(form="residual", epochs=4, patience=1, batch_size=128, lr=1e-3, l1_coefficient=0.0,
                                  mlp_hidden=32),
        l1_sweep=[1e-4, 1e-3],
        n_shown=3, n_connections=2, min_frequency=0.0, record_tokens=600, n_examples=2, harvest_batch_size=32,
    )
    return cfg.replace(**changes)


def test_recipe_writes_linearity_ce_and_relations(saved_tiny_llama, tmp_path: Path, open_page,
                                                  shows_values) -> None:
    model, corpus = saved_tiny_llama(hidden_size=32, num_hidden_layers=3, n_documents=90)
    out = tmp_path / "run"
    results = run(tiny_config(model, corpus, out))

    saved = json.loads((out / "summary.json").read_text())
    assert saved["setup"]["sites"] == ["mlp_in.1", "mlp_out.1"]
    assert set(saved["connectors"]) == {"linear", "relu", "mlp", "residual"}
    assert set(saved["cross_entropy"]["ce"]) == {"clean", "sae_on_mlp_input", "sae_on_mlp_output", "both_saes",
                                                 "connector_linear", "connector_relu", "connector_mlp",
                                                 "transcoder", "mlp_zero_ablated"}
    assert set(saved["cross_entropy"]["kl"]) == set(saved["cross_entropy"]["ce"]) - {"clean"}
    # the transcoder row: the MLP's output predicted from its input, trained on the SAEs' tokens, FVU vs the output
    assert saved["transcoder"]["n_latents"] == saved["saes"]["out"]["n_latents"]
    assert 0 < saved["transcoder"]["heldout_fvu"] < 1.5
    assert (out / "layers" / "1" / "saes" / "transcoder" / "done" / "train.json").exists()
    linearity = saved["linearity"]
    assert 0.0 <= linearity["fraction_linear_absolute"] <= 1.0 and 0.0 <= linearity["fraction_linear_relative"] <= 1
    assert 0 < linearity["alive_output_features"] <= 64
    # per feature, the reference is one connector's error (linear, the corrected one, relu or mlp): the one of least
    # validation MSE, so the count of features per connector covers every alive feature
    per_feature = load_file(saved["files"]["per_feature"])
    reference, linear = per_feature["mse.reference"], per_feature["mse.linear"]
    forms = torch.stack([per_feature[f"mse.{name}"] for name in ("linear", "residual", "relu", "mlp")])
    assert ((forms == reference).any(dim=0)).all()
    chosen = linearity["reference"]["features_chosen_from"]
    assert set(chosen) == {"linear", "residual", "relu", "mlp"}
    assert sum(chosen.values()) == linearity["alive_output_features"]
    alive = per_feature["alive"]
    assert linearity["fraction_linear_absolute_vs_reference"] == pytest.approx(
        ((linear - reference)[alive] <= 1e-3).float().mean().item())
    relu = per_feature["mse.relu"]
    assert linearity["fraction_relu_linear_absolute_vs_reference"] == pytest.approx(
        ((relu - reference)[alive] <= 1e-3).float().mean().item())
    assert linearity["reference"]["features_worse_than_linear_on_test"] == int(((reference - linear)[alive] > 0).sum())
    # the per-layer table: every block, the main one's row its detailed figures
    assert [row["layer"] for row in saved["per_layer"]] == [0, 1, 2]
    main = saved["per_layer"][1]
    assert main["fraction_linear_vs_reference"] == linearity["fraction_linear_absolute_vs_reference"]
    assert main["fraction_linear_vs_mlp"] == linearity["fraction_linear_absolute"]
    assert main["fraction_linear_vs_relu"] == linearity["fraction_linear_absolute_vs_relu"]
    assert main["fraction_relu_linear_vs_reference"] == linearity["fraction_relu_linear_absolute_vs_reference"]
    for layer in (0, 2):
        assert (out / "layers" / str(layer) / "connectors" / "residual.safetensors").exists()
    # the L1 sweep: its coefficients and the main connector's, more L1 never more large weights here
    sweep = {row["l1_coefficient"]: row for row in saved["l1_sweep"]}
    assert set(sweep) == {0.0, 1e-4, 1e-3}
    # without L1 the linear connector is the least-squares map, untrained (the report says so in place of a loss)
    assert saved["connectors"]["linear"]["train_curve"] == []
    assert sweep[0.0]["test_mse_alive"] == pytest.approx(saved["connectors"]["linear"]["test_mse_alive"])
    assert sweep[0.0]["mean_row_l1"] > sweep[1e-3]["mean_row_l1"]
    assert 1 <= len(saved["relations"]) <= 3
    relation = saved["relations"][0]
    assert relation["formula"].startswith(f"OF{relation['output']['feature']} ≈ ")
    assert len(relation["inputs"]) == 2 and relation["output"]["top_contexts"]
    assert all("<<" in line for line in relation["output"]["top_contexts"])
    for name in ("linearity", "cross_entropy", "connections"):
        assert Path(saved["figures"][name]).exists()
    assert (out / "layers" / "1" / "connectors" / "linear.safetensors").exists()
    html = (out / "report.html").read_text()
    assert "Readable connections" in html and "mlp_zero_ablated" in html and "transcoder" in html
    assert "least squares" in html
    page, _ = open_page(out / "report.html")
    shows_values(page, {k: v for k, v in saved["linearity"].items() if k not in ("median_variance_explained",
                                                                                  "reference")})
    shows_values(page, saved["linearity"]["reference"])
    assert "Fraction of output features that are linear, per layer" in html and "L1 sweep" in html
    assert results["cross_entropy"] == saved["cross_entropy"]

    # A rerun reuses the store, the trained SAEs and connectors, and reaches the same figures.
    trained = {path: path.stat().st_mtime_ns for path in (out / "layers").rglob("*/connectors/*.safetensors")}
    again = run(tiny_config(model, corpus, out))
    assert {path: path.stat().st_mtime_ns for path in (out / "layers").rglob("*/connectors/*.safetensors")} == trained
    explained = saved["linearity"]["median_variance_explained"]
    assert again["linearity"]["median_variance_explained"] == pytest.approx(explained)
    assert again["cross_entropy"]["ce"]["both_saes"] == pytest.approx(saved["cross_entropy"]["ce"]["both_saes"])


def test_config_refuses_what_the_recipe_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="include linear and mlp"):
        LMConnectorsConfig().replace(forms=["linear", "relu"])
    with pytest.raises(ConfigError, match="token_l2"):
        LMConnectorsConfig().replace(sae=SAESpec(preprocessing="token_l2"))
    with pytest.raises(ConfigError, match="n_shown"):
        LMConnectorsConfig().replace(n_shown=0)


def test_budgets_small_is_the_defaults_and_full_scales_up() -> None:
    assert LMConnectorsConfig.from_dict({}) == LMConnectorsConfig()
    full = LMConnectorsConfig.from_dict({"budget": "full", "trainer": {"lr": 3e-4}})
    assert full.budget == "full" and full.data.n_tokens == 600_000 and full.trainer.total_tokens == 1_000_000
    assert full.trainer.lr == 3e-4 and full.trainer.batch_size == LMConnectorsConfig().trainer.batch_size
    assert LMConnectorsConfig().blocks() == [2, 6, 10] and full.blocks() == [2, 6, 10, 14, 18, 22]
    assert LMConnectorsConfig().replace(layer=3, layers=[5, 1]).blocks() == [1, 3, 5]
    with pytest.raises(ConfigError, match="reference.form"):
        LMConnectorsConfig().replace(reference=ConnectorConfig(form="mlp"))
