import argparse
import dataclasses

import pytest

from saelab.config import Config, add_config_arguments, config_from_args
from saelab.errors import ConfigError


@dataclasses.dataclass
class Inner(Config):
    lr: float = 1e-3
    steps: int = 10


@dataclasses.dataclass
class Outer(Config):
    name: str = "x"
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    limit: int | None = None
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_unknown_field_names_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['nmae'\].*Valid fields"):
        Outer.from_dict({"nmae": "y"})


def test_roundtrip_json(tmp_path) -> None:
    cfg = Outer.from_dict({"name": "a", "layers": [3], "inner": {"lr": 0.5}})
    cfg.save(tmp_path / "c.json")
    assert Outer.load(tmp_path / "c.json") == cfg


def test_every_field_is_a_flag_and_flags_override_file(tmp_path) -> None:
    Outer(name="file", inner=Inner(steps=7)).save(tmp_path / "c.json")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Outer)
    args = parser.parse_args(
        ["--config", str(tmp_path / "c.json"), "--layers", "4,5", "--inner.lr", "2e-4", "--flag", "true",
         "--limit", "none"]
    )
    cfg = config_from_args(Outer, args)
    assert cfg == Outer(name="file", layers=[4, 5], limit=None, flag=True, inner=Inner(lr=2e-4, steps=7))


def test_bad_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"Outer.inner.steps: expected int"):
        Outer.from_dict({"inner": {"steps": "many"}})
