"""Documented settings: a dataclass field that carries its help text.

Library configs (:class:`jaxalign.train.OptimizerConfig`, :class:`jaxalign.train.RLHFConfig`)
declare each field with :func:`setting`, so the command line can turn the same fields into
flags and config-file keys (:mod:`jaxalign.cli.options`) instead of declaring them again. The
field's type is its annotation; ``choices`` lists the allowed strings. Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["setting"]


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with a default, a one-line ``help`` and optional string ``choices``."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})
