"""``--reward-fn`` for ``jaxalign ppo`` and ``jaxalign grpo``: Python reward functions by name,
and the prompts file's extra columns they read.

A spec is ``module:function`` (``jaxalign.rewards:math_answer``, ``my_rewards:brevity``) or
``module:factory(key=value, ...)`` with literal arguments (``jaxalign.rewards:overlong_penalty(
max_length=64, cache_length=16)``), read with :func:`ast.literal_eval` — no code is evaluated.
The module is imported from ``sys.path`` (the working directory included, as ``python -m``
does).

Every field of a prompts record other than ``prompt`` is a column, passed to the functions by
its name (``None`` where a record lacks it); ``--answer-column X`` also passes column ``X`` as
``answer`` (the argument :func:`jaxalign.rewards.math_answer` reads) and makes it required.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jaxalign.cli.loop import RunError
from jaxalign.cli.options import ConfigError
from jaxalign.data import BadRecord, read_records

__all__ = ["TextRewardSpec", "load_reward_fn", "load_reward_fns", "parse_weights",
           "read_columns", "text_reward_spec"]


def _factory_arguments(spec: str, text: str) -> dict[str, Any]:
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("only key=value arguments")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as error:
        raise ConfigError(f"--reward-fn {spec}: arguments must be key=literal pairs ({error})"
                          ) from None


def load_reward_fn(spec: str) -> Callable:
    """The reward function named by ``spec`` (see the module docstring)."""
    name, _, arguments = spec.strip().partition("(")
    module_name, _, attribute = name.strip().partition(":")
    if not module_name or not attribute.isidentifier():
        raise ConfigError(f"--reward-fn {spec!r} is not MODULE:FUNCTION (or"
                          " MODULE:FACTORY(key=value, ...))")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"--reward-fn {spec}: cannot import {module_name}: {error}") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ConfigError(f"--reward-fn {spec}: {module_name} has no function {attribute!r}")
    if arguments:
        if not arguments.rstrip().endswith(")"):
            raise ConfigError(f"--reward-fn {spec!r}: unbalanced parentheses")
        fn = fn(**_factory_arguments(spec, arguments.rstrip()[:-1]))
    return fn


def _required_columns(fn: Callable) -> set[str]:
    """Keyword arguments ``fn`` needs beyond ``prompts, completions`` (no default, no **)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return set()
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {p.name for p in named[2:] if p.default is p.empty} if len(named) >= 2 else set()


def load_reward_fns(specs: Sequence[str], columns: Sequence[str]) -> list[Callable]:
    """The functions of ``specs``, each checked to need no column the prompts lack."""
    fns = [load_reward_fn(spec) for spec in specs]
    available = set(columns) | {"completion_ids"}
    for spec, fn in zip(specs, fns):
        missing = _required_columns(fn) - available
        if missing:
            raise RunError(f"--reward-fn {spec} needs column(s) {', '.join(sorted(missing))},"
                           " which the prompts file lacks (an --answer-column names the"
                           " reference-answer field)")
    return fns


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """``"1,0.5"`` → ``[1.0, 0.5]`` (one per reward function), ``None`` → ``None``."""
    if text is None:
        return None
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--reward-weights {text!r} is not a comma-separated list of numbers"
                          ) from None
    if len(weights) != count:
        raise ConfigError(f"--reward-weights has {len(weights)} values for {count} --reward-fn")
    return weights


def read_columns(path: str, *, answer_column: str | None,
                 on_bad_record: str) -> dict[str, list[Any]]:
    """``{column: [value per record]}`` of the prompts file's extra fields, in record order
    (records the prompt loader skips are skipped here too; a missing ``answer_column`` is a
    bad record)."""

    def parse(record: Any) -> dict[str, Any]:
        if not isinstance(record, dict):
            raise BadRecord("record must be a JSON object")
        prompt = record.get("prompt")
        if not (isinstance(prompt, str) and prompt.strip()) and not (
                isinstance(prompt, list) and prompt):
            raise BadRecord("missing or empty field 'prompt'")
        if answer_column is not None and answer_column not in record:
            raise BadRecord(f"missing field '{answer_column}' (--answer-column)")
        return {key: value for key, value in record.items() if key != "prompt"}

    records, _ = read_records(path, parse, on_bad_record=on_bad_record)
    names = sorted({key for record in records for key in record})
    columns = {name: [record.get(name) for record in records] for name in names}
    if answer_column is not None:
        columns["answer"] = columns[answer_column]
    return columns


@dataclasses.dataclass(frozen=True)
class TextRewardSpec:
    """The Python rewards of a run, hashable by what defines them (the specs, weights, column
    values and vocabulary), so a process running the same job twice (a resume) reuses its
    compiled step."""

    specs: tuple[str, ...]
    weights: tuple[float, ...] | None
    key: str  # the columns and the tokenizer's vocabulary, as JSON
    fns: tuple[Callable, ...] = dataclasses.field(compare=False)
    tokenizer: Any = dataclasses.field(compare=False)
    columns: dict[str, list[Any]] = dataclasses.field(compare=False)

    def step_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`jaxalign.train.rlhf.make_rlhf_step`."""
        return {"reward_fns": list(self.fns), "reward_weights": self.weights,
                "tokenizer": self.tokenizer, "reward_columns": self.columns}


def text_reward_spec(config: Any, tokenizer: Any, num_prompts: int) -> TextRewardSpec | None:
    """The ``--reward-fn`` functions of a ``ppo``/``grpo`` config with the prompts file's
    columns (``None`` without ``--reward-fn``); raises ``ConfigError``/``RunError``."""
    if not config.reward_fn:
        return None
    columns = read_columns(config.prompts, answer_column=config.answer_column,
                           on_bad_record=config.on_bad_record)
    if columns and len(next(iter(columns.values()))) != num_prompts:
        raise RunError(f"--prompts {config.prompts}: {num_prompts} prompts were loaded but"
                       f" {len(next(iter(columns.values())))} records have columns; fix the"
                       " bad records (--on-bad-record error names them)")
    fns = load_reward_fns(config.reward_fn, list(columns))
    weights = parse_weights(config.reward_weights, len(fns))
    key = json.dumps({"columns": columns, "vocab": tokenizer.backend.get_vocab()},
                     sort_keys=True, default=str)
    return TextRewardSpec(tuple(config.reward_fn), None if weights is None else tuple(weights),
                          key, tuple(fns), tokenizer, columns)
