"""The feature browser's data: hand-checked density histogram, and every number of a chunk traced back to the
synthetic activations the record was made from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.activations.writer import StoreWriter
from saelab.interp import feature_data
from saelab.interp.examples import TokenText
from saelab.interp.feature_data import FeatureData, FeatureDataConfig, density_histogram, rounded
from saelab.interp.record import record_latents
from saelab.saes.multilayer import MultiLayerSAE, MultiLayerSAEConfig, layer_hookpoints, segment_norms


def test_density_histogram_by_hand() -> None:
    # frequencies 0 (dead), 0.01, 0.1, 1 -> log10 -2, -1, 0 on edges [-2, -1, 0]: the last bin holds both ends
    found = density_histogram(np.array([0, 1, 10, 100]), n_tokens=100, bins=2)
    assert found == {"edges": [-2.0, -1.0, 0.0], "counts": [1, 2], "dead": 1, "alive": 3, "n_tokens": 100}
    assert density_histogram(np.array([0, 0]), 10, 3)["counts"] == [0, 0, 0]


def test_rounded_keeps_four_significant_digits() -> None:
    assert rounded(3.14159) == 3.142 and rounded(0.000123456) == 0.0001235 and rounded(0.0) == 0.0
    assert rounded(float("nan")) == 0.0 and rounded(123456.0) == 123500.0


def _synthetic(make_record):
    torch.manual_seed(0)
    latents = torch.rand(6, 12, 5) * (torch.rand(6, 12, 5) < 0.4)
    latents[..., 4] = 0  # a dead latent
    latents[2, 5, 1] = 9.0  # latent 1's strongest activation, in context 2 at position 5
    return make_record(latents)


def test_index_and_chunks_equal_the_record(make_record, word_tokenizer) -> None:
    synthetic = _synthetic(make_record)
    cfg = FeatureDataConfig(top=3, quantiles=2, per_quantile=1, window_before=2, window_after=1, histogram_bins=4,
                            chunk_size=2, density_bins=5)
    data = FeatureData(synthetic.sae, synthetic.record, synthetic.store, TokenText(word_tokenizer), cfg,
                       explanations={1: "strong <b>"}, scores={"detection": {1: 0.75}})
    index = data.index()
    dense = synthetic.latents.reshape(-1, 5)
    assert index["count"] == (dense > 0).sum(0).tolist()
    assert index["max"] == [rounded(v) for v in dense.max(0).values.tolist()]
    assert index["n_chunks"] == 3 and index["explanation"] == {"1": "strong <b>"}
    assert index["scores"] == {"detection": {"1": 0.75}} and index["logits"] is False
    assert index["density"]["dead"] == 1 and sum(index["density"]["counts"]) == 4

    chunks = dict(data.chunks())
    assert sorted(chunks) == [0, 1, 2] and sorted(chunks[2]["latents"]) == ["4"]
    assert chunks[2]["latents"]["4"] == {"count": 0, "max": 0.0}  # dead: nothing to show
    chunk = chunks[0]
    entry = chunk["latents"]["1"]
    assert entry["count"] == index["count"][1] and entry["max"] == 9.0
    assert sum(entry["histogram"]["counts"]) == entry["count"] and entry["histogram"]["edges"][-1] == 9.0
    strongest = entry["top"][0]
    assert (strongest["context"], strongest["start"]) == (2, 3)  # position 5 with 2 tokens before
    for window in entry["top"] + [w for quantile in entry["quantiles"] for w in quantile]:
        c, s = window["context"], window["start"]
        expected = synthetic.latents[c, s : s + 4, 1].tolist()
        assert window["acts"] == [rounded(v) for v in expected]
        pieces = TokenText(word_tokenizer).pieces(synthetic.contexts[c].tolist())[s : s + 4]  # texts in context
        assert [chunk["strings"][t] for t in window["tokens"]] == pieces
    assert [len(q) for q in entry["quantiles"]] == [1, 1]


def test_logits_are_the_unembedding_of_the_decoder_row(make_record, word_tokenizer, monkeypatch) -> None:
    synthetic = _synthetic(make_record)  # identity SAE at resid_post.0: latent i's direction is e_i
    unembedding = torch.randn(len(word_tokenizer), 5)
    data = FeatureData(synthetic.sae, synthetic.record, synthetic.store, TokenText(word_tokenizer),
                       FeatureDataConfig(logit_tokens=3, chunk_size=2), unembedding=unembedding)
    chunk = data.chunk(0)
    for latent in (0, 1):
        logits = chunk["latents"][str(latent)]["logits"]
        column = unembedding[:, latent]
        top, bottom = column.topk(3), column.topk(3, largest=False)
        assert [chunk["strings"][t] for t, _ in logits["top"]] == [word_tokenizer.decode([i]) for i in top.indices]
        assert [v for _, v in logits["bottom"]] == pytest.approx(bottom.values.tolist(), rel=1e-3)
    assert "logits" not in data.chunk(2)["latents"]["4"]  # a dead latent has no direction worth reading
    monkeypatch.setattr(feature_data, "LOGIT_BLOCK", 3)  # chunks of 2 straddle the blocks of 3
    blocked = FeatureData(synthetic.sae, synthetic.record, synthetic.store, TokenText(word_tokenizer),
                          FeatureDataConfig(logit_tokens=3, chunk_size=2), unembedding=unembedding)
    assert dict(blocked.chunks()) == dict(data.chunks())


def test_multilayer_latents_show_their_norm_in_each_layer(word_tokenizer, tmp_path) -> None:
    hookpoints = layer_hookpoints([0, 1])
    contexts = torch.randint(4, 100, (4, 8))
    writer = StoreWriter(tmp_path / "store", model="synthetic", hookpoints=hookpoints, dtype="float32",
                         context_length=8, shard_tokens=10, contexts=contexts)
    for c in range(4):
        writer.append({hp: torch.randn(8, 5) for hp in hookpoints}, contexts[c], torch.arange(8),
                      torch.full((8,), c), n_contexts=1)
    store = writer.finish()
    sae = MultiLayerSAE(MultiLayerSAEConfig(d_in=10, n_latents=6, k=2, layers=[0, 1], hookpoints=hookpoints,
                                            slice_widths=[5, 5], layer_scales=[1.0, 1.0]))
    record = record_latents(sae, store, tmp_path / "record", hookpoints, show_progress=False)
    assert record.hookpoint == "resid_post.0,resid_post.1"
    dense = sae.encode(store.load(hookpoints)).to_dense()
    assert record.counts.tolist() == (dense > 0).sum(0).tolist()
    data = FeatureData(sae, record, store, TokenText(word_tokenizer), FeatureDataConfig(chunk_size=6),
                       unembedding=torch.randn(len(word_tokenizer), 5))
    assert data.index()["layers"] == [0, 1] and not data.has_logits  # the direction spans both layers
    encoder = segment_norms(sae.W_enc.detach(), sae.slices)
    decoder = segment_norms(sae.decoder_weight.detach(), sae.slices)
    for latent, entry in data.chunk(0)["latents"].items():
        assert entry["layers"]["encoder"] == [rounded(v) for v in encoder[int(latent)].tolist()]
        assert entry["layers"]["decoder"] == [rounded(v) for v in decoder[int(latent)].tolist()]
    by_hand = [sae.W_enc[0, :5].norm().item(), sae.W_enc[0, 5:].norm().item()]
    assert encoder[0].tolist() == pytest.approx(by_hand)
