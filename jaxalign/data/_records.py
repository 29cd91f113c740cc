"""One JSON record checked and tokenised: fields, truncation, conversational masks."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxalign.conversation import ConversationError, encode_conversation, encode_prompt
from jaxalign.tokenizer import Tokenizer, apply_chat_template, render_completion
from jaxalign.data._types import (
    _COMPLETION_FIELDS, BadRecord, DataConfig, Example, RecordKind,
)


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
        return self._cut_prompt(self.bos + self.tokenizer.encode(value))

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
        return self._cut_completion(self.tokenizer.encode(text) + self.eos, prompt_ids, name)


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
