"""A run's features end to end: record, data, browser and the inline report section, over a corpus whose tokens
include markup, checked in Chromium."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from saelab.activations.writer import StoreWriter
from saelab.interp.examples import TokenText
from saelab.interp.feature_data import FeatureDataConfig
from saelab.report.html import Report
from saelab.report.run_features import add_features_section, summary_of, write_run_features
from saelab.saes import create_sae

SCRIPT = "<script>alert(1)</script>"
HOOKPOINT = "resid_post.0"


def _tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", SCRIPT, "<b>bold</b>"] + [f"w{i}" for i in range(13)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


def _run(tmp_path: Path):
    """Latent i fires (with strength 1 + position) exactly where token i+1 sits: latent 0 on SCRIPT."""
    n_contexts, length, n = 12, 10, 6
    generator = torch.Generator().manual_seed(0)
    contexts = torch.randint(1, 16, (n_contexts, length), generator=generator)
    acts = torch.zeros(n_contexts, length, n)
    for latent in range(n - 1):  # the last latent stays dead
        acts[..., latent] = (contexts == latent + 1) * (1.0 + torch.arange(length))
    writer = StoreWriter(tmp_path / "store", model="synthetic", hookpoints=[HOOKPOINT], dtype="float32",
                         context_length=length, shard_tokens=40, contexts=contexts)
    for c in range(n_contexts):
        writer.append({HOOKPOINT: acts[c]}, contexts[c], torch.arange(length), torch.full((length,), c), n_contexts=1)
    store = writer.finish()
    sae = create_sae("relu", d_in=n, n_latents=n, hookpoint=HOOKPOINT)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(n))
        sae.W_dec.copy_(torch.eye(n))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    text = TokenText(_tokenizer())
    cfg = FeatureDataConfig(window_before=2, window_after=1, chunk_size=4, top=3)
    index, data = write_run_features(sae, store, HOOKPOINT, tmp_path / "run", text, cfg=cfg,
                                     unembedding=torch.randn(16, n), title="markup " + SCRIPT)
    return index, data, acts, contexts


def test_markup_in_tokens_renders_as_text_everywhere(tmp_path: Path, open_page) -> None:
    index, data, acts, contexts = _run(tmp_path)
    assert index == tmp_path / "run" / "features" / "index.html"
    assert summary_of(data, index, tmp_path / "run") == {"index": "features/index.html", "recorded_tokens": 120,
                                                         "dead": 1, "alive": 5, "n_latents": 6}
    report = Report("report")
    add_features_section(report, data, "features/index.html", n_latents=3, windows=2)
    report.write(tmp_path / "run" / "report.html")

    page, _ = open_page(tmp_path / "run" / "report.html")
    latents = page.evaluate("Array.from(document.querySelectorAll('p.latent')).map(p => +p.dataset.latent)")
    counts = (contexts[..., None] == torch.arange(1, 7)).sum((0, 1))
    assert latents == sorted(range(5), key=lambda i: (counts[i].item(), i))[::2]  # rarest, middle, most frequent
    marked = page.evaluate("Array.from(document.querySelectorAll('.ctx .act')).map(s => [s.textContent, "
                           "+s.dataset.act])")
    words = _tokenizer().convert_ids_to_tokens(list(range(16)))
    assert marked and all(text.strip() == words[latent + 1] for (text, _), latent in
                          zip(marked, [la for la in latents for _ in range(2)], strict=False))
    assert page.evaluate("document.querySelectorAll('script, b').length") == 0

    browser, _ = open_page(index.as_uri() + "#latent=0", ready="document.getElementById('panel').dataset.latent")
    assert browser.evaluate("document.title") == "markup " + SCRIPT
    tokens = browser.evaluate("Array.from(document.querySelectorAll('#panel .ctx .act')).map(s => [s.textContent, "
                              "+s.dataset.act])")
    strongest = acts[..., 0].max().item()
    assert tokens[0] == [" " + SCRIPT, strongest] or tokens[0] == [SCRIPT, strongest]
    assert all(text.strip() == SCRIPT for text, _ in tokens)
    logits = browser.evaluate("Array.from(document.querySelectorAll('#panel table.logits td.tok')).length")
    assert logits == 2 * data.cfg.logit_tokens
    assert browser.evaluate("document.querySelectorAll('script').length") == 3  # page, index data, one chunk
    assert browser.evaluate("document.querySelectorAll('b').length") == 0
