"""Token ids and assistant-only loss masks of conversations.

A conversational record trains on its **assistant turns only**, across multi-turn
conversations. The mask is found by rendering prefixes, with no template-specific marker
parsing: assistant message ``i`` owns the tokens that ``render(messages[:i + 1])`` adds to
``render(messages[:i], add_generation_prompt=True)`` (so the header the generation prompt
writes is context, and the turn's end-of-turn token is trained). That needs the template to be
*prefix-stable*: the tokens of every such prefix rendering must start the tokens of the whole
conversation; a conversation whose rendering is not (a template that rewrites earlier turns,
say) raises :class:`ConversationError`, which the data loader reports as ``file:line``.

With a chat template (``tokenizer.chat_template``) the ids are exactly
``transformers.AutoTokenizer.apply_chat_template``'s: ``encode`` of the rendered text, no BOS
or EOS added (the template writes its own ``bos_token`` and end-of-turn tokens). Without one
(the plain ``<|role|>`` format) the layout is the data pipeline's ``[BOS] prompt completion
[EOS]``, encoded piece by piece as before, the EOS trained when the conversation ends with an
assistant message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jinja2

from jaxalign.chat_template import apply_chat_template as plain_template
from jaxalign.tokenizer import Tokenizer

__all__ = ["ConversationError", "ConversationTokens", "encode_conversation", "encode_prompt"]

Messages = Sequence[Mapping[str, Any]]


class ConversationError(ValueError):
    """A conversation the chat template cannot render, or renders not prefix-stably."""


class ConversationTokens(NamedTuple):
    """A conversation split into its prompt and its completion (lists of ids), with the
    completion's loss mask (1 on assistant tokens) of the same length."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]


def _render_ids(tokenizer: Tokenizer, messages: Messages, generation_prompt: bool) -> list[int]:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                             tokenize=True)
    except jinja2.TemplateError as error:
        raise ConversationError(f"the chat template rejects the conversation: {error}") from None


def _check_prefix(prefix: list[int], full: list[int], count: int, what: str) -> None:
    if full[:len(prefix)] != prefix:
        raise ConversationError(
            f"the chat template is not prefix-stable on this conversation: rendering its first"
            f" {count} messages{what} gives tokens that do not start the whole conversation's,"
            " so its assistant turns cannot be told apart")


def _templated(tokenizer: Tokenizer, messages: Messages, first: int) -> ConversationTokens:
    """Ids of the whole conversation, split before message ``first`` (its prompt ends with
    the generation prompt), with the assistant turns from ``first`` on masked in."""
    full = _render_ids(tokenizer, messages, False)
    prompt = _render_ids(tokenizer, messages[:first], True) if first else []
    _check_prefix(prompt, full, first, " with a generation prompt")
    mask = [0] * (len(full) - len(prompt))
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = _render_ids(tokenizer, messages[:i], True) if i else []
        through = _render_ids(tokenizer, messages[:i + 1], False)
        _check_prefix(before, full, i, " with a generation prompt")
        _check_prefix(through, full, i + 1, "")
        for t in range(max(len(before), len(prompt)), len(through)):
            mask[t - len(prompt)] = 1
    return ConversationTokens(prompt, full[len(prompt):], mask)


def _plain(tokenizer: Tokenizer, messages: Messages, first: int, *, add_bos: bool,
           add_eos: bool) -> ConversationTokens:
    """The plain format, encoded piece by piece (prompt, then each later message)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    prompt = bos + tokenizer.encode(plain_template(messages[:first], add_generation_prompt=True))
    ids: list[int] = []
    mask: list[int] = []
    for i in range(first, len(messages)):
        assistant = messages[i]["role"] == "assistant"
        header = "<|assistant|>\n" if i > first and assistant else ""
        text = plain_template(messages[:i + 1])[len(plain_template(messages[:i])):]
        body = text[len("<|assistant|>\n"):] if assistant else text
        for piece, trained in ((header, 0), (body, int(assistant))):
            if piece:
                piece_ids = tokenizer.encode(piece)
                ids += piece_ids
                mask += [trained] * len(piece_ids)
    if add_eos and tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
        mask.append(int(messages[-1]["role"] == "assistant"))
    return ConversationTokens(prompt, ids, mask)


def encode_conversation(tokenizer: Tokenizer, prompt: Messages | None, completion: Messages, *,
                        add_bos: bool = True, add_eos: bool = True) -> ConversationTokens:
    """``prompt`` (the conversation so far; ``None`` for a ``messages`` record, whose prompt is
    everything before its first assistant message) and ``completion`` as token ids, the
    completion masked to its assistant turns. ``add_bos`` / ``add_eos`` apply to the plain
    format only (a chat template writes its own).

    Raises:
      ConversationError: no assistant message to train on, a template error, or a rendering
        that is not prefix-stable.
    """
    messages = list(prompt or []) + list(completion)
    first = len(prompt) if prompt is not None else next(
        (i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None or not any(m["role"] == "assistant" for m in messages[first:]):
        raise ConversationError("the conversation has no assistant message to train on")
    if tokenizer.chat_template is None:
        return _plain(tokenizer, messages, first, add_bos=add_bos, add_eos=add_eos)
    return _templated(tokenizer, messages, first)


def encode_prompt(tokenizer: Tokenizer, prompt: Messages, *, add_bos: bool = True) -> list[int]:
    """A conversation so far, ending with the generation prompt (what a sampler continues):
    the chat template's ids, or ``[BOS]`` + the plain format."""
    if tokenizer.chat_template is None:
        bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
        return bos + tokenizer.encode(plain_template(prompt, add_generation_prompt=True))
    return _render_ids(tokenizer, prompt, True)
