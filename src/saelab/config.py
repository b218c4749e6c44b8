"""Typed configs: dataclasses that load from JSON/YAML, become CLI flags, and are saved next to their outputs.

Every run folder carries the config that produced it, so a result can always be re-run from its folder.
Unknown fields are errors (a typo must never silently fall back to a default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from saelab.errors import ConfigError
from saelab.io import atomic_write_text

C = TypeVar("C", bound="Config")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` / `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a JSON/YAML/CLI value to the declared field type, or raise ConfigError naming the field."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where}: None is not allowed; give a value of type {inner}")
    if _is_config(inner):
        if isinstance(inner, type) and isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {inner.__name__}, got {value!r}")
        return inner.from_dict(value, where=where)
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        allowed = typing.get_args(inner)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if inner in (int, float):
        try:
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return inner(float(value)) if inner is int and isinstance(value, str) and "e" in value else inner(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {inner.__name__}, got {value!r}") from None
    if inner is str:
        return str(value)
    if inner is Any or inner is dict or typing.get_origin(inner) is dict:
        return value
    return value


@dataclasses.dataclass
class Config:
    """Base for every typed config in saelab."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], where: str | None = None) -> C:
        where = where or cls.__name__
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {unknown}. Valid fields: {sorted(names)}. "
                "Fix the spelling or remove the field."
            )
        hints = _field_types(cls)
        defaults = _nested_defaults(cls)
        data = {k: _merge(defaults[k], v) if k in defaults and isinstance(v, dict) else v for k, v in data.items()}
        kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        try:
            obj = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        obj.validate()
        return obj

    def validate(self) -> None:
        """Override to reject inconsistent settings with a ConfigError."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        obj = dataclasses.replace(self, **changes)
        obj.validate()
        return obj

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data, where=str(path))


@dataclasses.dataclass
class PresetConfig(Config):
    """A config with named presets: `preset` picks a set of field values (nested for nested configs) that applies
    under whatever else is given (file, flags, dict), so one switch sets a published recipe and any field can
    still be changed. Applied when the config is read (`from_dict`, `load`, the CLI), and recorded in what is
    saved, so a saved config reloads to the same values."""

    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    preset: str | None = dataclasses.field(default=None, metadata={"help": "named preset applied under the flags"})

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], where: str | None = None) -> C:
        name = data.get("preset")
        if name is not None:
            if name not in cls.PRESETS:
                raise ConfigError(
                    f"{where or cls.__name__}.preset: unknown preset {name!r}; choose one of {sorted(cls.PRESETS)}"
                )
            data = _under(cls.PRESETS[name], data)
        return super().from_dict(data, where)


@dataclasses.dataclass
class BudgetConfig(Config):
    """A config with compute budgets: `budget` picks "small" (the field defaults, sized so the run fits about
    half an hour on two CPU cores) or a larger named budget from `BUDGETS` (e.g. "full", the write-up's scale),
    applied under whatever else is given exactly as a preset is. A class can have both presets and budgets."""

    BUDGETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {"small": {}}

    budget: str = dataclasses.field(
        default="small", metadata={"help": "small (the defaults: ~30 min on 2 CPU cores) | full (the write-up's scale)"}
    )

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], where: str | None = None) -> C:
        name = data.get("budget", "small")
        budgets = cls.BUDGETS  # type: ignore[attr-defined]
        if name not in budgets:
            raise ConfigError(f"{where or cls.__name__}.budget: unknown budget {name!r}; choose one of "
                              f"{sorted(budgets)}")
        return super().from_dict(_under(budgets[name], data), where)  # type: ignore[misc]


def _under(base: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` on top of `base`, nested mappings merged key by key (a given value always wins)."""
    merged = dict(base)
    for key, value in given.items():
        inner = merged.get(key)
        merged[key] = _under(inner, value) if isinstance(inner, Mapping) and isinstance(value, Mapping) else value
    return merged


def _nested_defaults(cls: type[Config]) -> dict[str, dict[str, Any]]:
    """Default values (as dicts) of nested-config fields, so a partial override such as `--trainer.lr 1e-3` keeps
    the parent's own defaults for the other nested fields rather than the nested class's bare defaults."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            continue
        if isinstance(value, Config):
            defaults[f.name] = value.to_dict()
    return defaults


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


# ----------------------------------------------------------------------------------------------------------
# CLI: every field of a (possibly nested) config is a flag; nested fields are spelled --outer.inner
# ----------------------------------------------------------------------------------------------------------


def _flag_specs(cls: type[Config], prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted name, type, default, help) for every leaf field, nested configs flattened."""
    specs = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        name = f"{prefix}{f.name}"
        if _is_config(inner):
            specs.extend(_flag_specs(inner, prefix=f"{name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        specs.append((name, tp, default, f.metadata.get("help", "")))
    return specs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Config]) -> None:
    """Add one flag per config field (`--train.lr 1e-3`, `--hookpoints resid_post.3,resid_post.6`)."""
    parser.add_argument("--config", help="JSON or YAML file with any of the fields below; flags override it")
    for f in dataclasses.fields(cls):  # fields marked positional are arguments (`saelab convert SRC DST`)
        if f.metadata.get("positional"):
            parser.add_argument(f"cfg:{f.name}", metavar=f.name.upper(), help=f.metadata.get("help", ""))
    positional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")}
    for name, tp, default, help_text in _flag_specs(cls):
        if name in positional:
            continue
        shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        inner, _ = _unwrap_optional(tp)
        type_name = getattr(inner, "__name__", str(inner)).replace("typing.", "")
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"cfg:{name}",
            default=argparse.SUPPRESS,
            metavar=type_name.upper() if isinstance(type_name, str) else "VALUE",
            help=f"{help_text} ({shown})".strip(),
        )


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Build the config: file (if --config) first, then each given flag on top."""
    data: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        data = cls.load(config_path).to_dict()
    for key, value in vars(args).items():
        if not key.startswith("cfg:"):
            continue
        parts = key[4:].split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cls.from_dict(data)
