"""Tokenised examples padded into batches, and the one JSONL reader."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxalign.tokenizer import Tokenizer, pad_rows
from jaxalign.data._records import _Encoder, _json_type, _parse
from jaxalign.data._types import (
    RECORD_KINDS, BadRecord, DataConfig, DataError, DataReport, Example, RecordKind, T,
    bucket_length, detect_kind,
)

@dataclasses.dataclass


class Dataset:
    """Tokenised examples of one kind, and how to pad them into batches."""

    kind: RecordKind
    examples: list[Example]
    config: DataConfig
    pad_id: int
    report: DataReport

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The batch of the examples at `indices` (keys and shapes in the module docstring)."""
        examples = [self.examples[int(i)] for i in indices]
        config = self.config
        if self.kind == "prompt":
            cap = config.max_prompt_length or config.max_length
            length = bucket_length(max(len(e.prompt_ids) for e in examples), pad_multiple=config.pad_multiple,
                                   max_length=cap, pad_to_max=config.pad_to_max)
            rows = [e.prompt_ids for e in examples]
            prompt_ids, prompt_mask = pad_rows(rows, length, pad_id=self.pad_id, side="left")
            return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}
        if self.kind == "unpaired":
            return self._unpaired_batch(examples)
        num_completions = len(examples[0].completion_ids)
        longest = max(len(e.prompt_ids) + len(c) for e in examples for c in e.completion_ids)
        length = bucket_length(longest, pad_multiple=config.pad_multiple, max_length=config.max_length,
                               pad_to_max=config.pad_to_max)
        shape = (len(examples), num_completions, length)
        ids = np.full(shape, self.pad_id, dtype=np.int32)
        attention_mask = np.zeros(shape, dtype=np.int32)
        completion_mask = np.zeros(shape, dtype=np.int32)
        for b, example in enumerate(examples):
            start = len(example.prompt_ids)
            for k, completion in enumerate(example.completion_ids):
                end = start + len(completion)
                ids[b, k, :start], ids[b, k, start:end] = example.prompt_ids, completion
                attention_mask[b, k, :end] = 1
                completion_mask[b, k, start:end] = (example.completion_masks[k]
                                                    if example.completion_masks else 1)
        if self.kind == "sft":
            return {"input_ids": ids[:, 0], "attention_mask": attention_mask[:, 0],
                    "completion_mask": completion_mask[:, 0]}
        if self.kind == "ranking":
            ranks = np.asarray([e.ranks for e in examples], dtype=np.int32)
            return {"ids": ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
                    "ranks": ranks}
        batch = {}
        for k, side in enumerate(("chosen", "rejected")):
            batch[f"{side}_ids"] = ids[:, k]
            batch[f"{side}_attention_mask"] = attention_mask[:, k]
            batch[f"{side}_completion_mask"] = completion_mask[:, k]
        batch["margin"] = np.asarray([e.margin for e in examples], dtype=np.float32)
        batch["p_chosen"] = np.asarray([e.p_chosen for e in examples], dtype=np.float32)
        return batch

    def _unpaired_batch(self, examples: list[Example]) -> dict[str, np.ndarray]:
        """Each example's own sequence and its KL sequence: its prompt with the next example's
        completion (cut to ``max_length``), both right-padded to one length bucket."""
        config = self.config
        own = [(e.prompt_ids, e.completion_ids[0]) for e in examples]
        mismatched = [(e.prompt_ids, examples[(b + 1) % len(examples)].completion_ids[0]
                       [:max(config.max_length - len(e.prompt_ids), 0)])
                      for b, e in enumerate(examples)]
        longest = max(len(p) + len(c) for p, c in own + mismatched)
        length = bucket_length(longest, pad_multiple=config.pad_multiple,
                               max_length=config.max_length, pad_to_max=config.pad_to_max)
        batch = {"desirable": np.asarray([e.desirable for e in examples], dtype=np.float32)}
        for prefix, pairs in (("", own), ("kl_", mismatched)):
            ids = np.full((len(pairs), length), self.pad_id, dtype=np.int32)
            attention_mask = np.zeros_like(ids)
            completion_mask = np.zeros_like(ids)
            for b, (prompt, completion) in enumerate(pairs):
                start, end = len(prompt), len(prompt) + len(completion)
                ids[b, :start], ids[b, start:end] = prompt, completion
                attention_mask[b, :end] = 1
                completion_mask[b, start:end] = 1
            batch.update({f"{prefix}input_ids": ids, f"{prefix}attention_mask": attention_mask,
                          f"{prefix}completion_mask": completion_mask})
        return batch


_BLANK = object()


def _read_json(raw_line: bytes) -> Any:
    """The JSON value on one line, or `_BLANK` for a blank line; raises `BadRecord`."""
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord("line is not valid UTF-8") from None
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        raise BadRecord(f"invalid JSON ({error.msg} at column {error.colno})") from None


def _detect(record: Any) -> RecordKind:
    if not isinstance(record, dict):
        raise BadRecord(f"record must be a JSON object, got {_json_type(record)}")
    try:
        return detect_kind(record)
    except ValueError as error:
        raise BadRecord(str(error)) from None


def read_records(path: str | os.PathLike, parse: Callable[[Any], T], *,
                 on_bad_record: str = "error",
                 lines: Callable[[int], bool] | None = None) -> tuple[list[T], list[str]]:
    """``(values, skipped)``: ``parse(record)`` of every JSON line of ``path`` (blank lines
    ignored) and the ``"path:line: reason"`` of every line that is not UTF-8, not JSON, or that
    ``parse`` rejects by raising :class:`BadRecord`. With ``on_bad_record="error"`` the first
    such line raises :class:`DataError` instead. ``lines(line_no)`` (1-based) picks the lines
    to read (a data shard); the others are not decoded. The one JSONL reader of jaxalign."""
    path = os.fspath(path)
    values, skipped = [], []
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            if lines is not None and not lines(line_no):
                continue
            try:
                record = _read_json(raw_line)
                if record is not _BLANK:
                    values.append(parse(record))
                continue
            except BadRecord as bad:
                message = f"{path}:{line_no}: {bad}"
            if on_bad_record == "error":
                raise DataError(message) from None
            skipped.append(message)
    return values, skipped


def load_jsonl(
    path: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    kind: RecordKind | None = None,
    config: DataConfig = DataConfig(),
    lines: Callable[[int], bool] | None = None,
) -> Dataset:
    """Reads, validates and tokenises a JSONL file (all of it, before any training starts).

    Args:
        path: the JSONL file.
        tokenizer: a `jaxalign.tokenizer.Tokenizer`.
        kind: "preference", "ranking", "sft", "unpaired" or "prompt"; None = detected from the
            first record.
            Fields a kind does not use are ignored (a preference file can serve as prompts).
        config: truncation, padding and bad-record policy.
        lines: ``lines(line_no) -> bool`` keeps a subset of the lines (1-based), e.g. one data
            shard of a multi-process run; the others are never read.

    Raises:
        DataError: `"{path}:{line}: {reason}"` for the first bad record (`on_bad_record="error"`),
            or `"{path}: no usable records"` when nothing is left.
    """
    path = os.fspath(path)
    if kind is not None and kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    report = DataReport(path=path, kind=kind or "unknown")
    encoder: _Encoder | None = None
    num_responses: int | None = None

    def parse(record: Any) -> Example:
        nonlocal kind, encoder, num_responses
        if kind is None:
            kind = report.kind = _detect(record)
        if encoder is None:
            encoder = _Encoder(tokenizer, config, kind)
        encoder.truncated = False
        example = _parse(record, kind, encoder, num_responses)
        if kind == "ranking":
            num_responses = len(example.completion_ids)
        report.num_truncated += int(encoder.truncated)
        return example

    examples, skipped = read_records(path, parse, on_bad_record=config.on_bad_record,
                                     lines=lines)
    report.num_skipped = len(skipped)
    report.skip_reasons = skipped[:DataReport.MAX_REASONS]
    report.num_records = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable records ({report.num_skipped} skipped)")
    return Dataset(kind=kind, examples=examples, config=config, pad_id=tokenizer.padding_id, report=report)
