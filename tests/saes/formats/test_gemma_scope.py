"""Gemma Scope's raw params.npz, written here with numpy as the release lays it out, against a hand computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.errors import CheckpointError
from saelab.saes.formats import detect_format, load_any
from saelab.saes.jumprelu import JumpReLUSAE


def _params(**changes: np.ndarray) -> dict[str, np.ndarray]:
    params = {
        "W_enc": np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=np.float32),  # [d=2, n=3]
        "b_enc": np.array([0.0, -0.5, 0.0], dtype=np.float32),
        "threshold": np.array([0.5, 0.2, 2.5], dtype=np.float32),
        "W_dec": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32),
        "b_dec": np.array([10.0, 10.0], dtype=np.float32),  # added after decoding, never subtracted before
    }
    return {**params, **changes}


def test_params_npz_is_a_jumprelu_sae_that_encodes_x_itself(tmp_path: Path) -> None:
    np.savez(tmp_path / "params.npz", **_params())
    assert detect_format(tmp_path) == "gemma_scope"
    sae = load_any(tmp_path)
    assert isinstance(sae, JumpReLUSAE) and not sae.cfg.apply_b_dec_to_input
    x = torch.tensor([[1.0, 1.0], [0.4, 3.0]])
    # pre = x @ W_enc + b_enc = [1, 0.5, 2] and [0.4, 2.5, 3.4]; kept where pre > threshold [0.5, 0.2, 2.5]
    want_z = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.5, 3.4]])
    # x_hat = z @ W_dec + b_dec
    want_x_hat = torch.tensor([[11.0, 10.5], [13.4, 15.9]])
    torch.testing.assert_close(sae.encode(x), want_z)
    torch.testing.assert_close(sae.reconstruct(x), want_x_hat)


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path: Path) -> None:
    np.savez(tmp_path / "params.npz", **_params(threshold=np.zeros(4, dtype=np.float32)))
    with pytest.raises(CheckpointError, match=r"threshold has shape \(4,\), its config implies \(3,\)"):
        load_any(tmp_path)


def test_a_missing_threshold_is_not_dropped_silently(tmp_path: Path) -> None:
    params = _params()
    del params["threshold"]
    np.savez(tmp_path / "params.npz", **params)
    with pytest.raises(CheckpointError, match="lacks 'threshold'"):
        load_any(tmp_path)


def test_an_npz_holding_pickled_objects_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "params.npz", **_params(), extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="cannot be read as an .npz of arrays"):
        load_any(tmp_path)
