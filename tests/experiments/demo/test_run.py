"""The demo end to end on a tiny random Llama saved to disk: harvest, train, evaluate, metrics and report."""

from __future__ import annotations

import json
from pathlib import Path

from saelab.data.tokenize import DataConfig
from saelab.experiments.demo.run import DemoConfig, run
from saelab.saes.spec import SAESpec
from saelab.training.config import TrainerConfig

HEADLINE = ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_divergence")


def test_demo_writes_metrics_summary_config_and_report(saved_tiny_llama, tmp_path: Path) -> None:
    model, corpus = saved_tiny_llama(hidden_size=16, num_hidden_layers=2, n_documents=40)
    out = tmp_path / "demo"
    cfg = DemoConfig(
        out_dir=str(out), model=str(model), hookpoint="resid_post.1",
        data=DataConfig(source=str(corpus), context_length=16, n_tokens=600, drop_first_positions=2),
        eval_tokens=150, downstream_contexts=4, harvest_batch_size=8, sae=SAESpec(n_latents=32, k=4),
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
