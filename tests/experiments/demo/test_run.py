"""The demo end to end on a tiny random Llama saved to disk: harvest, train, evaluate, metrics and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saelab.data.tokenize import DataConfig
from saelab.experiments.demo.run import DemoConfig, run
from saelab.interp.feature_data import FeatureDataConfig
from saelab.interp.record import LatentRecord
from saelab.saes.spec import SAESpec
from saelab.training.config import TrainerConfig

HEADLINE = ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_divergence")


def test_demo_writes_metrics_summary_config_and_report(saved_tiny_llama, tmp_path: Path, open_page) -> None:
    model, corpus = saved_tiny_llama(hidden_size=16, num_hidden_layers=2, n_documents=40)
    out = tmp_path / "demo"
    cfg = DemoConfig(
        out_dir=str(out), model=str(model), hookpoint="resid_post.1",
        data=DataConfig(source=str(corpus), context_length=16, n_tokens=600, drop_first_positions=2),
        eval_tokens=150, downstream_contexts=4, harvest_batch_size=8, sae=SAESpec(n_latents=32, k=4),
        feature_tokens=300, features=FeatureDataConfig(chunk_size=8, window_before=3, window_after=2),
        trainer=TrainerConfig(total_tokens=1024, batch_size=128, warmup_steps=2, log_every_steps=2, progress=False),
    )
    summary = run(cfg)

    metrics = json.loads((out / "metrics.json").read_text())
    for key in HEADLINE:
        assert key in metrics and metrics[key] == summary[key]
    assert 0 < metrics["fvu"] < 2 and 0 < metrics["l0"] <= 4 and 0 <= metrics["dead_fraction"] <= 1
    assert metrics["train"]["tokens"] == 1024 and metrics["train"]["completed"]
    usable = 16 - 2  # positions per context that count
    assert 0 < metrics["stores"]["train_tokens"] <= cfg.data.n_contexts() * usable
    assert 0 < metrics["stores"]["eval_tokens"] <= cfg.data.replace(n_tokens=150).n_contexts() * usable
    assert {"timings_s", "config", "provenance"} <= set(metrics)
    assert json.loads((out / "summary.json").read_text()) == metrics
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    html = (out / "report.html").read_text()
    assert "Headline metrics" in html and html.count("<img") == 1
    assert (out / "train" / "sae" / "cfg.json").exists()

    # The report and the feature browser in Chromium: clean, and showing the recorded numbers.
    record = LatentRecord(out / "features" / "record")
    assert metrics["features"]["index"] == "features/index.html" and record.n_tokens <= 300
    assert metrics["features"]["dead"] == int((record.counts == 0).sum())
    page, _ = open_page(out / "report.html")
    headline = page.evaluate("""Object.fromEntries(Array.from(document.querySelector('table').tBodies[0].rows)
        .map(r => [r.cells[0].textContent, +r.cells[1].textContent]))""")
    assert headline == {key: pytest.approx(metrics[key], rel=1e-3, abs=1e-12) for key in HEADLINE}
    shown = page.evaluate("""Array.from(document.querySelectorAll('p.latent')).map(p => [+p.dataset.latent,
        +p.dataset.count, p.querySelector('a').getAttribute('href')])""")
    assert 0 < len(shown) <= 12
    assert all(count == record.counts[latent] > 0 for latent, count, _ in shown)
    assert all(href == f"features/index.html#latent={latent}" for latent, _, href in shown)
    assert page.evaluate("document.querySelectorAll('svg.density rect').length") == cfg.features.density_bins + 1
    browser, _ = open_page((out / "features" / "index.html").as_uri() + f"#latent={shown[0][0]}",
                           ready=f"document.getElementById('panel').dataset.latent === '{shown[0][0]}'")
    counts = browser.evaluate("Array.from(document.querySelectorAll('#latents tbody tr')).map(r => +r.cells[2]"
                              ".textContent)")
    assert counts == record.counts.tolist()  # 32 latents: one page
    assert browser.evaluate("document.querySelectorAll('#panel .ctx').length") > 0
    assert browser.check().problems == []
