"""SAELens folders written here by hand, loaded, and checked against SAELens's formulas computed directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from saelab.errors import CheckpointError
from saelab.saes.base import load_sae
from saelab.saes.jumprelu import JumpReLUSAE
from saelab.saes.pretrained import load_saelens
from saelab.saes.relu import ReluSAE
from saelab.saes.topk import TopKSAE

D_IN, D_SAE = 6, 10


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """SAELens layout: W_enc [d_in, d_sae], W_dec [d_sae, d_in] (rows not unit norm, as in Gemma Scope)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": 0.3 * torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * torch.linspace(0.5, 2.0, D_SAE)[:, None],
        "b_dec": torch.randn(D_IN, generator=g),
    }


def _write(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _gemma_scope_cfg(**overrides: Any) -> dict[str, Any]:
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "model_name": "gemma-2-2b",
        "hook_name": "blocks.3.hook_resid_post",
        "hook_layer": 3,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
        "context_size": 1024,
        "apply_b_dec_to_input": False,
        "normalize_activations": None,
    }
    return {**cfg, **overrides}


def _x(n: int = 64) -> torch.Tensor:
    return 2 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(9))


def test_jumprelu_matches_gemma_scope_formula_and_threshold_matters(tmp_path: Path) -> None:
    w = _weights()
    x = _x()
    pre = x @ w["W_enc"] + w["b_enc"]
    threshold = pre.clamp_min(0).median(dim=0).values  # half of the positive activations fall below it
    folder = _write(tmp_path / "js", _gemma_scope_cfg(), {**w, "threshold": threshold})
    sae = load_saelens(folder)
    assert isinstance(sae, JumpReLUSAE)
    assert (sae.cfg.hookpoint, sae.cfg.model_name) == ("resid_post.3", "gemma-2-2b")
    assert not sae.cfg.apply_b_dec_to_input
    z = pre * (pre > threshold)
    expected = z @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), z)
        torch.testing.assert_close(sae.reconstruct(x), expected)
    relu_only = pre.clamp_min(0) @ w["W_dec"] + w["b_dec"]
    assert (relu_only - expected).abs().max() > 0.1


def test_jumprelu_round_trips_through_saelab_format(tmp_path: Path) -> None:
    w = _weights(1)
    cfg = _gemma_scope_cfg(apply_b_dec_to_input=True)
    sae = load_saelens(_write(tmp_path / "js", cfg, {**w, "threshold": torch.full((D_SAE,), 0.5)}))
    sae.save(tmp_path / "ours")
    again = load_sae(tmp_path / "ours")
    assert isinstance(again, JumpReLUSAE) and again.cfg.apply_b_dec_to_input
    with torch.no_grad():
        torch.testing.assert_close(again.reconstruct(_x()), sae.reconstruct(_x()))


def test_old_jumprelu_log_threshold_and_finetuning_scale_fold(tmp_path: Path) -> None:
    w = _weights(2)
    threshold = torch.full((D_SAE,), 0.4)
    scale = torch.linspace(0.5, 1.5, D_SAE)
    cfg = _gemma_scope_cfg(finetuning_scaling_factor=True)
    tensors = {**w, "log_threshold": threshold.log(), "scaling_factor": scale}
    sae = load_saelens(_write(tmp_path / "old", cfg, tensors))
    x = _x()
    pre = x @ w["W_enc"] + w["b_enc"]
    expected = (pre * (pre > threshold) * scale) @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_standard_relu_sae_from_pre_6_config(tmp_path: Path, apply_b_dec: bool) -> None:
    w = _weights(3)
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_point": "blocks.0.hook_mlp_out",
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
    }
    sae = load_saelens(_write(tmp_path / "std", cfg, w))
    assert isinstance(sae, ReluSAE) and sae.cfg.hookpoint == "mlp_out.0"
    x = _x()
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x), pre.relu() @ w["W_dec"] + w["b_dec"], atol=1e-5, rtol=1e-5)


def _saelens_topk(
    x: torch.Tensor, w: dict[str, torch.Tensor], k: int, rescale: bool, apply_b_dec: bool
) -> torch.Tensor:
    pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=1)
    if rescale:
        pre = pre * norms
    top = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    if rescale:
        acts = acts / norms
    return acts @ w["W_dec"] + w["b_dec"]


def test_topk_written_as_standard_loads_as_topk(tmp_path: Path) -> None:
    # SAELens < 6 marked TopK SAEs as architecture "standard"; reading them as ReLU is a known silent mix-up.
    w = _weights(4)
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk"}
    sae = load_saelens(_write(tmp_path / "tk", {**cfg, "activation_fn_kwargs": {"k": 3}}, w))
    assert isinstance(sae, TopKSAE) and sae.k == 3
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(_x()), _saelens_topk(_x(), w, 3, False, True), atol=1e-5, rtol=1e-5)


def test_topk_v6_with_decoder_norm_rescaling_and_no_b_dec_on_input(tmp_path: Path) -> None:
    w = _weights(5)
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 4,
        "rescale_acts_by_decoder_norm": True,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {"model_name": "pythia-70m", "hook_name": "blocks.2.hook_resid_pre", "sae_lens_version": "6.5.0"},
    }
    sae = load_saelens(_write(tmp_path / "tk6", cfg, w))
    assert (sae.cfg.model_name, sae.cfg.hookpoint) == ("pythia-70m", "resid_pre.2")
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(_x()), _saelens_topk(_x(), w, 4, True, False), atol=1e-4, rtol=1e-4)


def test_expected_average_normalisation_needs_and_uses_the_scaling_factor(tmp_path: Path) -> None:
    w = _weights(6)
    cfg = _gemma_scope_cfg(normalize_activations="expected_average_only_in", apply_b_dec_to_input=True)
    folder = _write(tmp_path / "norm", cfg, {**w, "threshold": torch.full((D_SAE,), 0.2)})
    with pytest.raises(CheckpointError, match="norm_scaling_factor"):
        load_saelens(folder)
    sae = load_saelens(folder, norm_scaling_factor=0.25)
    x = _x()
    pre = (0.25 * x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = ((pre * (pre > 0.2)) @ w["W_dec"] + w["b_dec"]) / 0.25
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x), expected, atol=1e-5, rtol=1e-5)


def _mutations() -> list[tuple[str, dict[str, Any], dict[str, Any], str]]:
    """(case, cfg overrides, tensor overrides; None drops a tensor, error message fragment)."""
    extra = torch.zeros(D_SAE)
    return [
        ("unknown architecture", {"architecture": "gated"}, {}, "not supported"),
        ("dropped threshold", {}, {"threshold": None}, "lacks 'threshold'"),
        ("unused tensor", {"architecture": "standard"}, {}, "does not use"),
        ("stray batchtopk threshold", {}, {"topk_threshold": extra}, "does not use"),
        ("layer norm", {"normalize_activations": "layer_norm"}, {}, "no saelab equivalent"),
        ("topk without k", {"architecture": "topk"}, {"threshold": None}, "needs an integer k"),
        ("wrong shape", {"d_sae": D_SAE + 1}, {}, "shape"),
        ("attention heads", {"hook_name": "blocks.1.attn.hook_z"}, {}, "attention heads"),
        ("scale without flag", {}, {"scaling_factor": torch.full((D_SAE,), 2.0)}, "disagree"),
        ("rescale on jumprelu", {"rescale_acts_by_decoder_norm": True}, {}, "only defined for TopK"),
        ("other activation", {"activation_fn_str": "tanh-relu"}, {}, "not supported"),
    ]


@pytest.mark.parametrize(("case", "cfg_changes", "tensor_changes", "message"), _mutations(), ids=lambda v: str(v)[:24])
def test_unmappable_folders_fail_loudly(
    tmp_path: Path, case: str, cfg_changes: dict[str, Any], tensor_changes: dict[str, Any], message: str
) -> None:
    tensors = {**_weights(7), "threshold": torch.full((D_SAE,), 0.3), **tensor_changes}
    folder = _write(
        tmp_path / "bad", _gemma_scope_cfg(**cfg_changes), {k: v for k, v in tensors.items() if v is not None}
    )
    with pytest.raises(CheckpointError, match=message):
        load_saelens(folder)


def test_missing_or_damaged_files_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cfg.json"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(_gemma_scope_cfg()))
    with pytest.raises(CheckpointError, match="missing"):
        load_saelens(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_saelens(tmp_path)
