import json

import pytest

from saelab.errors import CheckpointError, ConfigError
from saelab.experiments.connectors.connector import ConnectorConfig
from saelab.experiments.connectors.run_mnist import MnistConnectorsConfig, MnistSAEConfig, run
from saelab.models.mnist_mlp import MnistMLPConfig, MnistTrainConfig


def tiny_config() -> MnistConnectorsConfig:
    return MnistConnectorsConfig(
        model=MnistMLPConfig(hidden=16, n_layers=4),
        train=MnistTrainConfig(epochs=4, batch_size=64),
        sae=MnistSAEConfig(expansion=2, epochs=2, batch_size=128, warmup_steps=5),
        connector=ConnectorConfig(epochs=2),
        train_limit=2000,
        test_limit=500,
    )


def test_tiny_run_writes_every_result(tmp_path, open_page, shows_values) -> None:
    cfg = tiny_config()
    results = run(cfg.replace(out_dir=str(tmp_path)))

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["spans"] == results["spans"] and MnistConnectorsConfig.load(tmp_path / "config.json") == cfg.replace(
        out_dir=str(tmp_path)
    )
    spans = {(s["start"], s["end"]): s for s in results["spans"]}
    assert sorted(spans) == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]
    assert all(0.0 <= s["accuracy"] <= 1.0 and s["loss"] > 0 for s in spans.values())
    assert results["base"]["accuracy"] > 0.6  # four epochs on 2000 images; chance is 0.1

    headline = results["headline"]
    assert headline["two_layers_replaced_span"] == [1, 3]
    assert headline["two_layers_replaced_accuracy"] == spans[(1, 3)]["accuracy"]
    counts = results["weight_counts"]
    assert [row["layers"] for row in counts["per_layer"]] == ["1->2", "2->3"]
    assert counts["total"]["neuron_total"] == 2 * 16 * 16 and counts["total"]["feature_total"] == 2 * 32 * 32
    assert headline["fewer_large_weights_between_features"] == (
        counts["total"]["feature_large"] < counts["total"]["neuron_large"]
    )

    assert set(results["saes"]) == {"tied", "untied"}
    assert all(set(m) >= {"fvu", "l0", "l1", "spliced_accuracy"} for m in results["saes"]["tied"].values())
    for k in (1, 2):
        connector = results["connectors"][k]
        assert len(connector["train_curve"]) == 2 and connector["init"] == "random"
        assert connector["init_smart"]["init"] == "smart"  # compare_inits trains the other initialisation too
        assert (tmp_path / "connectors" / f"connector_{k}_to_{k + 1}.safetensors").exists()
    for paths in results["figures"].values():
        assert paths and all(path.endswith(".png") and (tmp_path / path.split("/")[-1]).exists() for path in paths)
    assert (tmp_path / "report.html").read_text().count("<img") == 4
    page, _ = open_page(tmp_path / "report.html")
    shows_values(page, headline)
    assert (tmp_path / "model" / "model.safetensors").exists()

    # A rerun reuses the network, the SAEs and the connectors, and reaches the same results.
    trained = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.safetensors") if "epochs" not in path.name}
    assert len([path for path in trained if path.parent.name == "sae"]) == 2 * 3
    again = run(cfg.replace(out_dir=str(tmp_path)))
    assert {path: path.stat().st_mtime_ns for path in trained} == trained
    for key in ("base", "mlp_train_losses", "saes", "connectors", "spans", "headline", "weight_counts"):
        assert again[key] == results[key]
    with pytest.raises(CheckpointError, match=r"network trained with other settings \(train differ"):
        run(cfg.replace(out_dir=str(tmp_path), train=MnistTrainConfig(epochs=5, batch_size=64)))


def test_connect_variant_must_be_trained() -> None:
    with pytest.raises(ConfigError, match="connect_variant='untied' is not among"):
        MnistSAEConfig(variants=["tied"], connect_variant="untied").validate()
