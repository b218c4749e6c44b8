"""The circuit-tracer transcoder-set export against files circuit-tracer itself wrote (fixtures/circuit_tracer, by
bench/circuit_tracer_check.py with circuit-tracer 0.5.0): the same tensor names, shapes and dtypes, the same arithmetic,
the config keys its loader reads; the top-k -> JumpReLU calibration; refusals; the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saelab.activations.writer import StoreWriter
from saelab.cli import main
from saelab.errors import ConfigError
from saelab.saes.formats.circuit_tracer import (
    CONFIG,
    THRESHOLD,
    apply_layer,
    jumprelu_threshold,
    layer_file,
    write_transcoder_set,
)
from saelab.saes.initialization import seeded
from saelab.saes.transcoder import TopKTranscoder, TopKTranscoderConfig

FIXTURE = Path(__file__).parent / "fixtures" / "circuit_tracer"
D, N = 8, 16


def _tc(layer: int, skip: bool = True, d_out: int | None = None, **fields) -> TopKTranscoder:
    with seeded(layer):
        tc = TopKTranscoder(TopKTranscoderConfig(
            d_in=D, n_latents=N, k=3, d_out=d_out, skip_connection=skip, preprocessing="scale", input_scale=1.7,
            target_scale=0.6, hookpoint=f"mlp_in.{layer}", target_hookpoint=f"mlp_out.{layer}", model_name="tiny",
            **fields))
        with torch.no_grad():
            for p in tc.parameters():
                p.normal_(std=0.5)
    return tc


def test_circuit_tracers_own_files_are_read_by_our_arithmetic() -> None:
    io = load_file(str(FIXTURE / "io.safetensors"))
    for layer in range(2):
        out, _ = apply_layer(load_file(str(FIXTURE / layer_file(layer))), io["x"])
        torch.testing.assert_close(out, io[f"out_{layer}"], atol=1e-5, rtol=1e-5)


def test_export_has_circuit_tracers_names_shapes_dtypes_and_config_keys(tmp_path) -> None:
    transcoders = {layer: _tc(layer) for layer in range(2)}
    calibration = {layer: torch.randn(256, D) * 2 for layer in range(2)}
    stats = write_transcoder_set(transcoders, tmp_path / "set", calibration)
    for layer in range(2):
        ours = load_file(str(tmp_path / "set" / layer_file(layer)))
        theirs = load_file(str(FIXTURE / layer_file(layer)))
        assert {n: (t.shape, t.dtype) for n, t in ours.items()} == {n: (t.shape, t.dtype) for n, t in theirs.items()}
        assert stats[layer]["l0"] == pytest.approx(3.0)  # k on average over the calibration tokens
    config = yaml.safe_load((tmp_path / "set" / CONFIG).read_text())
    assert config == {"model_name": "tiny", "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                      "feature_output_hook": "mlp.hook_out"}
    assert sorted(p.name for p in (tmp_path / "set").glob("layer_*")) == [layer_file(0), layer_file(1)]


def test_the_exported_layer_is_the_transcoder_with_its_threshold_on_raw_activations(tmp_path) -> None:
    tc = _tc(0)
    x = torch.randn(512, D) * 2
    write_transcoder_set({0: tc}, tmp_path / "set", {0: x})
    tensors = load_file(str(tmp_path / "set" / layer_file(0)))
    theta = jumprelu_threshold(tc, x)
    assert float(tensors[THRESHOLD][0]) == pytest.approx(theta) and (tensors[THRESHOLD] == tensors[THRESHOLD][0]).all()
    with torch.no_grad():  # the same function written out by hand in the transcoder's own (scaled) space
        pre = torch.relu(1.7 * x @ tc.W_enc.T + tc.b_enc)
        z = pre * (pre > theta)
        want = (z @ tc.W_dec + tc.b_dec + 1.7 * x @ tc.W_skip.T) / 0.6
        assert int((z > 0).sum()) == 3 * 512  # as many activations as top-k keeps
    out, _ = apply_layer(tensors, x)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_what_circuit_tracer_cannot_load_is_refused_before_writing(tmp_path) -> None:
    calibration = {layer: torch.randn(8, D) for layer in range(3)}
    with pytest.raises(ConfigError, match=r"missing layers \[1\]"):
        write_transcoder_set({0: _tc(0), 2: _tc(2)}, tmp_path / "a", calibration)
    with pytest.raises(ConfigError, match="maps 8 to 5"):
        write_transcoder_set({0: _tc(0, d_out=5)}, tmp_path / "b", calibration)
    with pytest.raises(ConfigError, match="one width"):
        wide = TopKTranscoder(TopKTranscoderConfig(d_in=D, n_latents=2 * N, k=3, hookpoint="mlp_in.1",
                                                   target_hookpoint="mlp_out.1", model_name="tiny"))
        write_transcoder_set({0: _tc(0), 1: wide}, tmp_path / "c", calibration)
    assert not any(tmp_path.iterdir())


def test_export_transcoders_command(tmp_path, capsys) -> None:
    writer = StoreWriter(tmp_path / "store", model="tiny", hookpoints=["mlp_in.0", "mlp_in.1"], dtype="float32",
                         context_length=4, shard_tokens=64)
    n = 128
    writer.append({"mlp_in.0": torch.randn(n, D), "mlp_in.1": torch.randn(n, D)}, torch.arange(n) % 50,
                  torch.arange(n) % 4, torch.arange(n) // 4, n_contexts=n // 4)
    writer.finish()
    for layer in range(2):
        _tc(layer).save(tmp_path / "run" / f"mlp_in.{layer}" / "sae")
    args = ["export-transcoders", str(tmp_path / "run"), str(tmp_path / "out"), "--to", "circuit-tracer", "--store",
            str(tmp_path / "store"), "--feature-output-hook", "hook_mlp_out"]
    assert main(args) == 0
    assert "2 layers" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "out" / CONFIG).read_text())["feature_output_hook"] == "hook_mlp_out"
    stats = json.loads((tmp_path / "out" / "saelab_export.json").read_text())["layers"]
    assert stats["1"]["calibration_tokens"] == n and stats["1"]["l0"] == pytest.approx(3.0)
    assert main(args) != 0  # OUT exists: refused without --overwrite
    assert main(args[:-4]) != 0 and "--store" in capsys.readouterr().err
