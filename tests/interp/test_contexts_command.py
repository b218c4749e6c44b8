"""`saelab contexts` on a deep SAE: the windows' activations are the SAE's own on the stored tokens."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.activations.writer import StoreWriter
from saelab.cli import main
from saelab.errors import ConfigError
from saelab.interp.contexts import ContextsConfig
from saelab.saes import create_sae

HOOKPOINT = "resid_post.0"
N_CONTEXTS, LENGTH, D = 12, 10, 8


def test_contexts_command_shows_the_saes_own_activations(tmp_path, word_tokenizer, capsys) -> None:
    contexts = torch.randint(4, 100, (N_CONTEXTS, LENGTH))
    contexts[:, 0] = 0  # BOS, not stored
    activations = torch.randn(N_CONTEXTS, LENGTH, D) * 2 + 1
    writer = StoreWriter(tmp_path / "store", model="synthetic", hookpoints=[HOOKPOINT], dtype="float32",
                         context_length=LENGTH, shard_tokens=40, contexts=contexts)
    for c in range(N_CONTEXTS):
        writer.append({HOOKPOINT: activations[c, 1:]}, contexts[c, 1:], torch.arange(1, LENGTH),
                      torch.full((LENGTH - 1,), c), n_contexts=1)
    store = writer.finish()
    sae = create_sae("deep", d_in=D, n_latents=16, k=2, encoder_multiples=[2.0], preprocessing="token_l2",
                     hookpoint=HOOKPOINT)
    sae.save(tmp_path / "sae")
    word_tokenizer.save_pretrained(tmp_path / "tokenizer")
    with torch.no_grad():
        dense = sae.encode(sae.normalize(store.load(HOOKPOINT))[0]).to_dense()  # [tokens, latents], store order
    busiest = (dense > 0).sum(0).argsort(descending=True)[:2].tolist()

    code = main(["contexts", "--sae-dir", str(tmp_path / "sae"), "--store", str(tmp_path / "store"),
                 "--latents", ",".join(map(str, busiest)), "--tokenizer", str(tmp_path / "tokenizer"),
                 "--out-dir", str(tmp_path / "out"),
                 "--n-top", "2", "--n-random", "3", "--window-before", "2", "--window-after", "1",
                 "--self-check", "false"])  # an untrained SAE on random activations
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"latent {busiest[0]}:") and f"\n\nlatent {busiest[1]}:" in printed
    assert (tmp_path / "out" / "contexts.txt").read_text() == printed
    positions, context_index = store.positions(), store.context_index()
    saved = json.loads((tmp_path / "out" / "contexts.json").read_text())
    for entry in saved["latents"]:
        latent = entry["latent"]
        assert entry["count"] == int((dense[:, latent] > 0).sum()) > 0 and len(entry["top"]) == 2
        assert entry["max_activation"] == pytest.approx(dense[:, latent].max().item(), rel=1e-5)
        assert [e["kind"] for e in entry["top"]] == ["top"] * len(entry["top"])
        for example in entry["top"] + entry["random"]:
            for offset, value in enumerate(example["activations"]):
                row = (context_index == example["context"]) & (positions == example["start"] + offset)
                want = dense[row, latent].item() if row.any() else 0.0
                assert value == pytest.approx(want, rel=1e-5, abs=1e-7)
            assert ("<<" in example["text"]) == (max(example["activations"]) > 0)


def test_latents_must_be_named() -> None:
    with pytest.raises(ConfigError, match="name the latents"):
        ContextsConfig.from_dict({})


def test_contexts_command_runs_the_self_check_first(tmp_path, capsys) -> None:
    contexts = torch.randint(4, 100, (N_CONTEXTS, LENGTH))
    writer = StoreWriter(tmp_path / "store", model="synthetic", hookpoints=[HOOKPOINT], dtype="float32",
                         context_length=LENGTH, shard_tokens=40, contexts=contexts)
    for c in range(N_CONTEXTS):
        writer.append({HOOKPOINT: torch.randn(LENGTH - 1, D)}, contexts[c, 1:], torch.arange(1, LENGTH),
                      torch.full((LENGTH - 1,), c), n_contexts=1)
    writer.finish()
    sae = create_sae("relu", d_in=D, n_latents=16, hookpoint=HOOKPOINT)
    with torch.no_grad():
        sae.W_dec.mul_(-1.0)  # decodes against its encoder: FVU > 1 on any input
    sae.save(tmp_path / "sae")
    code = main(["contexts", "--sae-dir", str(tmp_path / "sae"), "--store", str(tmp_path / "store"),
                 "--latents", "0", "--out-dir", str(tmp_path / "out")])
    assert code != 0 and "--self-check false" in capsys.readouterr().err
    assert not (tmp_path / "out" / "contexts.txt").exists()
