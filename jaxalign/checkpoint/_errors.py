"""What can go wrong with a checkpoint, said in one sentence each: a config or tree that does
not fit, a step that cannot be read back as it was written, a write that failed (a full disk).

Orbax reports a failed background write from inside TensorStore as ``ValueError:
RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']`` (and logs it, with a
traceback, from each of its writer threads); :func:`os_error_of` reads the errno back out of
such a message, so that callers get an :class:`OSError` naming the path and the cause.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

__all__ = ["CheckpointCorruptError", "CheckpointMismatchError", "CheckpointWriteError",
           "config_mismatches", "os_error_of", "short_cause"]

_MAX_LISTED = 8
# "... Failed to write 144137 bytes to file 12: No space left on device [os_error_code='28']"
# (TensorStore), "... (os error 28)" (Rust, e.g. tokenizers)
_ERRNO_PATTERNS = (re.compile(r"os_error_code='(\d+)'"), re.compile(r"\(os error (\d+)\)"))


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model or state it is restored into; names the fields."""


class CheckpointCorruptError(ValueError):
    """A checkpoint that cannot be read back as it was written (truncated, overwritten, half
    deleted); ``path`` is its step directory and the message names the cause."""

    def __init__(self, message: str, *, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = os.fspath(path)


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (e.g. a full disk). ``filename`` is the step
    directory, ``strerror`` says why and which earlier checkpoints are intact."""


def os_error_of(error: BaseException) -> tuple[int, str] | None:
    """``(errno, strerror)`` of an :class:`OSError`, or of an error whose message carries an
    errno (TensorStore's ``[os_error_code='28']``, Rust's ``(os error 28)``); None otherwise."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno, error.strerror or os.strerror(error.errno)
    for pattern in _ERRNO_PATTERNS:
        match = pattern.search(str(error))
        if match:
            code = int(match.group(1))
            return code, os.strerror(code)
    cause = error.__cause__ or error.__context__
    return None if cause is None or cause is error else os_error_of(cause)


def short_cause(error: BaseException, limit: int = 200) -> str:
    """``"ExceptionType: first line of the message"`` of the innermost cause (where TensorStore
    says what it found), without TensorStore's spec dump, cut to ``limit`` characters."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    for marker in (" [tensorstore_spec=", ". See full TensorStore details"):
        text = text.split(marker)[0]
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _DropReraisedOrbaxErrors(logging.Filter):
    """Orbax logs each failure of a background save (with a traceback, once per writer thread)
    and then raises it from the next ``save`` or ``wait_until_finished``, where
    :class:`~jaxalign.checkpoint.Checkpointer` turns it into one error naming the path. This
    drops those log records; everything else orbax logs passes."""

    _ORBAX = os.sep + "orbax" + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and self._ORBAX in record.pathname)


class _DropUnretrievedOrbaxWrites(logging.Filter):
    """When one write of a background save fails, asyncio may also log the gathering future of
    the failed writes as ``exception was never retrieved`` (timing-dependent). That failure is
    the one :class:`~jaxalign.checkpoint.Checkpointer` reports: drop the record when its
    exception came from orbax, or is a TensorStore error set on the future without ever being
    raised in Python (so no traceback names orbax; it is known by its ``tensorstore_spec``
    (array writes) or its ``os_error_code`` (OCDBT writes, which carry no spec)); everything
    else asyncio logs passes."""

    _ORBAX = os.sep + "orbax" + os.sep
    _TENSORSTORE = ("[tensorstore_spec=", "[os_error_code=")

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in record.getMessage():
            return True
        error = record.exc_info[1] if record.exc_info else None
        if any(marker in str(error) for marker in self._TENSORSTORE):
            return False
        tb = getattr(error, "__traceback__", None)
        while tb is not None:
            if self._ORBAX in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True


_FILTER = _DropReraisedOrbaxErrors()
_ASYNCIO_FILTER = _DropUnretrievedOrbaxWrites()
_previous_unraisable_hook = sys.unraisablehook


def _orbax_leftover(unraisable: Any) -> bool:
    """Whether ``unraisable`` is what a failed orbax save or restore leaves behind:

    * ``RuntimeError: Event loop is closed``: when one write of a save fails, orbax's event
      loop ends while TensorStore still holds the other writes, and each one's callback finds
      the loop closed;
    * ``Exception ignored in: <coroutine ...>`` of an orbax array read closed unfinished (the
      other reads of a failed restore): orbax wraps every exception of a read, its
      ``GeneratorExit`` included, in a new ``Exception``, so closing such a coroutine raises.

    They belong to the failed save or restore, which is reported once."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return (code is not None and os.sep + "orbax" + os.sep in code.co_filename
            and isinstance(value.__cause__ or value.__context__, GeneratorExit))


def _drop_orbax_leftovers(unraisable: Any) -> None:
    """The unraisable-error hook: drops :func:`_orbax_leftover` s, passes the rest on. (They
    are collected at any later time, so the hook stays installed.)"""
    if not _orbax_leftover(unraisable):
        _previous_unraisable_hook(unraisable)


def quiet_abandoned_writes() -> None:
    """After a failed write: orbax abandons that save's remaining TensorStore coroutines, and
    Python would print ``coroutine ... was never awaited`` for each at exit, after the one-line
    error. Installed only once a write has failed, so other code's warnings keep showing."""
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)


def quiet_orbax_save_errors() -> None:
    """Installs the filter on absl's logger (which orbax logs to) and the unraisable-error
    hook above; idempotent."""
    global _previous_unraisable_hook
    logger = logging.getLogger("absl")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    asyncio_logger = logging.getLogger("asyncio")
    if _ASYNCIO_FILTER not in asyncio_logger.filters:
        asyncio_logger.addFilter(_ASYNCIO_FILTER)
    if sys.unraisablehook is not _drop_orbax_leftovers:
        _previous_unraisable_hook = sys.unraisablehook
        sys.unraisablehook = _drop_orbax_leftovers


# ------------------------------------------------------------------------------ mismatches
def _flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _as_json(config: Any) -> Any:
    """A config (dict or dataclass) as it reads back from JSON (tuples become lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config))


def config_mismatches(stored: Mapping[str, Any], current: Mapping[str, Any] | Any) -> list[str]:
    """Sentences naming each field where two configs differ (nested keys dotted: `a.b`).

    Args:
        stored: the config saved with a checkpoint.
        current: the config of the model being restored into (a dict or a dataclass).

    Returns:
        e.g. `["checkpoint was written with d_model=256 but the model has d_model=128"]`; empty
        when they agree.
    """
    stored_flat = _flatten_config(_as_json(stored))
    current_flat = _flatten_config(_as_json(current))
    sentences = []
    for key in sorted(set(stored_flat) | set(current_flat)):
        if key not in current_flat:
            sentences.append(f"checkpoint was written with {key}={json.dumps(stored_flat[key])}"
                             f" but the model has no {key}")
        elif key not in stored_flat:
            sentences.append(f"checkpoint was written without {key}"
                             f" but the model has {key}={json.dumps(current_flat[key])}")
        elif stored_flat[key] != current_flat[key]:
            sentences.append(f"checkpoint was written with {key}={json.dumps(stored_flat[key])}"
                             f" but the model has {key}={json.dumps(current_flat[key])}")
    return sentences


def structure_mismatches(stored: Mapping[str, tuple[int, ...]],
                         target: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Sentences naming each array path that is missing on one side or has another shape."""
    problems = []
    for path in sorted(set(stored) | set(target)):
        if path not in stored:
            problems.append(f"'{path}' is in the restore target but not in the checkpoint")
        elif path not in target:
            problems.append(f"'{path}' is in the checkpoint but not in the restore target")
        elif stored[path] != target[path]:
            problems.append(f"'{path}' has shape {stored[path]} in the checkpoint"
                            f" but {target[path]} in the restore target")
    return problems


def join(problems: list[str]) -> str:
    listed = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return listed + (f"; ... and {more} more" if more > 0 else "")
