"""dictionary_learning folders: only plain state dicts are loaded (torch.load(weights_only=True)), the class comes
from config.json, and unsupported classes or mismatched tensors are named. Parity with the library's own outputs
is in test_parity.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from saelab.errors import CheckpointError
from saelab.saes.formats import load_any

FIXTURES = Path(__file__).parent / "fixtures"


class NotATensor:
    """Any class: unpickling it would run code from the file."""


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_a_pickle_with_objects_is_refused_not_unpickled(tmp_path: Path) -> None:
    folder = _copy("dl_topk", tmp_path)
    torch.save({"encoder.weight": torch.zeros(16, 8), "payload": NotATensor()}, folder / "ae.pt")
    with pytest.raises(CheckpointError, match=r"weights_only=True\) only, never arbitrary pickles"):
        load_any(folder)


def test_the_class_comes_from_config_json(tmp_path: Path) -> None:
    folder = _copy("dl_topk", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="holds no config.json"):
        load_any(folder)
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder"}}))
    with pytest.raises(CheckpointError, match="dict_class 'GatedAutoEncoder' is not supported"):
        load_any(folder)


def test_a_tensor_that_does_not_match_the_config_names_both_shapes(tmp_path: Path) -> None:
    folder = _copy("dl_autoencoder", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["trainer"]["dict_size"] = 20
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"encoder.weight has shape \(16, 8\), its config implies \(20, 8\)"):
        load_any(folder)


def test_an_unused_tensor_is_an_error(tmp_path: Path) -> None:
    folder = _copy("dl_jumprelu", tmp_path)
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "scaling_factor": torch.ones(16)}, folder / "ae.pt")
    with pytest.raises(CheckpointError, match=r"\['scaling_factor'\] that a dictionary_learning JumpReluAutoEncoder"):
        load_any(folder)
