"""`saelab train --target-hookpoint`: transcoders from a store holding both hookpoints and streamed from a model."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.activations.store import ActivationStore
from saelab.activations.stream import ActivationStream
from saelab.activations.writer import StoreWriter
from saelab.cli import main
from saelab.data.tokenize import DataConfig
from saelab.errors import ConfigError
from saelab.metrics import fraction_of_variance_unexplained
from saelab.models.hooks import capture
from saelab.saes import load_sae
from saelab.saes.transcoder import TopKTranscoder
from saelab.training.entry import TrainConfig

D_IN, D_OUT = 16, 12


def _linear_store(folder, sparse: bool) -> tuple[ActivationStore, torch.Tensor]:
    """mlp_in.0 = x, mlp_out.0 = A·x exactly: dense Gaussian x, or (sparse) x a positive mix of 2 of 8 atoms."""
    generator = torch.Generator().manual_seed(0)
    n = 4096
    if sparse:
        atoms = torch.nn.functional.normalize(torch.randn(8, D_IN, generator=generator), dim=1)
        picks = torch.rand(n, 8, generator=generator).argsort(dim=1)[:, :2]
        x = ((torch.rand(n, 2, generator=generator) + 0.5)[:, :, None] * atoms[picks]).sum(1)
    else:
        x = torch.randn(n, D_IN, generator=generator) * 3
    a = torch.randn(D_OUT, D_IN, generator=generator) / D_IN**0.5
    writer = StoreWriter(folder, model="synthetic", hookpoints=["mlp_in.0", "mlp_out.0"], dtype="float32",
                         context_length=8, shard_tokens=1024)
    writer.append({"mlp_in.0": x, "mlp_out.0": x @ a.T}, torch.arange(n) % 50, torch.arange(n) % 8,
                  torch.arange(n) // 8, n_contexts=n // 8)
    return writer.finish(), a


@pytest.mark.parametrize("skip", [True, False])
def test_a_transcoder_learns_an_exactly_linear_target(tmp_path, skip: bool) -> None:
    # with the skip connection the map is W_skip itself; without it, inputs made of 2 of 8 atoms give 8 latents
    # whose decoder rows are the atoms' images A·atom
    store, a = _linear_store(tmp_path / "store", sparse=not skip)
    out = tmp_path / "run"
    assert main(["train", "--store", str(store.path), "--hookpoint", "mlp_in.0", "--target-hookpoint", "mlp_out.0",
                 "--sae.n-latents", "64", "--sae.k", "1" if skip else "2", "--sae.skip-connection", str(skip).lower(),
                 "--trainer.total-tokens", str(256 * (200 if skip else 400)), "--trainer.batch-size", "256",
                 "--trainer.lr", "1e-2", "--trainer.warmup-steps", "0", "--trainer.progress", "false",
                 "--out-dir", str(out)]) == 0
    tc = load_sae(out / "sae")
    assert isinstance(tc, TopKTranscoder) and tc.cfg.skip_connection == skip and tc.d_out == D_OUT
    assert (tc.cfg.hookpoint, tc.cfg.target_hookpoint) == ("mlp_in.0", "mlp_out.0")
    assert tc.cfg.input_scale == pytest.approx(store.norm_stats("mlp_in.0").scale)
    assert tc.cfg.target_scale == pytest.approx(store.norm_stats("mlp_out.0").scale)
    x = store.load("mlp_in.0")
    fvu = fraction_of_variance_unexplained(x @ a.T, tc.reconstruct(x)).item()
    assert fvu < 0.01
    logged = json.loads((out / "summary.json").read_text())["final"]["fvu"]
    assert logged < 0.02  # the logged FVU is the target's too (an input-FVU would not fall with a d_out != d_in map)


def test_store_transcoder_needs_the_target_in_the_store_and_one_target(tmp_path, capsys) -> None:
    store, _ = _linear_store(tmp_path / "store", sparse=False)
    base = ["train", "--store", str(store.path), "--hookpoint", "mlp_in.0", "--out-dir", str(tmp_path / "r")]
    assert main([*base, "--target-hookpoint", "mlp_out.1"]) != 0
    assert "'mlp_out.1' is not in the store" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="one target per input hookpoint"):
        TrainConfig(store="s", hookpoint="mlp_in.0", target_hookpoint=["mlp_out.0", "mlp_out.1"]).validate()


def test_streamed_transcoders_read_their_targets_in_the_same_forward(saved_tiny_llama, tmp_path) -> None:
    from saelab.models.loading import load_model

    model_dir, corpus = saved_tiny_llama()
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--hookpoints", "mlp_in.0,mlp_in.2",
                 "--target-hookpoint", "mlp_out.0,mlp_out.2", "--sae.skip-connection", "true",
                 "--data.source", str(corpus), "--data.context-length", "16", "--data.n-tokens", "600",
                 "--sae.n-latents", "16", "--sae.k", "2", "--trainer.total-tokens", "384",
                 "--trainer.batch-size", "32", "--trainer.warmup-steps", "0", "--trainer.lr", "1e-2",
                 "--trainer.progress", "false", "--buffer-tokens", "128", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["saes"]) == {"mlp_in.0", "mlp_in.2"} and summary["completed"]
    model, tokenizer = load_model(str(model_dir), "cpu", torch.float32)
    ids = tokenizer(corpus.read_text().split("\n\n")[0], return_tensors="pt").input_ids[:, :16]
    acts = capture(model, ids, ["mlp_in.2", "mlp_out.2"])
    tc = load_sae(out / "mlp_in.2" / "sae")
    assert isinstance(tc, TopKTranscoder) and tc.cfg.target_hookpoint == "mlp_out.2"
    x, y = acts["mlp_in.2"][0], acts["mlp_out.2"][0]
    # FVU against the target, logged and measured: below 1, which rows of the target paired with other tokens'
    # inputs could not give
    fvu = fraction_of_variance_unexplained(y, tc.reconstruct(x)).item()
    assert fvu < 0.95 and summary["saes"]["mlp_in.2"]["fvu"] < 1.0
    # the stream pairs every input row with the target of the same token: the MLP applied to it
    stream = ActivationStream(model, tokenizer, ids, ["mlp_in.2", "mlp_out.2"], DataConfig(), batch_size=8,
                              buffer_tokens=16)
    batch = next(stream.batches())
    with torch.no_grad():
        torch.testing.assert_close(model.model.layers[2].mlp(batch["mlp_in.2"]), batch["mlp_out.2"])
