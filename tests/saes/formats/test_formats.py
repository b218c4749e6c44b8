"""detect_format / load_any / write: unknown folders named with what they hold, refusals before any write, atomic
and verified writes, and saelab's own folders for every architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab.errors import CheckpointError, ConfigError
from saelab.saes import DeepSAE, DeepSAEConfig, JumpReLUSAE, MultiLayerSAE, MultiLayerSAEConfig, TopKSAE, formats
from saelab.saes.formats import detect_format, load_any, write
from saelab.saes.formats import saelens as saelens_format
from saelab.saes.initialization import seeded
from saelab.saes.jumprelu import JumpReLUSAEConfig
from saelab.saes.latents import to_dense
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.saes.topk import TopKSAEConfig

FIXTURES = Path(__file__).parent / "fixtures"


def _same_function(a, b, d: int, scale: float = 1.0) -> None:
    x = torch.randn(40, d, generator=torch.Generator().manual_seed(3)) * scale
    with torch.no_grad():
        torch.testing.assert_close(b.reconstruct(x), a.reconstruct(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(to_dense(b.encode(b.normalize(x)[0])), to_dense(a.encode(a.normalize(x)[0])),
                                   atol=1e-5, rtol=1e-5)


def _topk(**fields) -> TopKSAE:
    with seeded(0):
        sae = TopKSAE(TopKSAEConfig(d_in=6, n_latents=12, k=2, **fields))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.5)
    return sae


def test_a_folder_in_no_format_lists_what_it_holds_and_the_known_formats(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        load_any(tmp_path)
    message = str(err.value)
    assert "['cfg.json', 'weights.bin']" in message
    for name in ("saelab", "saelens", "sparsify", "dictionary_learning", "gemma_scope", "params.npz", "ae.pt"):
        assert name in message


def test_a_sparsify_run_folder_names_its_hookpoint_folders(tmp_path: Path) -> None:
    write(_topk(), tmp_path / "run" / "layers.2", to="sparsify")
    write(_topk(), tmp_path / "run" / "layers.0", to="sparsify")
    with pytest.raises(CheckpointError, match=r"one SAE per hookpoint \['layers.0', 'layers.2'\]"):
        detect_format(tmp_path / "run")
    assert load_any(tmp_path / "run" / "layers.2").cfg.hookpoint == "layers.2"


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a folder"):
        detect_format(tmp_path / "nope")


@pytest.mark.parametrize("to", ["saelens", "sparsify"])
def test_architectures_a_format_cannot_hold_are_refused_before_anything_is_written(tmp_path: Path, to: str) -> None:
    with seeded(0):
        deep = DeepSAE(DeepSAEConfig(d_in=6, n_latents=12, k=2))
        multi = MultiLayerSAE(MultiLayerSAEConfig(d_in=6, n_latents=12, k=2, layers=[1, 2],
                                                  hookpoints=["resid_post.1", "resid_post.2"], slice_widths=[3, 3],
                                                  layer_scales=[1.0, 1.0]))
    for sae in (deep, multi):
        with pytest.raises(ConfigError, match=f"{sae.architecture}.*no {'SAELens' if to == 'saelens' else to} "
                                              "equivalent.*--to saelab"):
            write(sae, tmp_path / "out", to=to)
    assert list(tmp_path.iterdir()) == []


def test_deep_and_multilayer_saes_round_trip_through_saelab_folders(tmp_path: Path) -> None:
    with seeded(1):
        deep = DeepSAE(DeepSAEConfig(d_in=6, n_latents=12, k=2, preprocessing="token_l2"))
        multi = MultiLayerSAE(MultiLayerSAEConfig(d_in=6, n_latents=12, k=2, layers=[1, 2],
                                                  hookpoints=["resid_post.1", "resid_post.2"], slice_widths=[3, 3],
                                                  layer_scales=[1.0, 1.0]))
    for name, sae in (("deep", deep), ("multi", multi)):
        again = load_any(write(sae, tmp_path / name, to="saelab"))
        assert type(again) is type(sae) and detect_format(tmp_path / name) == "saelab"
        _same_function(sae, again, 6)


def test_a_per_token_normalisation_is_refused_by_the_formats_without_one(tmp_path: Path) -> None:
    sae = _topk(preprocessing="token_l2")
    for to in ("saelens", "sparsify"):
        with pytest.raises(ConfigError, match="normalises each token"):
            write(sae, tmp_path / to, to=to)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("to", ["saelens", "sparsify"])
def test_a_fixed_input_scale_is_folded_into_the_weights(tmp_path: Path, to: str) -> None:
    sae = _topk(preprocessing="scale", input_scale=0.25)
    again = load_any(write(sae, tmp_path / "layers.3", to=to))
    assert again.cfg.preprocessing == "none"
    _same_function(sae, again, 6, scale=4.0)


def test_a_tied_relu_sae_is_written_with_its_decoder(tmp_path: Path) -> None:
    with seeded(2):
        sae = ReluSAE(ReluSAEConfig(d_in=6, n_latents=12, tied=True, hookpoint="resid_post.3", model_name="m"))
    again = load_any(write(sae, tmp_path / "sl", to="saelens"))
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "standard"
    assert cfg["metadata"] == {"hook_name": "blocks.3.hook_resid_post", "model_name": "m"}
    _same_function(sae, again, 6)


def test_an_existing_destination_is_kept_unless_overwrite(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        write(_topk(), dst, to="saelens")
    assert (dst / "keep.txt").read_text() == "mine"
    write(_topk(), dst, to="saelens", overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_no_half_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = saelens_format.write

    def half_then_fail(sae, folder: Path) -> None:
        real(sae, folder)
        raise OSError("disk full")

    monkeypatch.setattr(saelens_format, "write", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write(_topk(), tmp_path / "out", to="saelens")
    assert list(tmp_path.iterdir()) == []


def test_a_written_folder_that_would_compute_something_else_is_not_kept(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = saelens_format.read

    def drifted(folder: Path, norm_scaling_factor=None):
        sae = real(folder, norm_scaling_factor)
        with torch.no_grad():
            sae.b_dec.add_(1e-2)
        return sae

    monkeypatch.setattr(saelens_format, "read", drifted)
    with pytest.raises(CheckpointError, match="would not reproduce the SAE's latents.*nothing was written"):
        write(_topk(), tmp_path / "out", to="saelens")
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_target_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"choose one of \['saelens', 'sparsify', 'saelab'\]"):
        write(_topk(), tmp_path / "out", to="dictionary_learning")


def test_norm_scaling_factor_applies_to_saelens_folders_only(tmp_path: Path) -> None:
    write(_topk(), tmp_path / "sae", to="saelab")
    with pytest.raises(ConfigError, match="SAELens folders only"):
        load_any(tmp_path / "sae", norm_scaling_factor=2.0)


def test_an_sae_that_exports_as_jumprelu_is_written_as_saelens_jumprelu(tmp_path: Path) -> None:
    """The hook for SAEs whose inference is a threshold (BatchTopK): `as_jumprelu()` gives the written SAE."""

    class ThresholdedTopK(TopKSAE):
        architecture = "thresholded_topk_for_this_test"

        def as_jumprelu(self) -> JumpReLUSAE:
            out = JumpReLUSAE(JumpReLUSAEConfig(d_in=self.d_in, n_latents=self.n_latents, apply_b_dec_to_input=True))
            out.load_state_dict({**self.state_dict(), "threshold": torch.full((self.n_latents,), 0.1)})
            return out

    sae = ThresholdedTopK(TopKSAEConfig(d_in=6, n_latents=12, k=2))
    again = load_any(write(sae, tmp_path / "out", to="saelens"))
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["architecture"] == "jumprelu"
    _same_function(sae.as_jumprelu(), again, 6)


def test_load_any_moves_the_sae_to_the_device() -> None:
    sae = load_any(FIXTURES / "saelens_topk", device="meta")
    assert sae.device.type == "meta"


def test_formats_registry_lists_readers_and_writers() -> None:
    assert list(formats.FORMATS) == ["saelab", "saelens", "sparsify", "dictionary_learning", "gemma_scope"]
    assert formats.WRITABLE == ("saelens", "sparsify", "saelab")
