"""JSONL data in the formats TRL users already have, tokenised into fixed-shape numpy batches.

Record kinds (one JSON object per line; blank lines are ignored; extra fields are ignored):

    preference  {"prompt", "chosen", "rejected"}  + optional "margin" (number, default 0)
                                                  + optional "p_chosen" (soft label in [0, 1], default 1)
    ranking     {"prompt", "responses": [K], "ranking": [K ints]}   ranking[i] = rank of
                responses[i], 0 best, equal ranks = ties; K must be the same in the whole file
    sft         {"prompt", "completion"}
    unpaired    {"prompt", "completion", "label": true | false}     KTO/BCO: a desirable (true) or
                                                                    undesirable (false) completion
    prompt      {"prompt"}                                          prompts for RLHF generation

Each text field is a string, or (conversational records) a list of `{"role", "content"}`
messages: the prompt is the conversation so far, rendered with the tokenizer's chat template
(`Tokenizer.apply_chat_template(..., add_generation_prompt=True)`; the plain `<|role|>` format
without one); a completion is the turn(s) that follow. An sft record may instead be TRL's
`{"messages": [...]}`: the prompt is everything before the first assistant message.
Conversational completions train on their **assistant turns only** (multi-turn included): the
mask comes from rendering prefixes (`jaxalign.conversation`), and a conversation whose
rendering is not prefix-stable is a bad record. With a chat template the ids are the
template's own (`transformers`' `apply_chat_template`), so `add_bos`/`add_eos` do not apply.
A record may not mix the two styles.

A sequence is `[BOS] prompt completion [EOS]` (BOS/EOS only where the tokenizer has them and
`DataConfig.add_bos` / `add_eos` ask for them). Truncation: the prompt keeps its *end*
(`max_prompt_length`, BOS kept), then the completion keeps its *start* so that the sequence
fits `max_length` (a cut completion loses its EOS, as it did not finish).

Batches (numpy; ids and masks int32, `L` = the batch's length bucket, see `bucket_length`):

    preference  chosen_ids, chosen_attention_mask, chosen_completion_mask          [B, L]
                rejected_ids, rejected_attention_mask, rejected_completion_mask    [B, L]
                margin [B] float32, p_chosen [B] float32
    ranking     ids, attention_mask, completion_mask [B, K, L]; ranks [B, K] int32
    sft         input_ids, attention_mask, completion_mask [B, L]
    unpaired    input_ids, attention_mask, completion_mask [B, L]; desirable [B] float32 (1/0);
                kl_input_ids, kl_attention_mask, kl_completion_mask [B, L]: row i's prompt with
                row (i + 1) mod B's completion (the mismatched pairs KTO estimates its KL
                baseline from, as TRL builds them; the completion cut to fit max_length)
    prompt      prompt_ids, prompt_mask [B, P]   (LEFT-padded, ready for generation)

Sequences are right-padded; `attention_mask` is 1 on real tokens, `completion_mask` 1 on
completion tokens (EOS included) and 0 on prompt and padding.

Bad records raise `DataError("{path}:{line}: {reason}")` while loading (`on_bad_record="error"`)
or are skipped and counted in the `DataReport` (`"skip"`). `DataLoader` gives batch `step` as a
pure function of `(seed, step)`, so resuming from `state()` replays exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import numpy as np

from jaxalign.conversation import ConversationError, encode_conversation, encode_prompt
from jaxalign.tokenizer import Tokenizer, apply_chat_template, pad_rows, render_completion

__all__ = [
    "RECORD_KINDS", "BadRecord", "DataConfig", "DataError", "DataLoader", "DataReport",
    "Dataset", "Example",
    "ShardedLoader", "bucket_length", "detect_file_kind", "detect_kind", "load_jsonl",
    "read_records", "shard_lines",
]

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


_JSON_TYPES = {bool: "boolean", int: "number", float: "number", dict: "object", list: "array", str: "string"}


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _text_field(value: Any, name: str) -> str | list:
    """Checks a text field (string or message list); returns it unchanged."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"field '{name}' is empty")
    elif isinstance(value, list):
        if not value:
            raise BadRecord(f"field '{name}' is empty")
        try:
            apply_chat_template(value)
        except ValueError as error:
            raise BadRecord(f"field '{name}': {error}") from None
    else:
        raise BadRecord(f"field '{name}' must be a string or a list of messages, got {_json_type(value)}")
    return value


def _get(record: Mapping[str, Any], name: str) -> Any:
    if name not in record:
        raise BadRecord(f"missing field '{name}'")
    return record[name]


def _number(record: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = record.get(name, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if not ok:
        bounds = "a finite number" if math.isinf(high) else f"a number in [{low:g}, {high:g}]"
        raise BadRecord(f"field '{name}' must be {bounds}, got {json.dumps(value)}")
    return float(value)


class _Encoder:
    """Renders, tokenises and truncates prompts and completions; counts truncations."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig, kind: RecordKind) -> None:
        self.tokenizer, self.config = tokenizer, config
        self.bos = [tokenizer.bos_id] if config.add_bos and tokenizer.bos_id is not None else []
        self.eos = [tokenizer.eos_id] if config.add_eos and tokenizer.eos_id is not None else []
        self.prompt_limit = config.max_prompt_length
        if kind == "prompt" and self.prompt_limit is None:
            self.prompt_limit = config.max_length
        self.truncated = False

    def prompt(self, value: str | list) -> np.ndarray:
        if isinstance(value, list):
            ids = encode_prompt(self.tokenizer, value, add_bos=self.config.add_bos)
            return self._cut_prompt(ids)
        ids = self.tokenizer.encode(value)
        if self.prompt_limit is not None and len(self.bos) + len(ids) > self.prompt_limit:
            ids = ids[len(ids) - max(self.prompt_limit - len(self.bos), 0):]
            self.truncated = True
        return np.asarray(self.bos + ids, dtype=np.int32)

    def _cut_prompt(self, ids: list[int]) -> np.ndarray:
        """An encoded prompt keeping its end within the prompt limit (a leading BOS kept)."""
        keep = ids[:1] if ids and ids[0] == self.tokenizer.bos_id else []
        if self.prompt_limit is not None and len(ids) > self.prompt_limit:
            ids = keep + ids[len(ids) - max(self.prompt_limit - len(keep), 0):]
            self.truncated = True
        return np.asarray(ids, dtype=np.int32)

    def conversation(self, prompt: list | None, completions: list[list], names: list[str]
                     ) -> tuple[np.ndarray, tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
        """Conversational prompt (``None``: a ``messages`` record's) and completions:
        ``(prompt_ids, completion_ids, completion_masks)``, each completion cut to fit."""
        encoded = []
        for value, name in zip(completions, names):
            try:
                encoded.append(encode_conversation(self.tokenizer, prompt, value,
                                                   add_bos=self.config.add_bos,
                                                   add_eos=self.config.add_eos))
            except ConversationError as error:
                raise BadRecord(f"field '{name}': {error}") from None
        prompt_ids = self._cut_prompt(encoded[0].prompt_ids)
        ids, masks = [], []
        for tokens, name in zip(encoded, names):
            completion = self._cut_completion(list(tokens.completion_ids), prompt_ids, name)
            ids.append(completion)
            masks.append(np.asarray(tokens.completion_mask[:len(completion)], np.int32))
        return prompt_ids, tuple(ids), tuple(masks)

    def _cut_completion(self, ids: list[int], prompt_ids: np.ndarray, name: str) -> np.ndarray:
        room = self.config.max_length - len(prompt_ids)
        if len(ids) > room:
            ids = ids[: max(room, 0)]
            self.truncated = True
        if not ids:
            raise BadRecord(f"'{name}' is empty after truncation (the prompt has {len(prompt_ids)} tokens,"
                             f" max_length={self.config.max_length})")
        return np.asarray(ids, dtype=np.int32)

    def completion(self, prompt_ids: np.ndarray, value: str | list, name: str) -> np.ndarray:
        text = render_completion(value) if isinstance(value, list) else value
        ids = self.tokenizer.encode(text) + self.eos
        room = self.config.max_length - len(prompt_ids)
        if len(ids) > room:
            ids = ids[: max(room, 0)]
            self.truncated = True
        if not ids:
            raise BadRecord(f"'{name}' is empty after truncation (the prompt has {len(prompt_ids)} tokens,"
                             f" max_length={self.config.max_length})")
        return np.asarray(ids, dtype=np.int32)


def _parse(record: Any, kind: RecordKind, encoder: _Encoder, num_responses: int | None) -> Example:
    """Validates and tokenises one decoded JSON value; raises `BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord(f"record must be a JSON object, got {_json_type(record)}")
    if kind == "sft" and "messages" in record and "prompt" not in record:
        return _messages_example(record, encoder)
    prompt = _text_field(_get(record, "prompt"), "prompt")
    if kind == "ranking":
        responses, ranking = _get(record, "responses"), _get(record, "ranking")
        if not isinstance(responses, list) or len(responses) < 2:
            raise BadRecord("field 'responses' must be a list of at least 2 responses")
        names = [f"responses[{i}]" for i in range(len(responses))]
        completions = [_text_field(value, name) for value, name in zip(responses, names)]
        if not isinstance(ranking, list) or not all(type(r) is int and r >= 0 for r in ranking):
            raise BadRecord("field 'ranking' must be a list of non-negative integers")
        if len(ranking) != len(responses):
            raise BadRecord(f"'ranking' has {len(ranking)} entries but 'responses' has {len(responses)}")
        if num_responses is not None and len(responses) != num_responses:
            raise BadRecord(f"expected {num_responses} responses (as in the first record),"
                             f" got {len(responses)}")
    else:
        names = list(_COMPLETION_FIELDS[kind])
        completions = [_text_field(_get(record, name), name) for name in names]
        if kind == "preference" and completions[0] == completions[1]:
            raise BadRecord("'chosen' and 'rejected' are identical")
    for value, name in zip(completions, names):
        if isinstance(value, list) != isinstance(prompt, list):
            raise BadRecord(f"fields 'prompt' and '{name}' mix plain text and message lists")
        if isinstance(value, list) and value[0]["role"] != "assistant":
            role = value[0]["role"]
            raise BadRecord(f"field '{name}' must start with an assistant message, got role '{role}'")
    margin = _number(record, "margin", 0.0, -math.inf, math.inf) if kind == "preference" else 0.0
    p_chosen = _number(record, "p_chosen", 1.0, 0.0, 1.0) if kind == "preference" else 1.0
    masks: tuple[np.ndarray, ...] = ()
    if isinstance(prompt, list) and completions:
        prompt_ids, completion_ids, masks = encoder.conversation(prompt, completions, names)
    else:
        prompt_ids = encoder.prompt(prompt)
        completion_ids = tuple(encoder.completion(prompt_ids, v, name)
                               for v, name in zip(completions, names))
    if kind == "preference" and np.array_equal(completion_ids[0], completion_ids[1]):
        raise BadRecord("'chosen' and 'rejected' are identical after truncation to"
                         f" max_length={encoder.config.max_length}")
    ranks = tuple(record["ranking"]) if kind == "ranking" else ()
    desirable = _label(record) if kind == "unpaired" else True
    return Example(prompt_ids, completion_ids, margin=margin, p_chosen=p_chosen, ranks=ranks,
                   desirable=desirable, completion_masks=masks)


def _messages_example(record: Mapping[str, Any], encoder: _Encoder) -> Example:
    """An sft ``{"messages": [...]}`` record: trained on its assistant turns."""
    messages = _text_field(_get(record, "messages"), "messages")
    if not isinstance(messages, list):
        raise BadRecord("field 'messages' must be a list of messages")
    prompt_ids, completion_ids, masks = encoder.conversation(None, [messages], ["messages"])
    return Example(prompt_ids, completion_ids, completion_masks=masks)


def _label(record: Mapping[str, Any]) -> bool:
    """An unpaired record's ``label``: true (desirable) or false (undesirable)."""
    value = _get(record, "label")
    if not isinstance(value, bool):
        raise BadRecord(f"field 'label' must be true or false, got {json.dumps(value)}")
    return value


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


class DataLoader:
    """Shuffled batches where batch `step` depends only on `(seed, step)`.

    Epoch `e` visits the examples in the order `np.random.default_rng([seed, e]).permutation(N)`;
    step `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`. Iterating yields
    `batch_at(self.step)` and advances `self.step`, forever (epochs repeat with new orders);
    `state()` / `restore()` save and reset that position, so a resumed run sees the same batches.

    Args:
        dataset: a `Dataset`.
        batch_size: B.
        seed: the shuffling seed.
        shuffle: False keeps file order in every epoch.
        drop_last: True drops the incomplete last batch of each epoch (every batch has B rows).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        num_examples = len(dataset)
        if batch_size >= 1:
            self.steps_per_epoch = num_examples // batch_size if drop_last else -(-num_examples // batch_size)
        if batch_size < 1 or self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} does not fit a dataset of {num_examples} examples")
        self.step = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def indices_at(self, step: int) -> np.ndarray:
        """Example indices `[B]` (fewer in a last partial batch) of batch `step`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[index * self.batch_size: (index + 1) * self.batch_size]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """Batch number `step` (a pure function of seed and step)."""
        return self.dataset.collate(self.indices_at(step))

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state(self) -> dict[str, int]:
        """JSON-able position: the next step, its epoch and index, and what they depend on."""
        epoch, index = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "index": index, "seed": self.seed,
                "batch_size": self.batch_size, "num_examples": len(self.dataset)}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from `state()`; refuses a state from a different seed, batch size or dataset."""
        for key, current in (("seed", self.seed), ("batch_size", self.batch_size),
                             ("num_examples", len(self.dataset))):
            if state.get(key) != current:
                raise ValueError(f"loader state has {key}={state.get(key)}"
                                 f" but this loader has {key}={current}")
        self.step = int(state["step"])


class ShardedLoader:
    """Batches assembled from ``num_shards`` data shards, for a mesh that splits the batch.

    Shard ``k`` holds the records on lines ``≡ k + 1 (mod num_shards)`` of the file and
    contributes rows ``k·b … (k+1)·b − 1`` (``b = batch_size / num_shards``) of every batch, drawn
    by its own :class:`DataLoader` with seed ``(seed, k)``: batch ``step`` is a pure function of
    the seed, the step and the shard count, whatever the number of processes. A process loads
    only its shards (``datasets``: ``{k: Dataset}``) and :meth:`batch_at` gives its rows, in
    shard order, ready for ``sharding.shard_batch``; every shard pads to ``max_length`` so all
    processes agree on the batch shape.
    """

    def __init__(self, datasets: Mapping[int, Dataset], batch_size: int, *, num_shards: int,
                 seed: int = 0) -> None:
        if batch_size % num_shards:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {num_shards} data"
                             " shards of the mesh (data x fsdp)")
        self.batch_size, self.num_shards, self.seed = batch_size, num_shards, seed
        self.shards = {k: DataLoader(dataset, batch_size // num_shards, seed=seed * 1_000_003 + k)
                       for k, dataset in sorted(datasets.items())}
        self.step = 0

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of batch ``step``."""
        parts = [loader.batch_at(step) for loader in self.shards.values()]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def state(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "num_shards": self.num_shards}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from ``state()``; refuses a state from another seed, batch or sharding."""
        for key, current in (("seed", self.seed), ("batch_size", self.batch_size),
                             ("num_shards", self.num_shards)):
            if state.get(key) != current:
                raise ValueError(f"loader state has {key}={state.get(key)}"
                                 f" but this loader has {key}={current}")
        self.step = int(state["step"])


def shard_lines(shard: int, num_shards: int) -> Callable[[int], bool]:
    """The ``lines`` filter of data shard ``shard`` (of ``num_shards``)."""
    return lambda line_no: (line_no - 1) % num_shards == shard

