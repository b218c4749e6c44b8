"""sparsify folders: fields that would change the function are never ignored, tensors are checked against cfg.json,
the hookpoint is the folder's name and the model the run's. Parity with sparsify's outputs is in test_parity.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from saelab.errors import CheckpointError
from saelab.saes.formats import load_any

FIXTURES = Path(__file__).parent / "fixtures"


def _copy(tmp_path: Path, name: str = "sparsify_topk") -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / "run")) / "layers.1"


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"activation": "groupmax"}, "activation 'groupmax' has no saelab equivalent"),
    ({"signed": True}, r"fields \['signed'\] are set but unknown"),
    ({"num_latents": 20}, r"encoder.weight has shape \(16, 8\), its config implies \(20, 8\)"),
    ({"skip_connection": True}, "lacks 'W_skip'"),
])
def test_what_cannot_be_read_exactly_is_refused(tmp_path: Path, changes: dict, message: str) -> None:
    folder = _copy(tmp_path)
    _edit_cfg(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_any(folder)


def test_training_only_fields_and_false_unknown_ones_are_accepted(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    _edit_cfg(folder, multi_topk=True, normalize_decoder=False, signed=False)
    assert load_any(folder).architecture == "topk"


def test_an_unused_tensor_is_an_error(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    tensors = load_file(str(folder / "sae.safetensors"))
    save_file({**tensors, "W_skip": tensors["W_dec"][:8].clone()}, str(folder / "sae.safetensors"))
    with pytest.raises(CheckpointError, match=r"\['W_skip'\] that a sparsify sparse coder"):
        load_any(folder)


def test_the_model_name_comes_from_the_run_config(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder.parent / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "hookpoints": []}))
    sae = load_any(folder)
    assert (sae.cfg.model_name, sae.cfg.hookpoint) == ("EleutherAI/pythia-70m", "layers.1")
