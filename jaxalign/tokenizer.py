"""A thin layer over Hugging Face `tokenizers`: ids as numpy arrays, explicit BOS/EOS/padding.

`Tokenizer` wraps a `tokenizers.Tokenizer` and never lets the backend add special tokens
by itself (a Llama `tokenizer.json` has a post-processor that prepends `<s>`): BOS and EOS are
added only where the caller asks for them, so the data pipeline controls the layout exactly.

    tok = Tokenizer.train_bpe(texts, vocab_size=512)      # byte-level BPE, lossless
    tok = Tokenizer.from_file("path/to/hf_model_dir")     # reads tokenizer.json (+ config)
    ids, mask = tok.encode_batch(texts, max_length=64, padding_side="left")   # [B, L] int32
    text = tok.apply_chat_template(messages, add_generation_prompt=True)       # the model's own

A tokenizer loaded from a Hugging Face directory renders conversations with the model's own
Jinja chat template (`tokenizer_config.json`'s `chat_template`, or `chat_template.jinja`;
:mod:`jaxalign.chat_template` renders it exactly as transformers does), so
`tok.encode(tok.apply_chat_template(messages))` equals
`transformers.AutoTokenizer.apply_chat_template(messages)`. It also carries the directory's
`generation_config.json`: `stop_ids` are its `eos_token_id` list (a chat model ends turns with
its own token, e.g. Llama 3's `<|eot_id|>`), else `config.json`'s, else `eos_id`.

Without a template the fallback (module-level `apply_chat_template`) is a plain-text format,
the same for every model:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}\\n

i.e. each message is a header line `<|role|>` followed by its content and a newline.
`add_generation_prompt=True` appends the header `<|assistant|>\\n` so a model continues with
the assistant's reply. It is deliberately not the model's own Jinja template: it is exact,
reversible and identical in training and generation, which is what a small model trained or
fine-tuned here needs. Add the headers to `special_tokens` when training a tokenizer if you
want them to be single tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxalign import chat_template as templates
from jaxalign.chat_template import CHAT_ROLES, apply_chat_template, render_completion

__all__ = ["CHAT_ROLES", "Tokenizer", "apply_chat_template", "pad_rows", "render_completion"]

# Names looked up, in order, when a special token is not given explicitly.
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>")
_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


def _token_name(value: object) -> str | None:
    """A special token as written in `tokenizer_config.json`: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` with explicit special tokens and numpy batch encoding.

    Args:
        backend: the wrapped `tokenizers.Tokenizer`.
        pad_token, bos_token, eos_token: override the special tokens by their text (must be in
            the vocabulary). When None, the first of the common names present is used
            (`<pad>`; `<bos>`, `<s>`, `<|begin_of_text|>`; `<eos>`, `</s>`, `<|endoftext|>`,
            `<|end_of_text|>`), and the id is None if none is present.
        chat_template: a Jinja chat template, or named templates `{name: template}`; None
            renders conversations in the plain format.
        config: the `tokenizer_config.json` this tokenizer came from (saved back by `save`).
        generation_config: the `generation_config.json` of its model directory, if any.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        pad_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self._pad_id = self._lookup("pad_token", pad_token, _PAD_NAMES)
        self._bos_id = self._lookup("bos_token", bos_token, _BOS_NAMES)
        self._eos_id = self._lookup("eos_token", eos_token, _EOS_NAMES)
        self.chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else (
            chat_template)
        self.config = dict(config or {})
        self.generation_config = None if generation_config is None else dict(generation_config)

    def _lookup(self, what: str, explicit: str | None, names: Sequence[str]) -> int | None:
        if explicit is not None:
            token_id = self.backend.token_to_id(explicit)
            if token_id is None:
                raise ValueError(f"{what}={explicit!r} is not in the tokenizer's vocabulary")
            return token_id
        for name in names:
            token_id = self.backend.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    # ------------------------------------------------------------------ construction / io
    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        pad_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> Tokenizer:
        """Loads a `tokenizer.json`, or a directory holding one (a Hugging Face model dir).

        In a directory, `tokenizer_config.json` (if present) names the special tokens; explicit
        arguments take precedence over it, and it over the common-name lookup. The directory's
        chat template(s) and `generation_config.json` (or `config.json`'s token ids) are read
        too (see the module docstring).
        """
        path = os.fspath(path)
        names: dict[str, str | None] = {}
        config: dict[str, Any] = {}
        chat_template, generation_config = None, None
        if os.path.isdir(path):
            config_path = os.path.join(path, "tokenizer_config.json")
            if os.path.exists(config_path):
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
                names = {key: _token_name(config.get(key)) for key in ("pad_token", "bos_token", "eos_token")}
            chat_template = templates.read_chat_templates(path, config)
            generation_config = _read_generation_config(path)
            path = os.path.join(path, "tokenizer.json")
        explicit = {"pad_token": pad_token, "bos_token": bos_token, "eos_token": eos_token}
        config.update({key: name for key, name in explicit.items() if name is not None})
        backend = tokenizers.Tokenizer.from_file(path)
        vocab = backend.get_vocab(with_added_tokens=True)
        # A config may name a token the vocabulary lacks (e.g. a pad token added later): ignore it.
        names = {key: name for key, name in names.items() if name is not None and name in vocab}
        return cls(
            backend,
            pad_token=pad_token if pad_token is not None else names.get("pad_token"),
            bos_token=bos_token if bos_token is not None else names.get("bos_token"),
            eos_token=eos_token if eos_token is not None else names.get("eos_token"),
            chat_template=chat_template, config=config, generation_config=generation_config,
        )

    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>"),
        split_digits: bool = False,
    ) -> Tokenizer:
        """Trains a byte-level BPE (GPT-2 style): any text round-trips exactly, no `<unk>`.

        Special tokens get the first ids, in the order given (`<pad>`=0, `<bos>`=1, `<eos>`=2
        by default). `vocab_size` counts them and the 256 byte symbols. `split_digits` makes
        every digit a token of its own (numbers stay spelt out, as Llama's tokenizers do).
        """
        backend = tokenizers.Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.pre_tokenizer = (pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits else byte_level)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    def save(self, path: str | os.PathLike) -> None:
        """Writes `path` if it ends in `.json`; otherwise makes the directory `path` and writes
        `tokenizer.json`, a `tokenizer_config.json` (the one it was loaded with, naming the
        special tokens, with its `chat_template`; `transformers.AutoTokenizer` loads it) and its
        `generation_config.json` if it has one, so `from_file(path)` restores all of it."""
        path = os.fspath(path)
        if path.endswith(".json"):
            self.backend.save(path)
            return
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        config = {key: value for key, value in self.config.items() if key != "chat_template"}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(pad_token=self._token(self._pad_id), bos_token=self._token(self._bos_id),
                      eos_token=self._token(self._eos_id))
        if isinstance(self.chat_template, str):
            config["chat_template"] = self.chat_template
        elif self.chat_template:
            config["chat_template"] = [{"name": name, "template": template}
                                       for name, template in self.chat_template.items()]
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        if self.generation_config is not None:
            with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump(self.generation_config, f, indent=2)

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included (the model's embedding rows needed)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: `generation_config`'s `eos_token_id` (an id or a list),
        else `(eos_id,)` (empty without one)."""
        eos = (self.generation_config or {}).get("eos_token_id")
        if eos is None:
            return () if self._eos_id is None else (self._eos_id,)
        return tuple(dict.fromkeys(eos if isinstance(eos, list) else [eos]))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The special tokens a chat template sees (`bos_token`, `eos_token`, ...): those its
        `tokenizer_config.json` names, as transformers passes them; without a config, the
        resolved pad/BOS/EOS tokens."""
        if self.config:
            names = {key: _token_name(self.config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
        else:
            names = {"bos_token": self._token(self._bos_id), "eos_token": self._token(self._eos_id),
                     "pad_token": self._token(self._pad_id)}
        return {key: name for key, name in names.items() if name is not None}

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = False, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str | list[int]:
        """The conversation as text (or, with `tokenize`, its ids: `encode` of the text, no
        special tokens added, as transformers does) in this tokenizer's chat template;
        `chat_template` names one of several templates or is a template itself. Without a
        template: the plain format of the module-level `apply_chat_template`. `kwargs` (e.g.
        `tools`, `documents`, template options) are passed to the template."""
        if self.chat_template is None and chat_template is None:
            text = apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        else:
            source = templates.select_template(self.chat_template or {}, chat_template,
                                               kwargs.get("tools"))
            text = templates.render(source, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens_map, **kwargs)
        return self.encode(text) if tokenize else text

    @property
    def padding_id(self) -> int:
        """The id written into padded positions: `pad_id`, else `eos_id`, else 0.

        Padded positions are always excluded by the masks, so the value only has to be valid.
        """
        for token_id in (self._pad_id, self._eos_id):
            if token_id is not None:
                return token_id
        return 0

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; BOS/EOS added only when asked and when the tokenizer has them."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_specials(ids, add_bos=add_bos, add_eos=add_eos)

    def _with_specials(self, ids: list[int], *, add_bos: bool, add_eos: bool) -> list[int]:
        prefix = [self._bos_id] if add_bos and self._bos_id is not None else []
        suffix = [self._eos_id] if add_eos and self._eos_id is not None else []
        return prefix + list(ids) + suffix

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or a 1-D array); special tokens dropped by default."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        padding_side: Literal["right", "left"] = "right",
        truncation_side: Literal["right", "left"] = "right",
        add_bos: bool = False,
        add_eos: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes, truncates and pads a batch.

        Truncation removes text tokens only (from the end for `truncation_side="right"`, from
        the start for `"left"`); the BOS and EOS asked for are always kept. Without
        `max_length` the batch is padded to its longest sequence.

        Args:
            texts: B strings.
            max_length: L, the padded length (and truncation limit); None = longest in batch.

        Returns:
            `(ids, attention_mask)`, both int32 `[B, L]`; the mask is 1 on real tokens and 0 on
            padding (`padding_id`).
        """
        if padding_side not in ("right", "left") or truncation_side not in ("right", "left"):
            raise ValueError("padding_side and truncation_side must be 'right' or 'left'")
        num_specials = len(self._with_specials([], add_bos=add_bos, add_eos=add_eos))
        if max_length is not None and max_length < max(num_specials, 1):
            raise ValueError(f"max_length={max_length} leaves no room for any token")
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        rows = []
        for encoding in encodings:
            ids = encoding.ids
            if max_length is not None and len(ids) + num_specials > max_length:
                keep = max_length - num_specials
                ids = ids[:keep] if truncation_side == "right" else ids[len(ids) - keep :]
            rows.append(self._with_specials(ids, add_bos=add_bos, add_eos=add_eos))
        length = max_length if max_length is not None else max((len(r) for r in rows), default=0)
        return pad_rows(rows, length, pad_id=self.padding_id, side=padding_side)

    def decode_batch(
        self,
        ids: np.ndarray | Sequence[Sequence[int]],
        *,
        attention_mask: np.ndarray | None = None,
        skip_special_tokens: bool = True,
    ) -> list[str]:
        """Decodes each row of `ids` `[B, L]`; positions where `attention_mask` is 0 are dropped."""
        texts = []
        for row_index, row in enumerate(ids):
            row = np.asarray(row)
            if attention_mask is not None:
                row = row[np.asarray(attention_mask[row_index]).astype(bool)]
            texts.append(self.decode(row.tolist(), skip_special_tokens=skip_special_tokens))
        return texts


def pad_rows(
    rows: Sequence[Sequence[int]], length: int, *, pad_id: int, side: Literal["right", "left"]
) -> tuple[np.ndarray, np.ndarray]:
    """Pads id lists (each at most `length` long) into `(ids, mask)` int32 `[B, length]`."""
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        n = len(row)
        if n > length:
            raise ValueError(f"row {i} has {n} tokens, more than length={length}")
        span = slice(0, n) if side == "right" else slice(length - n, length)
        ids[i, span] = row
        mask[i, span] = 1
    return ids, mask


def _read_generation_config(directory: str) -> dict[str, Any] | None:
    """`generation_config.json` of a model directory, else the token ids of its `config.json`
    (what transformers' `GenerationConfig.from_model_config` takes), else None."""
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(directory, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                values = json.load(f)
            if name == "generation_config.json":
                return values
            ids = {k: values[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if values.get(k) is not None}
            return ids or None
    return None
