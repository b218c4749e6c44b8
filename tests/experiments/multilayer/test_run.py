"""The multi-layer experiment end to end on a tiny random Llama and a word-level tokenizer (seconds, offline)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from saelab.activations.writer import StoreWriter
from saelab.cli import main
from saelab.config import add_config_arguments, config_from_args
from saelab.data.tokenize import DataConfig
from saelab.errors import ConfigError
from saelab.experiments.multilayer.run import MultiLayerConfig, layer_scales
from saelab.saes import MultiLayerSAE, MultiLayerSAEConfig, load_sae
from saelab.saes.multilayer import layer_hookpoints, segment_norms


@pytest.fixture
def tiny_setup(saved_tiny_llama) -> tuple[Path, Path]:
    return saved_tiny_llama(hidden_size=16, num_hidden_layers=4, n_documents=40)


def _args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["multilayer", "--out-dir", str(out), "--model", str(model), "--layers", "0,1,3",
            "--data.source", str(corpus), "--data.context-length", "16", "--data.n-tokens", "900",
            "--eval-tokens", "300", "--sae.n-latents", "48", "--sae.k", "4", "--cosine-top-n", "10",
            "--trainer.total-tokens", "1024", "--trainer.batch-size", "128", "--trainer.warmup-steps", "2",
            "--trainer.log-every-steps", "2", "--trainer.progress", "false", "--flow.contexts", "4",
            "--flow.context-length", "8", "--flow.latents-per-bucket", "2", "--flow.tokens-per-latent", "2",
            "--adjacent-layers", "", *extra]


def test_recipe_trains_evaluates_and_reports_every_analysis(tiny_setup, tmp_path: Path, open_page,
                                                            shows_values) -> None:
    model, corpus = tiny_setup
    out = tmp_path / "run"
    assert main(_args(model, corpus, out)) == 0

    saved = json.loads((out / "summary.json").read_text())
    assert list(saved["per_layer_fvu"]) == ["0", "1", "3"] and 0 < saved["fvu"] < 1
    assert saved["sae"]["layers"] == [0, 1, 3] and saved["sae"]["d_in"] == 48
    triggers = saved["triggers"]
    assert sum(triggers["bucket_counts_by_encoder"]) == triggers["n_active"] == saved["activation"]["n_active"]
    assert len(saved["decoder_cosines"]["all"]["adjacent"]) == 2
    flow = saved["information_flow"]["all"]
    assert saved["flow_rows"] > 0 and len(flow["cosine"]["adjacent"]) == 2
    assert all(-1 <= c <= 1 for c in flow["cosine"]["adjacent"] if c is not None)
    html = (out / "report.html").read_text()
    for section in ("Reconstruction", "Trigger layers", "Banding", "Decoder cosines", "Information flow",
                    "Compared with the write-up"):
        assert f"<h2>{section}" in html
    assert html.count("<img") == 11  # training, rates, buckets, 4 banding, 2 cosine, 2 flow
    sae = load_sae(out / "train" / "sae", normalization="per_layer")
    assert isinstance(sae, MultiLayerSAE) and sae.hookpoints == ["resid_post.0", "resid_post.1", "resid_post.3"]
    page, _ = open_page(out / "report.html")
    shows_values(page, {**saved["activation"], "l0": saved["metrics"]["l0"]})
    latent = page.evaluate("+document.querySelector('p.latent').dataset.latent")
    browser, _ = open_page((out / "features" / "index.html").as_uri() + f"#latent={latent}",
                           ready=f"document.getElementById('panel').dataset.latent === '{latent}'")
    norms = browser.evaluate("""Array.from(document.querySelectorAll('#panel table.layers tbody tr')).map(r =>
        [+r.cells[0].textContent, +r.cells[1].dataset.value, +r.cells[2].dataset.value])""")
    encoder = segment_norms(sae.W_enc.detach(), sae.slices)[latent].tolist()
    decoder = segment_norms(sae.decoder_weight.detach(), sae.slices)[latent].tolist()
    assert [row[0] for row in norms] == [0, 1, 3]
    assert [row[1] for row in norms] == pytest.approx(encoder, rel=1e-3)
    assert [row[2] for row in norms] == pytest.approx(decoder, rel=1e-3)



def test_both_layer_sets_side_by_side_at_one_budget_and_a_rerun_redoes_nothing(tiny_setup, tmp_path: Path,
                                                                               monkeypatch, open_page) -> None:
    model, corpus = tiny_setup
    out = tmp_path / "run"
    assert main(_args(model, corpus, out, "--layers", "0,3", "--adjacent-layers", "0,1,2")) == 0

    saved = json.loads((out / "summary.json").read_text())
    adjacent = saved["adjacent"]
    assert saved["sae"]["layers"] == [0, 3] and adjacent["sae"]["layers"] == [0, 1, 2]
    assert saved["sae"]["n_latents"] == adjacent["sae"]["n_latents"] == 48
    assert saved["train"]["tokens"] == adjacent["train"]["tokens"]  # the same budget
    assert json.loads((out / "adjacent" / "summary.json").read_text())["fvu"] == adjacent["fvu"]
    assert len(adjacent["decoder_cosines"]["all"]["adjacent"]) == 2
    assert list(adjacent["per_layer_fvu_per_dim"]) == ["0", "1", "2"]
    rows = {row["quantity"]: row for row in saved["side_by_side"]}
    assert set(rows) >= {"fvu", "per_layer_fvu", "bucket_counts_by_encoder", "decoder_cosine_adjacent",
                         "decoder_cosine_first_last", "flow_cosine_adjacent", "flow_strength_adjacent"}
    assert rows["fvu"]["layers 0,1,2"] == (f"{adjacent['fvu_per_dim']:.4f} per-dimension mean; "
                                          f"{adjacent['fvu']:.4f} pooled")
    assert rows["decoder_cosine_adjacent"]["write-up"] == saved["write_up"]["decoder_cosine_adjacent"]
    for store in ("train", "eval"):  # one harvest holds both sets' layers
        hookpoints = json.loads((out / "activations" / store / "manifest.json").read_text())["hookpoints"]
        assert hookpoints == [f"resid_post.{layer}" for layer in (0, 1, 2, 3)]
    html = (out / "report.html").read_text()
    assert "<h2>Strided and adjacent layers side by side" in html and 'href="adjacent/report.html"' in html
    assert (out / "adjacent" / "report.html").exists() and (out / "adjacent" / "figures").is_dir()
    page, _ = open_page(out / "report.html")
    assert rows["flow_strength_adjacent"]["layers 0,3"] in page.evaluate("document.body.innerText")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run folder was trained again")

    monkeypatch.setattr("saelab.experiments.multilayer.run.train", no_training)
    monkeypatch.setattr("saelab.experiments.multilayer.run.information_flow", no_training)
    assert main(_args(model, corpus, out, "--layers", "0,3", "--adjacent-layers", "0,1,2")) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["side_by_side"] == saved["side_by_side"] and again["adjacent"]["fvu"] == adjacent["fvu"]
    monkeypatch.undo()  # another request in the same folder redoes the analyses (the trained SAEs are reused)
    assert main(_args(model, corpus, out, "--layers", "0,3", "--adjacent-layers", "0,1,2", "--cosine-top-n", "3")) == 0
    changed = json.loads((out / "summary.json").read_text())
    assert changed["decoder_cosines"]["all"]["n_latents"] <= 3 and changed["adjacent"]["fvu"] == adjacent["fvu"]


def test_a_trained_sae_is_analysed_only_with_its_layer_set_and_normalisation(tiny_setup, tmp_path, capsys) -> None:
    model, corpus = tiny_setup
    sae = MultiLayerSAE(MultiLayerSAEConfig(
        d_in=48, n_latents=48, k=4, layers=[0, 1, 3], hookpoints=layer_hookpoints([0, 1, 3]), slice_widths=[16] * 3,
        layer_scales=[1.0, 2.0, 3.0]))
    sae.save(tmp_path / "sae")
    reuse = ("--sae-dir", str(tmp_path / "sae"))
    assert main(_args(model, corpus, tmp_path / "a", *reuse, "--normalization", "global")) == 2
    assert "trained with normalization='per_layer' but 'global' was asked for" in capsys.readouterr().err
    assert main(_args(model, corpus, tmp_path / "b", *reuse, "--layers", "0,1")) == 2
    assert "reads ['resid_post.0', 'resid_post.1', 'resid_post.3'] but activations of" in capsys.readouterr().err
    assert main(_args(model, corpus, tmp_path / "c", *reuse)) == 2  # untrained, with made-up layer scales
    assert "mean norm" in capsys.readouterr().err
    assert main(_args(model, corpus, tmp_path / "c", *reuse, "--self-check", "false")) == 0
    saved = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert saved["train"] is None and saved["sae"]["layer_scales"] == [1.0, 2.0, 3.0]


def test_bad_layer_lists_are_refused(tiny_setup, tmp_path: Path, capsys) -> None:
    model, corpus = tiny_setup
    assert main(_args(model, corpus, tmp_path / "a", "--layers", "0,4")) == 2
    assert "out of range (this model has layers 0..3)" in capsys.readouterr().err
    assert main(_args(model, corpus, tmp_path / "b", "--layers", "3,1")) == 2
    assert "sorted" in capsys.readouterr().err


def test_budget_small_is_the_defaults_and_full_the_write_ups_dictionary() -> None:
    small = MultiLayerConfig.from_dict({})
    assert small == MultiLayerConfig() and small.budget == "small" and small.adjacent_layers == [0, 1, 2, 3, 4, 5]
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, MultiLayerConfig)
    full = config_from_args(MultiLayerConfig, parser.parse_args(["--budget", "full", "--sae.k", "64"]))
    assert (full.sae.n_latents, full.sae.k, full.budget) == (24_576, 64, "full")
    assert full.trainer.total_tokens > small.trainer.total_tokens and full.data.n_tokens > small.data.n_tokens
    assert full.trainer.lr == small.trainer.lr  # a budget changes the scale, nothing else
    with pytest.raises(ConfigError, match="pass --adjacent-layers '' with --sae-dir"):
        MultiLayerConfig.from_dict({"sae_dir": "somewhere"})


def _synthetic_store(path: Path):
    writer = StoreWriter(path, model="synthetic", hookpoints=["resid_post.0", "resid_post.2"], dtype="float32",
                         context_length=4, shard_tokens=64, config={"data": DataConfig().to_dict()})
    n = 32
    writer.append({"resid_post.0": torch.randn(n, 3), "resid_post.2": torch.randn(n, 3) * 10 + 5},
                  torch.arange(n) % 50, torch.arange(n) % 4, torch.arange(n) // 4, n_contexts=8)
    return writer.finish()


def test_layer_scales_per_layer_global_or_none(tmp_path: Path) -> None:
    store = _synthetic_store(tmp_path / "store")
    hookpoints = ["resid_post.0", "resid_post.2"]
    per_layer = layer_scales(store, hookpoints, "per_layer")
    assert per_layer == [store.norm_stats(hp).scale for hp in hookpoints] and per_layer[0] > 5 * per_layer[1]
    concatenated = store.load(hookpoints)
    (scale,) = set(layer_scales(store, hookpoints, "global"))
    assert scale == pytest.approx(6**0.5 / concatenated.norm(dim=1).mean().item(), rel=1e-5)
    assert layer_scales(store, hookpoints, "none") == [1.0, 1.0]
