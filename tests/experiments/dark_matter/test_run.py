"""`saelab dark-matter` end to end on a tiny random Llama and a word-level tokenizer (seconds, offline)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.data.tokenize import DataConfig, build_contexts
from saelab.errors import ConfigError
from saelab.experiments.dark_matter import run as dark_matter_run
from saelab.experiments.dark_matter.regression import RegressionConfig
from saelab.experiments.dark_matter.run import DarkMatterConfig, run
from saelab.models.loading import load_model
from saelab.training.config import TrainerConfig

EXPERIMENTS = {
    "1_error_norm_probe", "2_error_vector_transform", "3_nonlinear_fvu", "4_per_token_scaling", "5_synthetic",
    "6_norm_prediction", "7_component_saes", "8_downstream_ce", "9_gradient_pursuit", "10_earlier_components",
}


@pytest.fixture
def tiny_setup(saved_tiny_llama) -> tuple[Path, Path]:
    return saved_tiny_llama(hidden_size=32, num_hidden_layers=3, n_documents=90)


def tiny_config(model: Path, corpus: Path, out: Path, **changes) -> DarkMatterConfig:
    cfg = DarkMatterConfig(
        out_dir=str(out), model=str(model), hookpoint="resid_post.2",
        data=DataConfig(source=str(corpus), context_length=16, drop_first_positions=2, n_tokens=2_800),
        analysis_tokens=700, downstream_contexts=4, widths=[16, 32, 64], k=4, reference_width=32,
        trainer=TrainerConfig(total_tokens=1_024, batch_size=128, warmup_steps=2, log_every_steps=2,
                              checkpoint_every_steps=None, progress=False),
        aux_sae_tokens=512, regression=RegressionConfig(seed=1), pursuit_tokens=300, synthetic_tokens=300,
        harvest_batch_size=32,
    )
    return cfg.replace(**changes)


def test_run_writes_every_experiment_to_the_summary_and_the_report(tiny_setup, tmp_path: Path, open_page,
                                                                    shows_values) -> None:
    model, corpus = tiny_setup
    out = tmp_path / "run"
    summary = run(tiny_config(model, corpus, out))

    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["experiments"]) == EXPERIMENTS
    exp = saved["experiments"]
    labels = ["16", "32", "64"]
    assert list(saved["setup"]["saes"]) == labels and saved["setup"]["reference"] == "32"
    assert saved["setup"]["earlier_hookpoints"] == ["resid_post.1", "attn_out.2", "mlp_out.2"]
    for key in ("1_error_norm_probe", "2_error_vector_transform", "6_norm_prediction", "8_downstream_ce"):
        assert set(exp[key]) == set(labels), key
    assert set(exp["3_nonlinear_fvu"]["per_sae"]) == set(labels)
    assert exp["3_nonlinear_fvu"]["scaling"]["total_power_law"] is not None
    assert [(p["small"], p["large"]) for p in exp["4_per_token_scaling"]] == [("16", "32"), ("16", "64"),
                                                                              ("32", "64")]
    assert set(exp["5_synthetic"]["correlations"]) == {"input noise", "reconstruction noise"}
    assert set(exp["7_component_saes"]["heldout"]) == {"linear", "nonlinear"}
    assert set(exp["9_gradient_pursuit"]["per_sae"]) == set(labels)
    sources = set(exp["10_earlier_components"]["r2"])
    assert {"resid_post.1", "Sae(attn_out.2)", "mlp_out.2 − Sae(mlp_out.2)", "all SAE reconstructions"} <= sources
    for row in exp["10_earlier_components"]["r2"].values():
        assert set(row) == {"sae(x)", "error", "linear error", "nonlinear error"}
    for label in labels:
        fvu = exp["3_nonlinear_fvu"]["per_sae"][label]
        assert fvu["total"] == pytest.approx(fvu["linear"] + fvu["nonlinear"])
        assert all(math.isfinite(v) for v in exp["6_norm_prediction"][label].values())
    # Experiment 8: Sae(x) + linear + nonlinear error is x again, so the splice gives the clean model's loss.
    reference = exp["8_downstream_ce"]["32"]
    assert reference["ce"]["sae+linear+nonlinear"] == pytest.approx(reference["ce_clean"], abs=1e-5)
    assert reference["ce"]["sae"] != pytest.approx(reference["ce_clean"], abs=1e-3)
    assert "sae+linear+nonlinear" not in exp["8_downstream_ce"]["16"]["ce"]
    assert summary["experiments"].keys() == saved["experiments"].keys()

    html = (out / "report.html").read_text()
    headings = " ".join(re.findall(r"<h2>(.*?)</h2>", html))
    for number in range(1, 11):
        assert f"({number})" in headings
    figures = {"probe_transform", "fvu_breakdown", "per_token_scaling", "synthetic", "norm_prediction",
               "component_sae_training", "downstream", "pursuit", "earlier_components"}
    assert {p.stem for p in (out / "figures").iterdir()} == figures
    assert html.count("<img ") == len(figures)
    page, _ = open_page(out / "report.html")
    shows_values(page, {k: v for k, v in saved["timings_s"].items() if k != "report"})  # timed after writing
    assert {p.name for p in (out / "saes").iterdir()} == {
        "resid_post.2-w16", "resid_post.2-w32", "resid_post.2-w64", "32-linear-error", "32-nonlinear-error",
        "resid_post.1-w32", "attn_out.2-w32", "mlp_out.2-w32",
    }


def _write_gemma_scope_style(folder: Path, d_in: int, width: int, seed: int) -> str:
    """A JumpReLU SAE in SAELens's folder format, reading resid_post.2."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, width, generator=g)
    tensors = {"W_enc": w_enc, "b_enc": torch.zeros(width), "W_dec": w_enc.T.contiguous() / width,
               "b_dec": torch.zeros(d_in), "threshold": torch.full((width,), 0.01)}
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": d_in, "d_sae": width, "hook_name": "blocks.2.hook_resid_post",
        "apply_b_dec_to_input": False, "normalize_activations": None,
    }))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return str(folder)


def test_run_analyses_saelens_saes_on_a_reused_store(tiny_setup, tmp_path: Path, hub_cache) -> None:
    model, corpus = tiny_setup
    cfg = tiny_config(model, corpus, tmp_path / "run")
    llama, tokenizer = load_model(str(model))
    hookpoints = ["resid_post.1", "attn_out.2", "mlp_out.2", "resid_post.2"]
    store = harvest(llama, tokenizer, build_contexts(cfg.data, tokenizer),
                    HarvestConfig(out_dir=str(tmp_path / "acts"), model=str(model), hookpoints=hookpoints,
                                  data=cfg.data, batch_size=64), show_progress=False)
    folders = [_write_gemma_scope_style(tmp_path / "gemma-scope" / f"width_{w}", 32, w, seed=w) for w in (16, 64, 32)]
    with pytest.raises(ConfigError, match=r"width_16 does not fit.*FVU = .*--self-check false"):  # random SAEs
        run(cfg.replace(store=str(store.path), pretrained_sae=folders, reference_width=None))
    # one of them from a hub repository, and the hookpoint they name (blocks.2.hook_resid_post) taken as the target
    hub_cache.add("google/gemma-scope-tiny", hub_cache.files(Path(folders[1]), "layer_2/width_64"))
    sources = [folders[0], "hf:google/gemma-scope-tiny/layer_2/width_64", folders[2]]
    summary = run(cfg.replace(store=str(store.path), pretrained_sae=sources, reference_width=None, self_check=False,
                              hookpoint=None))
    assert summary["setup"]["hookpoint"] == "resid_post.2"

    assert summary["setup"]["store"] == str(store.path) and not (tmp_path / "run" / "activations").exists()
    assert list(summary["setup"]["saes"]) == ["width_16", "width_32", "width_64"]
    assert summary["setup"]["reference"] == "width_32"  # the middle width
    assert set(summary["experiments"]) == EXPERIMENTS
    assert {p.name for p in (tmp_path / "run" / "saes").iterdir()} == {
        "width_32-linear-error", "width_32-nonlinear-error", "resid_post.1-w32", "attn_out.2-w32", "mlp_out.2-w32",
    }
    check = summary["experiments"]["8_downstream_ce"]["width_32"]
    assert check["ce"]["sae+linear+nonlinear"] == pytest.approx(check["ce_clean"], abs=1e-5)
    with pytest.raises(ConfigError, match="do not read resid_post.1"):
        run(cfg.replace(store=str(store.path), hookpoint="resid_post.1", earlier_hookpoints=[], pretrained_sae=folders))


MARKED = ("5_synthetic", "7_component_saes", "8_downstream_ce", "9_gradient_pursuit", "10_earlier_components")


def test_rerun_reads_finished_experiments_from_their_done_markers(tiny_setup, tmp_path: Path, monkeypatch) -> None:
    model, corpus = tiny_setup
    out = tmp_path / "run"
    cfg = tiny_config(model, corpus, out, widths=[16, 32])
    run(cfg)
    assert DarkMatterConfig.load(out / "config.json") == cfg
    first = json.loads((out / "summary.json").read_text())["experiments"]

    def redone(*args, **kwargs) -> None:
        raise AssertionError("a finished experiment was run again")

    for stage in ("_synthetic", "_component_saes", "_earlier_components", "_pursuit", "_downstream"):
        monkeypatch.setattr(dark_matter_run, stage, redone)
    again = run(cfg)
    assert {key: again["experiments"][key] for key in MARKED} == {key: first[key] for key in MARKED}
    # Other settings answer another question: the experiments are redone (the SAEs, trained on the same tokens,
    # are still reused).
    with pytest.raises(AssertionError, match="run again"):
        run(cfg.replace(regression=RegressionConfig(seed=2)))
