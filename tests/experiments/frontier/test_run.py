"""The frontier experiment end to end on a tiny random Llama: harvest, train every variant, evaluate, report, resume."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from saelab.data.tokenize import DataConfig
from saelab.errors import ConfigError
from saelab.experiments.frontier import run as frontier
from saelab.experiments.frontier.run import FrontierConfig, matched_width, plan_variants
from saelab.saes import create_sae
from saelab.training.config import DEEP_SAE_RECIPE, TrainerConfig

D_MODEL = 32


@pytest.fixture
def tiny_setup(tmp_path, word_tokenizer):
    """A saved tiny Llama + word tokenizer and a corpus of random-word documents."""
    root = tmp_path
    config = LlamaConfig(vocab_size=100, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    word_tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(96)}" for _ in range(rng.randrange(20, 60))) for _ in range(120)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    return root


def _cfg(root, out: str, **fields) -> FrontierConfig:
    trainer = TrainerConfig(**{**DEEP_SAE_RECIPE, "total_tokens": 768, "batch_size": 128, "lr": 1e-2,
                               "dead_window_tokens": 256, "resample_every_steps": 2, "progress": False,
                               "checkpoint_every_steps": 3})
    base = dict(out_dir=str(root / out), model=str(root / "model"), hookpoint="resid_post.1",
                data=DataConfig(source=str(root / "corpus.txt"), context_length=16, n_tokens=1200),
                eval_tokens=240, downstream_contexts=4, harvest_batch_size=16, n_latents=256, ks=[4, 8],
                trainer=trainer)
    return FrontierConfig(**{**base, **fields})


def test_frontier_runs_reports_resumes_and_reuses_a_store(tiny_setup, monkeypatch, open_page, shows_values) -> None:
    cfg = _cfg(tiny_setup, "run")
    summary = frontier.run(cfg)
    out = tiny_setup / "run"
    rows = {(r["architecture"], r["k"]): r for r in summary["rows"]}
    assert set(rows) == {(a, k) for a in ("shallow", "deep-1", "deep-1-matched", "deep-2") for k in (4, 8)}
    for (_, k), row in rows.items():
        assert 0 < row["nmse"] < 2 and 0 < row["l0"] <= k
        assert 0 <= row["dead_fraction_eval"] <= 1 and row["dead_fraction_train"] is not None
        assert row["train"]["tokens"] == 768 and row["train"]["completed"]
        assert abs(row["downstream"]["ce_loss_recovered"]) < 1e3
    assert rows[("deep-2", 4)]["dense_widths"] == [64, 128] and rows[("deep-1", 4)]["n_latents"] == 256
    shallow, matched = rows[("shallow", 4)], rows[("deep-1-matched", 4)]
    assert matched["n_latents"] < 256 and abs(matched["parameters"] - shallow["parameters"]) <= D_MODEL + 1
    assert rows[("deep-1", 4)]["parameters"] > shallow["parameters"]
    assert set(summary["verdict"]) == {"deep-1", "deep-1-matched", "deep-2"}
    assert set(summary["baseline"]) == {"ce_clean", "ce_zero_ablated"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(summary["rows"]))
    html = (out / "report.html").read_text()
    assert "Frontier" in html and "deep-1-matched" in html and html.count("<img") == 3
    page, _ = open_page(out / "report.html")
    shows_values(page, summary["baseline"])
    table = page.evaluate("""(() => { const t = Array.from(document.querySelectorAll('table'))[0];
        const head = Array.from(t.tHead.rows[0].cells).map(c => c.textContent);
        return Array.from(t.tBodies[0].rows).map(r => Object.fromEntries(
            Array.from(r.cells).map((c, i) => [head[i], c.textContent]))); })()""")
    assert [(r["architecture"], r["k"], float(r["nmse"])) for r in table] == [
        (r["architecture"], str(r["k"]), pytest.approx(r["nmse"], rel=1e-3)) for r in summary["rows"]]
    assert (out / "saes" / "shallow-k4" / "sae" / "cfg.json").exists()

    # A second run trains and evaluates nothing: every SAE folder is complete.
    def no_training(*args, **kwargs):
        raise AssertionError("a complete SAE was trained again")

    monkeypatch.setattr(frontier, "train_from_config", no_training)
    monkeypatch.setattr(frontier, "downstream_metrics", no_training)
    again = frontier.run(cfg)
    assert again["rows"] == summary["rows"]
    monkeypatch.undo()

    # Another run on the same store: nothing is harvested for training, the held-out text follows the store's.
    store = out / "activations" / "train"
    reuse = _cfg(tiny_setup, "reuse", store=str(store), ks=[4], depths=[0], matched_depths=[])
    reused = frontier.run(reuse)
    assert reused["stores"]["train"] == str(store) and not (tiny_setup / "reuse" / "activations" / "train").exists()
    assert [r["architecture"] for r in reused["rows"]] == ["shallow"]
    with pytest.raises(ConfigError, match="not resid_post.0"):
        frontier.run(_cfg(tiny_setup, "wrong", store=str(store), hookpoint="resid_post.0"))


def test_matched_width_equalises_parameters() -> None:
    cfg = FrontierConfig(n_latents=4608, ks=[16], dense_multiples=[2.0, 4.0])
    for depth in (1, 2):
        width = matched_width(cfg.replace(n_latents=9216), 576, depth)
        with torch.device("meta"):
            count = create_sae("deep", d_in=576, n_latents=width, k=16,
                               encoder_multiples=cfg.dense_multiples[:depth]).num_parameters()
            shallow = create_sae("deep", d_in=576, n_latents=9216, k=16, encoder_multiples=[]).num_parameters()
        slope = 2 * 576 * 2 * (2 if depth == 2 else 1) + 1
        assert abs(count - shallow) <= slope / 2
    with pytest.raises(ConfigError, match="raise n_latents or drop 2 from matched_depths"):
        plan_variants(cfg.replace(matched_depths=[2]), 576)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"depths": [0, 3]}, "between 0 and len"),
        ({"matched_depths": [2], "depths": [0, 1]}, "not in depths"),
        ({"matched_depths": [0]}, "cannot hold 0"),
        ({"ks": []}, "at least one k"),
    ],
)
def test_bad_frontier_configs_are_named(fields, message) -> None:
    with pytest.raises(ConfigError, match=message):
        FrontierConfig.from_dict(fields)


def test_writeup_setting_is_one_flag_away() -> None:
    cfg = FrontierConfig.from_dict({"preset": "writeup", "ks": [64]})
    assert (cfg.model, cfg.hookpoint, cfg.n_latents, cfg.ks) == ("gpt2", "resid_post.8", 12288, [64])
    assert cfg.trainer.optimizer == "masked_adam" and cfg.trainer.dead_window_tokens == 1_500_000


def test_architectures_axis_compares_families_at_each_k(tiny_setup) -> None:
    families = ["topk", "batchtopk", "jumprelu", "matryoshka"]
    summary = frontier.run(_cfg(tiny_setup, "families", architectures=families, ks=[8]))
    rows = {row["architecture"]: row for row in summary["rows"]}
    assert sorted(rows) == sorted(families)  # no deep sweep unless asked for
    assert rows["topk"]["l0"] == pytest.approx(8.0)
    assert rows["batchtopk"]["l0"] > 0 and rows["matryoshka"]["l0"] > 0 and rows["jumprelu"]["l0"] > 0
    for row in rows.values():
        assert row["nmse"] < 1.5 and "ce_loss_recovered" in row["downstream"] and row["dense_widths"] == []
    saved = json.loads((tiny_setup / "families" / "saes" / "jumprelu-k8" / "sae" / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu" and saved["target_l0"] == 8.0
    assert "batchtopk" in (tiny_setup / "families" / "report.html").read_text()
    with pytest.raises(ConfigError, match="choose from"):
        FrontierConfig.from_dict({"architectures": ["gated"]})
