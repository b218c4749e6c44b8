"""The command line: instant help (no model or plotting library imported to build it), and every command's flags."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saelab.cli import COMMANDS, build_parser, load_command, main
from saelab.config import Config

HEAVY = ("transformers", "matplotlib")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(__import__('json').dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_importing_the_cli_and_top_level_help_import_no_model_or_plot_library() -> None:
    assert _imported_after("import saelab.cli") == []
    top_help = "import saelab.cli\ntry:\n    saelab.cli.main(['--help'])\nexcept SystemExit:\n    pass"
    assert _imported_after(top_help) == []


def test_every_commands_parser_builds_without_model_or_plot_libraries() -> None:
    code = "from saelab.cli import COMMANDS, build_parser\nfor name in COMMANDS:\n    build_parser(name)"
    assert _imported_after(code) == []


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_resolves_to_a_config_and_an_entry_point(name: str) -> None:
    config_cls, run = load_command(name)
    assert callable(run) and issubclass(config_cls, Config)
    help_text = build_parser(name)._subparsers._group_actions[0].choices[name].format_help()
    writes = any(flag in help_text for flag in ("--out-dir", "--out", "DST", "OUT"))  # where it writes
    assert writes or (name == "view" and "RUN_DIR" in help_text)  # view only reads a run folder


def test_a_bad_flag_value_is_one_clear_error(capsys) -> None:
    assert main(["train", "--trainer.batch-size", "many"]) == 2
    error = "saelab train: error: TrainConfig.trainer.batch_size: expected int, got 'many'"
    assert capsys.readouterr().err.strip() == error
