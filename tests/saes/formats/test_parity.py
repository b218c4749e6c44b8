"""The fixtures in `fixtures/` were written by SAELens, sparsify and dictionary_learning themselves, with the
latents and reconstructions those libraries computed (`bench/interop_fixtures.py`, run in the peers' venv).
saelab must load each one and compute the same, and keep computing it through every format that can hold it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.errors import ConfigError
from saelab.saes.formats import WRITABLE, detect_format, load_any, write
from saelab.saes.latents import to_dense

FIXTURES = Path(__file__).parent / "fixtures"
# fixture folder -> (format, saelab architecture, hookpoint as the files give it)
EXPECTED = {
    "saelens_standard": ("saelens", "relu", "blocks.1.hook_resid_post"),
    "saelens_standard_no_b_dec_in": ("saelens", "relu", "blocks.1.hook_resid_post"),
    "saelens_topk": ("saelens", "topk", "blocks.1.hook_resid_post"),
    "saelens_topk_rescaled": ("saelens", "topk", "blocks.1.hook_resid_post"),
    "saelens_jumprelu": ("saelens", "jumprelu", "blocks.1.hook_resid_post"),
    "saelens_batchtopk": ("saelens", "jumprelu", None),
    "saelens_matryoshka": ("saelens", "jumprelu", None),
    "sparsify_topk/layers.1": ("sparsify", "topk", "layers.1"),
    "sparsify_transcoder_skip/layers.1.mlp": ("sparsify", "topk_transcoder", "layers.1.mlp"),
    "dl_autoencoder": ("dictionary_learning", "relu", "resid_post_layer_1"),
    "dl_topk": ("dictionary_learning", "topk", "resid_post_layer_1"),
    "dl_batchtopk": ("dictionary_learning", "jumprelu", "resid_post_layer_1"),
    "dl_matryoshka": ("dictionary_learning", "jumprelu", "resid_post_layer_1"),
    "dl_jumprelu": ("dictionary_learning", "jumprelu", "resid_post_layer_1"),
}
# saelab architecture -> the formats that can hold it
HOLDS = {"relu": {"saelens", "saelab"}, "topk": {"saelens", "sparsify", "saelab"},
         "jumprelu": {"saelens", "saelab"}, "topk_transcoder": {"sparsify", "saelab"}}
TOL = dict(atol=1e-5, rtol=1e-5)


def _outputs(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return to_dense(sae.encode(sae.normalize(x)[0])), sae.reconstruct(x)


def test_every_fixture_is_listed() -> None:
    found = {str(p.parent.relative_to(FIXTURES)) for p in FIXTURES.rglob("io.safetensors")}
    assert found - {"circuit_tracer"} == set(EXPECTED)  # circuit-tracer's set: tests/saes/formats/test_circuit_tracer


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_saelab_computes_what_the_peer_computed(name: str) -> None:
    folder = FIXTURES / name
    fmt, architecture, hookpoint = EXPECTED[name]
    io = load_file(str(folder / "io.safetensors"))
    assert detect_format(folder) == fmt
    sae = load_any(folder)
    assert (sae.architecture, sae.cfg.hookpoint) == (architecture, hookpoint)
    latents, x_hat = _outputs(sae, io["x"])
    assert (io["latents"] > 0).any(dim=1).float().mean() > 0.5  # the fixture exercises the encoder
    torch.testing.assert_close(latents, io["latents"], **TOL)
    torch.testing.assert_close(x_hat, io["x_hat"], **TOL)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("to", WRITABLE)
def test_every_format_that_holds_it_keeps_the_function(tmp_path: Path, name: str, to: str) -> None:
    sae = load_any(FIXTURES / name)
    dst = tmp_path / "layers.1"
    if to not in HOLDS[sae.architecture]:
        with pytest.raises(ConfigError, match="no .* equivalent"):
            write(sae, dst, to=to)
        assert list(tmp_path.iterdir()) == []
        return
    io = load_file(str(FIXTURES / name / "io.safetensors"))
    again = load_any(write(sae, dst, to=to))
    assert detect_format(dst) == to
    latents, x_hat = _outputs(again, io["x"])
    torch.testing.assert_close(latents, io["latents"], **TOL)
    torch.testing.assert_close(x_hat, io["x_hat"], **TOL)
