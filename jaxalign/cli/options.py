"""Command options as dataclass fields: one definition gives the flag, its help, the config-file
key and the value check (no Flax, Orbax or JAX import, so ``jaxalign --help`` stays light).

A config dataclass declares each option with :func:`option`; :func:`add_options` turns the
fields into argparse flags (``--max-new-tokens``; booleans get ``--x/--no-x``; ``nullable``
ones also accept ``none``), :func:`checked` checks a mapping read by :func:`load_config_file`
(YAML with ``yaml.safe_load``, or JSON; keys with ``-`` or ``_``) against the field types.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import yaml

__all__ = ["ConfigError", "OptimizerOptions", "add_options", "checked", "load_config_file",
           "option"]


class ConfigError(ValueError):
    """A bad option value, config file or config key (the message names it)."""


def option(default: Any, help: str, *, type: Any = str, commands: tuple[str, ...] | None = None,
           choices: tuple[str, ...] | None = None, metavar: str | None = None,
           nullable: bool = False) -> Any:
    """A dataclass field that is also a command-line option.

    ``commands``: the commands that take it (``None``: every command of the dataclass).
    ``nullable``: ``none`` (flag) or ``null`` (file) sets it to ``None``.
    """
    metadata = {"help": help, "type": type, "commands": commands, "choices": choices,
                "metavar": metavar, "nullable": nullable or default is None}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """The schedule and regularisation options every training command shares (the peak ``lr``
    is each command's own: its default differs between pretraining-style and RL runs)."""

    warmup_steps: int = option(0, "linear warmup updates before the cosine decay", type=int)
    end_lr_ratio: float = option(0.0, "final learning rate as a fraction of --lr", type=float)
    weight_decay: float = option(0.0, "decoupled weight decay", type=float)
    max_grad_norm: float = option(1.0, "global-norm gradient clip (<= 0: none)", type=float)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be non-negative, got {self.warmup_steps}")

    def schedule_options(self, learning_rate: float, total_steps: int) -> dict[str, Any]:
        """Keyword arguments of ``jaxalign.train.make_optimizer``."""
        return {"learning_rate": learning_rate, "total_steps": total_steps,
                "warmup_steps": self.warmup_steps, "end_lr_ratio": self.end_lr_ratio,
                "weight_decay": self.weight_decay,
                "max_grad_norm": self.max_grad_norm if self.max_grad_norm > 0 else None}


_OPTIMIZER_FIELDS = {f.name for f in dataclasses.fields(OptimizerOptions)}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a mapping (or a JSON object string)"}


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    """A config-file value checked (and converted, e.g. YAML's string '1e-3') to the field type."""
    name, kind = field.name, field.metadata["type"]
    if value is None and field.metadata["nullable"]:
        return None
    if kind is str and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kind is dict and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config key '{name}': invalid JSON ({error.msg})") from None
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }[kind]
    if not ok and kind is float and isinstance(value, str):
        try:
            value, ok = float(value), True
        except ValueError:
            pass
    if not ok:
        raise ConfigError(f"config key '{name}' must be {_TYPE_NAMES[kind]}, got {value!r}")
    if field.metadata["choices"] and value not in field.metadata["choices"]:
        raise ConfigError(f"config key '{name}' must be one of {field.metadata['choices']},"
                          f" got {value!r}")
    return float(value) if kind is float else value


def checked(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Keys normalised to field names of ``cls`` (``-`` -> ``_``) and values checked against
    the field types; an unknown key is a :class:`ConfigError` naming it."""
    fields = _fields(cls)
    result = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(fields))})")
        result[name] = _coerce(fields[name], value)
    return result


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML (``yaml.safe_load``) or JSON config file into a dict (keys not yet checked)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {path}: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"invalid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _or_none(parse: Any) -> Any:
    """An argparse type that also reads ``none``/``null`` as ``None``."""
    def parse_or_none(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)
    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse's error message
    return parse_or_none


def _add_option(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    meta = field.metadata
    flag = "--" + field.name.replace("_", "-")
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    shown = json.dumps(default) if isinstance(default, dict) else default
    help_text = meta["help"]
    if "default:" not in help_text and "(required)" not in help_text:
        help_text += f" (default: {shown})"
    # SUPPRESS: only flags actually given appear in the namespace, so they can win over the file.
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
    if meta["type"] is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        parse = _json_object if meta["type"] is dict else meta["type"]
        nullable = meta["nullable"] and meta["type"] in (int, float)
        kwargs["type"] = _or_none(parse) if nullable else parse
        kwargs["metavar"] = meta["metavar"] or {int: "N", float: "X"}.get(meta["type"], "VALUE")
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
            kwargs.pop("metavar")
    parser.add_argument(flag, **kwargs)


def add_options(parser: argparse.ArgumentParser, cls: type, command: str) -> None:
    """A flag on ``parser`` for every field of ``cls`` that ``command`` takes (the shared
    :class:`OptimizerOptions` listed right after ``--lr``, where a reader looks for them)."""
    shared = [f for f in dataclasses.fields(cls) if f.name in _OPTIMIZER_FIELDS]
    fields = []
    for field in dataclasses.fields(cls):
        if field.name not in _OPTIMIZER_FIELDS:
            fields += [field] + (shared if field.name == "lr" else [])
    fields += [] if "lr" in {f.name for f in fields} else shared
    for field in fields:
        if field.metadata["commands"] is None or command in field.metadata["commands"]:
            _add_option(parser, field)
