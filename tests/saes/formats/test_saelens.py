"""SAELens folders as saelab writes them match what SAELens itself writes, and reading names what does not match.
(Reading edge cases of older SAELens versions: tests/saes/test_pretrained.py; parity: test_parity.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from saelab.errors import CheckpointError
from saelab.saes.formats import load_any, write

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["saelens_standard", "saelens_topk", "saelens_jumprelu"])
def test_written_cfg_has_the_keys_saelens_writes(tmp_path: Path, name: str) -> None:
    theirs = json.loads((FIXTURES / name / "cfg.json").read_text())
    write(load_any(FIXTURES / name), tmp_path / "out", to="saelens")
    ours = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert set(ours) == set(theirs)
    assert {key: v for key, v in ours.items() if key != "metadata"} == {key: v for key, v in theirs.items()
                                                                      if key != "metadata"}
    assert ours["metadata"] == {"hook_name": theirs["metadata"]["hook_name"],
                                "model_name": theirs["metadata"]["model_name"]}


def test_the_hook_name_is_kept_as_found(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(FIXTURES / "saelens_topk", tmp_path / "sae"))
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.0.ln1.hook_normalized"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert load_any(folder).cfg.hookpoint == "blocks.0.ln1.hook_normalized"


def test_a_tensor_that_does_not_match_the_cfg_names_both_shapes(tmp_path: Path) -> None:
    folder = Path(shutil.copytree(FIXTURES / "saelens_jumprelu", tmp_path / "sae"))
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 32}))
    with pytest.raises(CheckpointError, match=r"W_enc has shape \(8, 16\), its config implies \(8, 32\)"):
        load_any(folder)


@pytest.mark.parametrize("mode", ["layer_norm", "constant_norm_rescale"])
def test_normalisations_without_a_saelab_equivalent_are_refused(tmp_path: Path, mode: str) -> None:
    folder = Path(shutil.copytree(FIXTURES / "saelens_standard", tmp_path / "sae"))
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": mode}))
    with pytest.raises(CheckpointError, match=f"normalize_activations='{mode}' has no saelab equivalent"):
        load_any(folder)
