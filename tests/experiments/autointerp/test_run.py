"""The autointerp experiment end to end on a tiny model, with the loopback OpenAI-protocol server as explainer and
scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.cli import main
from saelab.data.tokenize import DataConfig
from saelab.errors import ConfigError
from saelab.experiments.autointerp.run import AutointerpConfig, LLMConfig, run
from saelab.interp.examples import ExampleConfig
from saelab.saes import create_sae

T = 16


@pytest.fixture
def setup(tmp_path: Path, word_tokenizer) -> dict[str, str]:
    """A tiny Llama with the word tokenizer, a store of its resid_post.1, and two random top-k SAEs on it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=100,
                                         max_position_embeddings=T)).eval()
    model.save_pretrained(tmp_path / "model")
    word_tokenizer.save_pretrained(tmp_path / "model")
    contexts = torch.randint(4, 100, (30, T))
    contexts[:, 0] = word_tokenizer.bos_token_id
    cfg = HarvestConfig(out_dir=str(tmp_path / "store"), model=str(tmp_path / "model"), hookpoints=["resid_post.1"],
                        data=DataConfig(context_length=T), batch_size=10, dtype="float32", shard_tokens=200)
    harvest(model, word_tokenizer, contexts, cfg, show_progress=False)
    for name in ("shallow", "other"):
        sae = create_sae("topk", d_in=16, n_latents=12, k=3, hookpoint="resid_post.1", model_name=cfg.model)
        sae.save(tmp_path / "saes" / name / "sae")
    return {"store": cfg.out_dir, "a": str(tmp_path / "saes/shallow/sae"), "b": str(tmp_path / "saes/other/sae")}


def _config(setup: dict[str, str], out: Path, url: str, **overrides) -> AutointerpConfig:
    fields = dict(
        sae_dir=setup["a"], compare_sae_dir=setup["b"], store=setup["store"], out_dir=str(out), n_latents=3,
        max_tokens=None, record_chunk_tokens=100, batch_size=64, latents_per_step=2, page_top=3, page_quantiles=2,
        page_per_quantile=1, logit_tokens=3,
        examples=ExampleConfig(window_before=4, window_after=2, n_train=4, train_quantiles=2, test_quantiles=2,
                               test_per_quantile=1, test_non_activating=2),
        llm=LLMConfig(kind="openai", model="fake", base_url=url, max_retries=1, backoff_s=0.0, concurrency=2,
                      top_logprobs=2),
    )
    return AutointerpConfig(**{**fields, **overrides})


def test_scores_and_compares_two_saes_and_a_rerun_costs_nothing(setup, fake_server, tmp_path, open_page,
                                                                shows_values) -> None:
    out = tmp_path / "run"
    summary = run(_config(setup, out, fake_server.url))
    labels = [sae["label"] for sae in summary["saes"]]
    assert labels == ["shallow", "other"]
    for sae in summary["saes"]:
        assert len(sae["latents"]) == 3
        for explainer in ("llm", "baseline"):
            for scorer in ("detection", "fuzzing"):
                pooled = sae["scores"][explainer][scorer]["pooled"]
                assert pooled["n"] > 0 and 0.0 <= pooled["accuracy"] <= 1.0 and pooled["auc"] is not None
        results = sorted((out / sae["label"] / "latents").glob("latent_*.json"))
        assert len(results) == 3
        first = json.loads(results[0].read_text())
        assert first["explanations"]["llm"]["text"] == "the token w7"
        assert first["explanations"]["baseline"]["text"].startswith("the tokens ")
        assert (out / sae["label"] / "pages" / "index.html").exists()
        assert len(list((out / sae["label"] / "pages").glob("latent_*.html"))) == 3
    for explainer in ("llm", "baseline"):
        for scorer in ("detection", "fuzzing"):
            for level in ("per_example", "per_latent"):
                assert 0.0 <= summary["comparison"][explainer][scorer][level]["p_value"] <= 1.0
    usage = summary["llm"]["usage"]
    assert usage["requests"] == fake_server.served == fake_server.count > 6
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == usage["requests"]
    assert summary["llm"]["cache"] == {"replies": usage["requests"], "prompt_tokens": usage["prompt_tokens"],
                                       "completion_tokens": usage["completion_tokens"]}
    page = (out / "shallow" / "pages" / "latent_{:06d}.html".format(summary["saes"][0]["latents"][0])).read_text()
    assert "Logit effects" in page and "final norm skipped" in page
    assert (out / "report.html").exists() and (out / "comparison.png").exists()
    assert json.loads((out / "summary.json").read_text())["comparison"] == summary["comparison"]
    assert (out / "config.json").exists()

    # In Chromium: the report (its links to both sites), the pages and the browser, with the run's numbers.
    report, _ = open_page(out / "report.html")
    shows_values(report, summary["llm"]["usage"])
    links = report.evaluate("Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'))")
    assert links == [f"{label}/{site}/index.html" for label in labels for site in ("pages", "features")]
    open_page(out / "shallow" / "pages" / "index.html")
    first = json.loads(sorted((out / "shallow" / "latents").glob("latent_*.json"))[0].read_text())
    browser, _ = open_page((out / "shallow" / "features" / "index.html").as_uri() + "#q=w7&sort=detection&dir=desc",
                           ready="document.body.dataset.ready")
    rows = browser.evaluate("""Array.from(document.querySelectorAll('#latents tbody tr')).map(r => [
        +r.dataset.latent, r.cells[2].textContent, r.cells[4].textContent, r.cells[r.cells.length - 1].textContent])""")
    assert sorted(row[0] for row in rows) == summary["saes"][0]["latents"]  # the explained ones match the search
    (row,) = [row for row in rows if row[0] == first["latent"]]
    assert row[1:] == [str(first["count"]), f"{first['scores']['llm']['detection']['metrics']['accuracy']:.4g}",
                       "the token w7"]

    sent = fake_server.count
    again = run(_config(setup, out, fake_server.url))
    assert fake_server.count == sent  # results and replies are on disk: nothing is requested again
    assert again["saes"][0]["scores"] == summary["saes"][0]["scores"]
    assert again["llm"]["usage"]["requests"] == 0 and again["llm"]["cache"] == summary["llm"]["cache"]

    other_examples = ExampleConfig(window_before=5, window_after=2, n_train=4, train_quantiles=2, test_quantiles=2,
                                   test_per_quantile=1, test_non_activating=2)
    with pytest.raises(ConfigError, match="other settings \\(examples differ\\)"):
        run(_config(setup, out, fake_server.url, examples=other_examples))


def test_a_failing_server_stops_with_a_clear_error_and_a_rerun_resumes(setup, fake_server, tmp_path, capsys) -> None:
    fresh = run(_config(setup, tmp_path / "fresh", fake_server.url, compare_sae_dir=None, latents_per_step=1))
    needed = fresh["llm"]["usage"]["requests"]

    healthy, limit = fake_server.reply, fake_server.served + needed // 2
    fake_server.reply = lambda body: healthy(body) if fake_server.served < limit else (503, "overloaded")
    out = tmp_path / "interrupted"
    flags = ["autointerp", "--sae-dir", setup["a"], "--store", setup["store"], "--out-dir", str(out),
             "--config", str(tmp_path / "cfg.json")]
    _config(setup, out, fake_server.url, compare_sae_dir=None, latents_per_step=1).save(tmp_path / "cfg.json")
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "saelab autointerp: error:" in err and "no usable reply after 2 attempts" in err
    kept = len(list((out / "shallow" / "latents").glob("*.json")))
    assert 0 < kept < 3  # the latents scored before the failure are kept

    fake_server.reply = healthy
    served_before = fake_server.served
    resumed = run(_config(setup, out, fake_server.url, compare_sae_dir=None, latents_per_step=1))
    assert fake_server.served - served_before == needed - needed // 2  # only what was missing
    assert resumed["saes"][0]["scores"] == fresh["saes"][0]["scores"]
