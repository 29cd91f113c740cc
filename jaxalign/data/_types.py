"""The record model: kinds, errors, settings, the load report and one tokenised example."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import numpy as np


T = TypeVar("T")

RecordKind = Literal["preference", "ranking", "sft", "unpaired", "prompt"]
RECORD_KINDS = ("preference", "ranking", "sft", "unpaired", "prompt")
_COMPLETION_FIELDS = {"preference": ("chosen", "rejected"), "sft": ("completion",),
                      "unpaired": ("completion",), "prompt": ()}


class DataError(ValueError):
    """A bad record; the message is `"{path}:{line_no}: {reason}"` (1-based line numbers)."""


class BadRecord(Exception):
    """Why one record is bad, raised by a parser before :func:`read_records` attaches the
    ``path:line`` (a :class:`DataError`, or a skip)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How records become token sequences.

    Attributes:
        max_length: longest sequence, prompt + completion (prompt-only: longest prompt).
        max_prompt_length: the prompt is cut from the left to this many tokens (None: no limit
            beyond `max_length`).
        pad_multiple: batches are padded to the smallest multiple of this that fits, capped at
            `max_length`, so only a few shapes (compilations) ever occur.
        pad_to_max: pad every batch to `max_length` (one shape).
        add_bos, add_eos: prepend BOS to prompts / append EOS to completions, if the tokenizer
            has them.
        on_bad_record: "error" raises `DataError` on the first bad record; "skip" counts it.
    """

    max_length: int = 512
    max_prompt_length: int | None = None
    pad_multiple: int = 64
    pad_to_max: bool = False
    add_bos: bool = True
    add_eos: bool = True
    on_bad_record: Literal["error", "skip"] = "error"

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length <= self.max_length:
            raise ValueError(f"max_prompt_length must be in [1, max_length], got {self.max_prompt_length}")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be positive, got {self.pad_multiple}")
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}")


@dataclasses.dataclass
class DataReport:
    """What loading did: kept, truncated and skipped records, with the first skip reasons."""

    path: str
    kind: str = "unknown"
    num_records: int = 0
    num_truncated: int = 0
    num_skipped: int = 0
    skip_reasons: list[str] = dataclasses.field(default_factory=list)  # first few, "path:line: reason"

    MAX_REASONS = 5

    def summary(self) -> str:
        """One human-readable paragraph for a CLI."""
        text = (f"{self.path}: {self.num_records} {self.kind} records, "
                f"{self.num_truncated} truncated, {self.num_skipped} skipped")
        if self.skip_reasons:
            more = self.num_skipped - len(self.skip_reasons)
            text += "".join(f"\n  skipped {reason}" for reason in self.skip_reasons)
            text += f"\n  ... and {more} more" if more else ""
        return text


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised record: prompt ids `[P]` and K completion ids (2 for preference)."""

    prompt_ids: np.ndarray
    completion_ids: tuple[np.ndarray, ...]
    margin: float = 0.0
    p_chosen: float = 1.0
    ranks: tuple[int, ...] = ()
    desirable: bool = True  # unpaired records' label
    completion_masks: tuple[np.ndarray, ...] = ()  # per completion token: 1 = trained (assistant)


def detect_kind(record: Mapping[str, Any]) -> RecordKind:
    """The kind of a record from its fields (see the module docstring)."""
    if "responses" in record or "ranking" in record:
        return "ranking"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "completion" in record and "label" in record:
        return "unpaired"
    if "completion" in record or "messages" in record:
        return "sft"
    if "prompt" in record:
        return "prompt"
    raise ValueError("cannot tell the record kind: expected 'prompt' with 'chosen' and 'rejected',"
                     " 'responses' and 'ranking', 'completion' (and 'label'), or alone")


def detect_file_kind(path: str | os.PathLike) -> RecordKind:
    """The kind of the first non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    return detect_kind(json.loads(line))
                except (ValueError, TypeError, AttributeError) as error:
                    raise DataError(f"{os.fspath(path)}:{line_no}: {error}") from None
    raise DataError(f"{os.fspath(path)}: no records")


def bucket_length(longest: int, *, pad_multiple: int, max_length: int, pad_to_max: bool = False) -> int:
    """Padded length for a batch whose longest sequence has `longest` tokens."""
    if pad_to_max:
        return max_length
    return min(max_length, max(1, math.ceil(longest / pad_multiple)) * pad_multiple)
