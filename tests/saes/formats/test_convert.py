"""`saelab convert SRC DST --to FORMAT` end to end through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.cli import main
from saelab.saes.formats import detect_format, load_any

FIXTURES = Path(__file__).parent / "fixtures"


def test_convert_writes_the_target_format_and_keeps_the_function(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "layers.1"
    assert main(["convert", str(FIXTURES / "dl_topk"), str(dst), "--to", "sparsify"]) == 0
    assert "(dictionary_learning, topk, d_in=8, n_latents=16" in capsys.readouterr().out
    assert detect_format(dst) == "sparsify"
    io = load_file(str(FIXTURES / "dl_topk" / "io.safetensors"))
    torch.testing.assert_close(load_any(dst).reconstruct(io["x"]), io["x_hat"], atol=1e-5, rtol=1e-5)


def test_convert_refuses_what_the_target_cannot_hold_and_writes_nothing(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(FIXTURES / "saelens_jumprelu"), str(tmp_path / "out"), "--to", "sparsify"]) == 2
    assert "JumpReLUSAE ('jumprelu') has no sparsify equivalent" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_convert_of_an_unknown_folder_lists_what_it_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.bin").write_bytes(b"")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "saelab"]) == 2
    err = capsys.readouterr().err
    assert "saelab convert: error:" in err and "['model.bin']" in err and "Known formats" in err


def test_convert_needs_a_target_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(FIXTURES / "dl_topk"), str(tmp_path / "out")]) == 2
    assert "convert needs the format to write: --to saelens, --to sparsify or --to saelab" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
