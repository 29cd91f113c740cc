"""Command options as dataclass fields: one definition gives the flag, its help, the config-file
key and the value check.

A command's config dataclass declares its own options with :func:`option`, and holds the
library's configs (:class:`jaxalign.train.OptimizerConfig`, :class:`jaxalign.train.RLHFConfig`)
with :func:`embed`: their fields become the command's flags and keys under the library's names,
with the help text of their :func:`jaxalign.settings.setting` and the type of their annotation,
so a setting is declared once. :func:`add_options` turns the fields into argparse flags
(``--max-new-tokens``; booleans get ``--x/--no-x``; optional numbers also accept ``none``),
:func:`checked` checks a mapping read by :func:`load_config_file` (YAML with
``yaml.safe_load``, or JSON; keys with ``-`` or ``_``) against the field types, :func:`build`
makes the config from such a flat mapping and :func:`flat_values` is its inverse.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple

import yaml

__all__ = ["ConfigError", "add_options", "build", "checked", "embed", "flat_values",
           "load_config_file", "option"]


class ConfigError(ValueError):
    """A bad option value, config file or config key (the message names it)."""


def option(default: Any, help: str, *, type: Any = str, commands: tuple[str, ...] | None = None,
           choices: tuple[str, ...] | None = None, metavar: str | None = None,
           nullable: bool = False, positional: bool = False) -> Any:
    """A dataclass field that is also a command-line option.

    ``commands``: the commands that take it (``None``: every command of the dataclass).
    ``nullable``: ``none`` (flag) or ``null`` (file) sets it to ``None``.
    ``positional``: an optional positional argument (``jaxalign plan dpo``) instead of a flag.
    """
    metadata = {"help": help, "type": type, "commands": commands, "choices": choices,
                "metavar": metavar, "nullable": nullable or default is None,
                "positional": positional}
    if isinstance(default, list):  # type=list: a repeatable flag, each use adds one string
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def embed(cls: type, *, after: str | None = None, exclude: tuple[str, ...] = (),
          commands: tuple[str, ...] | None = None) -> Any:
    """A field holding a library config ``cls`` whose fields (less ``exclude``) are options of
    the command, under their own names; their flags are listed after the option ``after``.
    ``commands``: the commands that take them (``None``: every command of the dataclass)."""
    return dataclasses.field(default_factory=cls, metadata={
        "embed": cls, "after": after, "exclude": exclude, "commands": commands})


class _Option(NamedTuple):
    """One flag / config key: the field, the embedding field holding it (or None), its spec."""

    field: dataclasses.Field
    parent: str | None
    type: Any
    nullable: bool
    choices: tuple | None
    help: str
    commands: tuple[str, ...] | None
    metavar: str | None
    item: Any = None  # the element type of a tuple option (comma-separated on the command line)
    positional: bool = False


def _resolve(hint: Any) -> tuple[Any, bool, tuple | None]:
    """``(type, nullable, choices)`` of an annotation: ``X | None``, ``Literal[...]``,
    ``tuple[X, ...]`` (type ``(tuple, X)``), plain."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return (tuple, args[0]), False, None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [a for a in args if a is not type(None)]
        kind, _, choices = _resolve(kinds[0]) if len(kinds) == 1 else (None, False, None)
        return kind, type(None) in args, choices
    if typing.get_origin(hint) is typing.Literal:
        return str, False, args
    return (dict if typing.get_origin(hint) is dict else hint), False, None


def _spec(field: dataclasses.Field, hint: Any, parent: str | None,
          commands: tuple[str, ...] | None = None) -> _Option:
    meta = field.metadata
    if "type" in meta:  # an option() field: everything is declared
        return _Option(field, parent, meta["type"], meta["nullable"], meta["choices"],
                       meta["help"], meta["commands"], meta["metavar"],
                       positional=meta.get("positional", False))
    kind, nullable, choices = _resolve(hint)  # a setting() of a library config
    item = None
    if isinstance(kind, tuple):
        kind, item = kind
    if kind not in _TYPE_NAMES or (item is not None and item not in (int, float, str)):
        raise TypeError(f"setting {field.name!r}: cannot make an option of type {hint!r}")
    metavar = None if item is None else {int: "N,N", float: "X,X"}.get(item, "A,B")
    return _Option(field, parent, kind, nullable, meta.get("choices") or choices, meta["help"],
                   commands, metavar, item)


@functools.cache
def _options(cls: type) -> dict[str, _Option]:
    """Every option of config class ``cls`` by name, embedded configs' fields included."""
    hints = typing.get_type_hints(cls)
    result: dict[str, _Option] = {}
    for field in dataclasses.fields(cls):
        inner = field.metadata.get("embed")
        if inner is None:
            result[field.name] = _spec(field, hints[field.name], None)
            continue
        inner_hints = typing.get_type_hints(inner)
        for sub in dataclasses.fields(inner):
            if sub.name not in field.metadata["exclude"]:
                if sub.name in result or sub.name in {f.name for f in dataclasses.fields(cls)}:
                    raise TypeError(f"{cls.__name__}: option {sub.name!r} is declared twice")
                result[sub.name] = _spec(sub, inner_hints[sub.name], field.name,
                                         field.metadata["commands"])
    return result


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               tuple: "a list (or a comma-separated string)",
               list: "a list of strings (or one string)",
               dict: "a mapping (or a JSON object string)"}


def _coerce(spec: _Option, value: Any) -> Any:
    """A config-file value checked (and converted, e.g. YAML's string '1e-3') to the field type."""
    name, kind = spec.field.name, spec.type
    if value is None and spec.nullable:
        return None
    if kind is tuple:  # each element checked as an option of the element type
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(f"config key '{name}' must be {_TYPE_NAMES[tuple]}, got {value!r}")
        element = spec._replace(type=spec.item, item=None, nullable=False)
        return tuple(_coerce(element, v.strip() if isinstance(v, str) else v) for v in items)
    if kind is list:  # a repeatable string option
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"config key '{name}' must be {_TYPE_NAMES[list]}, got {value!r}")
        return list(items)
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
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"config key '{name}' must be one of {spec.choices}, got {value!r}")
    return float(value) if kind is float else value


def checked(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Keys normalised to field names of ``cls`` (``-`` -> ``_``) and values checked against
    the field types (embedded configs' fields included, by their own names); an unknown key is
    a :class:`ConfigError` naming it."""
    options = _options(cls)
    result = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in options:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(options))})")
        result[name] = _coerce(options[name], value)
    return result


def _construct(cls: type, values: dict[str, Any]) -> Any:
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as error:  # a library config's own check
        raise ConfigError(str(error)) from None


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """The config ``cls`` from a flat mapping of checked option values (:func:`checked`):
    the fields of an embedded config go into that config, the rest are ``cls``'s own."""
    options, own, nested = _options(cls), {}, {}
    for name, value in values.items():
        parent = options[name].parent
        (own if parent is None else nested.setdefault(parent, {}))[name] = value
    for field in dataclasses.fields(cls):
        if "embed" in field.metadata:
            own[field.name] = _construct(field.metadata["embed"], nested.get(field.name, {}))
    return _construct(cls, own)


def flat_values(config: Any) -> dict[str, Any]:
    """Every option of ``config`` by name, embedded configs flattened (the inverse of
    :func:`build`; what run metadata and summaries record)."""
    return {name: getattr(config if spec.parent is None else getattr(config, spec.parent), name)
            for name, spec in _options(type(config)).items()}


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


def _comma_list(spec: _Option) -> Any:
    """An argparse type for a tuple option: ``a,b`` (or ``none`` where it is optional)."""
    def parse(text: str) -> Any:
        if spec.nullable and text.lower() in ("none", "null"):
            return None
        try:
            return _coerce(spec, text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error).replace("config key", "option")) from None
    parse.__name__ = "list"
    return parse


def _positional_choice(spec: _Option) -> Any:
    """An argparse type checking a positional's choices (argparse's own ``choices`` would
    also reject the SUPPRESS default of an omitted ``nargs="?"`` positional)."""
    def parse(text: str) -> Any:
        if text != argparse.SUPPRESS and spec.choices and text not in spec.choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from"
                                             f" {', '.join(spec.choices)})")
        return text
    parse.__name__ = spec.field.name
    return parse


def _add_option(parser: argparse.ArgumentParser, spec: _Option) -> None:
    field = spec.field
    flag = "--" + field.name.replace("_", "-")
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    shown = json.dumps(default) if isinstance(default, dict) else default
    if isinstance(default, tuple):
        shown = ",".join(map(str, default))
    help_text = spec.help
    if spec.type is tuple and spec.choices:
        help_text += f"; one or more of {', '.join(spec.choices)}"
    if "default:" not in help_text and "(required)" not in help_text:
        help_text += f" (default: {shown})"
    # SUPPRESS: only flags actually given appear in the namespace, so they can win over the file.
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
    if spec.positional:
        parser.add_argument(field.name, nargs="?", type=_positional_choice(spec), **kwargs,
                            metavar="{" + ",".join(spec.choices) + "}" if spec.choices else None)
        return
    if spec.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif spec.type is tuple:
        kwargs["type"] = _comma_list(spec)
        kwargs["metavar"] = spec.metavar
    elif spec.type is list:  # repeat the flag for several values
        kwargs["action"] = "append"
        kwargs["metavar"] = spec.metavar or "VALUE"
    else:
        parse = _json_object if spec.type is dict else spec.type
        nullable = spec.nullable and spec.type in (int, float)
        kwargs["type"] = _or_none(parse) if nullable else parse
        kwargs["metavar"] = spec.metavar or {int: "N", float: "X"}.get(spec.type, "VALUE")
        if spec.choices:
            kwargs["choices"] = spec.choices
            kwargs.pop("metavar")
    parser.add_argument(flag, **kwargs)


def add_options(parser: argparse.ArgumentParser, cls: type, command: str) -> None:
    """A flag on ``parser`` for every option of ``cls`` that ``command`` takes, in field order;
    an embedded config's flags follow its ``after`` option (or come last)."""
    own, groups = [], {}
    for spec in _options(cls).values():
        if spec.parent is None:
            own.append(spec)
        else:
            groups.setdefault(spec.parent, []).append(spec)
    placed = {f.name: f.metadata.get("after") for f in dataclasses.fields(cls)}
    ordered = []
    for spec in own:
        ordered.append(spec)
        ordered += [s for parent, specs in groups.items() if placed[parent] == spec.field.name
                    for s in specs]
    ordered += [s for parent, specs in groups.items() if placed[parent] not in
                {spec.field.name for spec in own} for s in specs]
    for spec in ordered:
        if spec.commands is None or command in spec.commands:
            _add_option(parser, spec)
