import argparse
import dataclasses

import pytest

from saelab.config import BudgetConfig, Config, PresetConfig, add_config_arguments, config_from_args
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


@dataclasses.dataclass
class TwoPaths(Config):
    src: str = dataclasses.field(metadata={"positional": True, "help": "read"})
    dst: str = dataclasses.field(metadata={"positional": True, "help": "write"})
    steps: int = 3


def test_positional_fields_are_arguments_in_order_not_flags() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TwoPaths)
    cfg = config_from_args(TwoPaths, parser.parse_args(["a", "b", "--steps", "5"]))
    assert cfg == TwoPaths(src="a", dst="b", steps=5)
    assert "--src" not in parser.format_help() and "SRC" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["a"])


def test_bad_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"Outer.inner.steps: expected int"):
        Outer.from_dict({"inner": {"steps": "many"}})


@dataclasses.dataclass
class WithPresets(PresetConfig):
    PRESETS = {"fast": {"name": "quick", "inner": {"lr": 0.1}}}

    name: str = "x"
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_preset_applies_under_given_fields_and_survives_a_round_trip(tmp_path) -> None:
    cfg = WithPresets.from_dict({"preset": "fast", "inner": {"steps": 3}})
    assert (cfg.name, cfg.inner.lr, cfg.inner.steps) == ("quick", 0.1, 3)  # nested preset merged key by key
    assert WithPresets.from_dict({"preset": "fast", "inner": {"lr": 2.0}}).inner.lr == 2.0  # given value wins
    assert WithPresets.from_dict({}).name == "x"  # no preset, plain defaults
    cfg.save(tmp_path / "c.json")
    assert WithPresets.load(tmp_path / "c.json") == cfg
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, WithPresets)
    from_flags = config_from_args(WithPresets, parser.parse_args(["--preset", "fast", "--inner.lr", "0.5"]))
    assert (from_flags.name, from_flags.inner.lr) == ("quick", 0.5)


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'slow'; choose one of \['fast'\]"):
        WithPresets.from_dict({"preset": "slow"})


@dataclasses.dataclass
class WithBudgets(BudgetConfig, PresetConfig):
    BUDGETS = {"small": {}, "full": {"inner": {"steps": 1000}, "name": "big"}}
    PRESETS = {"fast": {"inner": {"lr": 0.1}}}

    name: str = "x"
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_budget_applies_under_given_fields_beside_a_preset(tmp_path) -> None:
    assert WithBudgets.from_dict({}).inner == Inner() and WithBudgets.from_dict({}).budget == "small"
    cfg = WithBudgets.from_dict({"budget": "full", "preset": "fast", "name": "mine"})
    assert (cfg.name, cfg.inner.steps, cfg.inner.lr) == ("mine", 1000, 0.1)
    cfg.save(tmp_path / "c.json")
    assert WithBudgets.load(tmp_path / "c.json") == cfg
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, WithBudgets)
    from_flags = config_from_args(WithBudgets, parser.parse_args(["--budget", "full", "--inner.steps", "7"]))
    assert (from_flags.name, from_flags.inner.steps) == ("big", 7)
    with pytest.raises(ConfigError, match=r"unknown budget 'huge'; choose one of \['full', 'small'\]"):
        WithBudgets.from_dict({"budget": "huge"})


@dataclasses.dataclass
class WithPreset(Config):
    inner: Inner = dataclasses.field(default_factory=lambda: Inner(lr=0.5, steps=99))


def test_partial_nested_override_keeps_the_parents_defaults() -> None:
    assert WithPreset.from_dict({"inner": {"steps": 3}}).inner == Inner(lr=0.5, steps=3)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, WithPreset)
    assert config_from_args(WithPreset, parser.parse_args(["--inner.lr", "0.1"])).inner == Inner(lr=0.1, steps=99)
