"""Padding-free batches: several sequences per row, or shared-prompt preference pairs.

``packing="sequences"`` (SFT): each row holds several ``[prompt completion]`` sequences, one
segment each, positions restarting at 0. ``packing="pairs"`` (preference): each pair is one
segment ``[prompt | chosen | rejected]``; the prompt is branch 0, the chosen completion branch
1, the rejected one branch 2 with positions continuing from the prompt's end, so the rejected
completion attends to the prompt but not to the chosen one and each prompt is run once per pair
(``jaxalign.models.SequenceLayout`` has the rule).

Every packed batch has one shape, :class:`PackSpec` ``(rows, length, capacity, targets)``: ids
and layout ``[rows, length]``; ``K = targets`` head positions per row (the target arrays
``target_source / target_token / target_group [rows, K]``, group ``-1`` unused); at most
``capacity`` pairs (``pair_valid [P]``: pair ``p``'s chosen completion is group ``p``, its
rejected one group ``P + p``) or sequences (``sequence_valid [S]``, group ``s``). A target's
source slot is the slot before its token in the same segment; the rejected completion's first
token is predicted from the prompt's last slot. Completion tokens with ``completion_mask`` 0
(non-assistant turns) get no target; neither does a segment's first token.

Which examples share a batch is a first-fit plan over the shuffled order (see
:class:`PackedLoader`): examples are taken in order while they fit (slots and targets of a row,
and the capacity), so a batch holds a varying number of real pairs. Examples longer than a row
are cut by the usual rules (the prompt keeps its end, completions their start) and the cut
tokens are counted (:class:`PackingReport`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxalign.data._types import Example
from jaxalign.settings import setting

PACKING_MODES = ("none", "pairs", "sequences")


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """How batches are laid out (``--packing`` and its shape flags); ``None`` = from the data."""

    packing: str = setting("none", "none: padded batches of --batch-size records; pairs:"
                           " [prompt | chosen | rejected] rows, several pairs per row, the"
                           " prompt run once per pair (dpo/ipo/orpo...); sequences: several"
                           " sequences per row (sft)", choices=PACKING_MODES)
    pack_length: int | None = setting(None, "slots per packed row (none: the longest packed"
                                      " pair/sequence of the data, rounded up to"
                                      " --pad-multiple)")
    pack_rows: int | None = setting(None, "rows per packed batch (none: room for --batch-size"
                                    " average pairs/sequences)")
    pack_capacity: int | None = setting(None, "most pairs/sequences in one packed batch (none:"
                                        " 2 x --batch-size)")
    pack_targets: int | None = setting(None, "LM-head positions per packed row (none: 1.25 x"
                                       " the data's completion share of a row, at least the"
                                       " longest pair's)")

    def __post_init__(self) -> None:
        if self.packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, got {self.packing!r}")
        for name in ("pack_length", "pack_rows", "pack_capacity", "pack_targets"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")


class PackSpec(NamedTuple):
    """The fixed shape of a packed batch."""

    rows: int  # model rows
    length: int  # slots per row, R
    capacity: int  # pair (or sequence) slots, P (S)
    targets: int  # head positions per row, K


class _Item(NamedTuple):
    """An example cut to fit one row: its pieces ``(ids, trained mask)`` in row order."""

    pieces: tuple[tuple[np.ndarray, np.ndarray], ...]
    slots: int
    targets: int
    cut: int  # tokens removed to fit


def _cap(lengths: Sequence[int], room: int) -> int:
    """The largest ``x`` with ``sum(min(n, x)) <= room`` (water-filling cut of completions)."""
    x = max(lengths)
    while x > 1 and sum(min(n, x) for n in lengths) > room:
        x -= 1
    return x


def fit_example(example: Example, kind: str, length: int, targets: int, *,
                include_prompt: bool = False) -> _Item:
    """``example`` as the pieces of one packed segment of at most ``length`` slots and
    ``targets`` head positions: ``[prompt, chosen, rejected]`` (pairs) or ``[prompt,
    completion]`` (sequences). Completions keep their start and are cut evenly (the longer one
    first); a prompt that leaves no room for one token per completion keeps its end (no BOS
    is kept: the data's own ``max_prompt_length`` cut, which keeps it, comes first)."""
    completions = example.completion_ids if kind == "pairs" else example.completion_ids[:1]
    masks = example.completion_masks or tuple(np.ones(len(c), np.int32) for c in completions)
    prompt, n = example.prompt_ids, len(completions)
    keep = min(length, targets + 1) - n if include_prompt else length - n
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep:]
    room = min(length - len(prompt), targets - (len(prompt) - 1 if include_prompt else 0))
    cap = _cap([len(c) for c in completions], room)
    kept = [(c[:cap], np.asarray(m[:cap], np.int32)) for c, m in zip(completions, masks)]
    pieces = ((prompt, np.full(len(prompt), int(include_prompt), np.int32)),) + tuple(kept)
    cut = len(example.prompt_ids) - len(prompt) + sum(max(len(c) - cap, 0) for c in completions)
    slots = sum(len(ids) for ids, _ in pieces)
    return _Item(pieces, slots, _num_targets(pieces), cut)


def _num_targets(pieces) -> int:
    """Targets the pieces produce: trained tokens that have a source slot in their segment."""
    prompt_mask = pieces[0][1]
    count = int(prompt_mask[1:].sum())
    for _, mask in pieces[1:]:
        count += int(mask.sum()) - (int(mask[0]) if len(pieces[0][0]) == 0 else 0)
    return count


def first_fit(items: Sequence[_Item], spec: PackSpec) -> list[int] | None:
    """The row of each item (first row with room for its slots and targets, in order), or
    ``None`` when they do not all fit ``spec``."""
    slots, targets, rows = [0] * spec.rows, [0] * spec.rows, []
    if len(items) > spec.capacity:
        return None
    for item in items:
        row = _place(item, spec, slots, targets)
        if row is None:
            return None
        rows.append(row)
    return rows


def _place(item: _Item, spec: PackSpec, slots: list[int], targets: list[int]) -> int | None:
    """Puts ``item`` in the first row with room (updating the fill lists); ``None``: none has."""
    for row in range(spec.rows):
        if slots[row] + item.slots <= spec.length and targets[row] + item.targets <= spec.targets:
            slots[row] += item.slots
            targets[row] += item.targets
            return row
    return None


def _empty_batch(spec: PackSpec, pad_id: int) -> dict[str, np.ndarray]:
    shape, target_shape = (spec.rows, spec.length), (spec.rows, spec.targets)
    return {"ids": np.full(shape, pad_id, np.int32), "positions": np.zeros(shape, np.int32),
            "segment_ids": np.zeros(shape, np.int32), "branch_ids": np.zeros(shape, np.int32),
            "target_source": np.zeros(target_shape, np.int32),
            "target_token": np.zeros(target_shape, np.int32),
            "target_group": np.full(target_shape, -1, np.int32)}


def pack(items: Sequence[_Item], spec: PackSpec, kind: str, pad_id: int,
         examples: Sequence[Example] = ()) -> dict[str, np.ndarray]:
    """The packed batch of ``items`` (``kind`` "pairs" or "sequences"; ``examples`` the items'
    records, for the pairs' ``margin [P]`` and ``p_chosen [P]``); raises ``ValueError`` when
    they do not fit ``spec`` (the loader's plan makes sure they do)."""
    rows = first_fit(items, spec)
    if rows is None:
        raise ValueError(f"{len(items)} {kind} do not fit a packed batch of {spec}")
    batch = _empty_batch(spec, pad_id)
    slot_of, target_of, segment_of = ([0] * spec.rows for _ in range(3))
    for index, (item, row) in enumerate(zip(items, rows)):
        segment_of[row] += 1
        start = slot_of[row]
        prompt_end = start + len(item.pieces[0][0])  # the prompt's last slot + 1
        cursor = start
        for branch, (ids, mask) in enumerate(item.pieces):
            span = slice(cursor, cursor + len(ids))
            batch["ids"][row, span] = ids
            batch["segment_ids"][row, span] = segment_of[row]
            offset = 0 if branch == 0 else prompt_end - start
            batch["positions"][row, span] = offset + np.arange(len(ids))
            batch["branch_ids"][row, span] = branch if kind == "pairs" else 0
            group = index if branch <= 1 else spec.capacity + index
            for j in np.flatnonzero(mask):
                source = cursor + j - 1 if j > 0 else (prompt_end - 1 if branch > 0 else -1)
                if source < start:
                    continue  # a segment's first token has no predecessor
                k = target_of[row]
                batch["target_source"][row, k] = source
                batch["target_token"][row, k] = ids[j]
                batch["target_group"][row, k] = group
                target_of[row] += 1
            cursor += len(ids)
        slot_of[row] = cursor
    batch["attention_mask"] = (batch["segment_ids"] > 0).astype(np.int32)
    valid = np.zeros(spec.capacity, np.float32)
    valid[:len(items)] = 1
    if kind == "pairs":
        batch["pair_valid"] = valid
        batch["margin"] = np.zeros(spec.capacity, np.float32)
        batch["p_chosen"] = np.ones(spec.capacity, np.float32)
        batch["margin"][:len(examples)] = [e.margin for e in examples]
        batch["p_chosen"][:len(examples)] = [e.p_chosen for e in examples]
    else:
        batch["input_ids"] = batch.pop("ids")
        batch["sequence_valid"] = valid
    return batch


@dataclasses.dataclass
class PackingReport:
    """What packing did to the data: tokens cut to fit a row, and the fill of the slots."""

    kind: str
    spec: PackSpec
    num_examples: int = 0
    num_cut: int = 0  # examples cut to fit
    tokens_cut: int = 0
    real_tokens: int = 0  # over the first epoch's plan
    slots: int = 0
    batches: int = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / slots of the packed batches (1 = no padding)."""
        return self.real_tokens / max(self.slots, 1)

    def summary(self) -> str:
        rows, length, capacity, targets = self.spec
        per_batch = self.num_examples / max(self.batches, 1)
        return (f"packing {self.kind}: {rows} rows x {length} slots, up to {capacity} {self.kind}"
                f" and {targets} head positions per row; {per_batch:.1f} {self.kind} per batch,"
                f" {100 * self.efficiency:.1f}% of slots real; {self.num_cut} examples cut to"
                f" fit a row ({self.tokens_cut} tokens)")


def default_spec(examples: Sequence[Example], kind: str, batch_size: int,
                 config: PackingConfig, *, pad_multiple: int = 64,
                 include_prompt: bool = False) -> PackSpec:
    """The :class:`PackSpec` of ``config`` with its ``None`` fields set from the data: the
    longest segment (rounded up to ``pad_multiple``), rows for ``batch_size`` average segments,
    a capacity of ``2 · batch_size``, and ``K`` = 1.25 × the completion share of a row."""
    completions = (lambda e: e.completion_ids) if kind == "pairs" else (
        lambda e: e.completion_ids[:1])
    sizes = np.asarray([len(e.prompt_ids) + sum(len(c) for c in completions(e))
                        for e in examples])
    trained = np.asarray([sum(len(c) for c in completions(e)) for e in examples])
    if include_prompt:
        trained = sizes - 1
    length = config.pack_length or int(math.ceil(sizes.max() / pad_multiple) * pad_multiple)
    rows = config.pack_rows or max(1, int(math.ceil(batch_size * sizes.mean() / length)))
    capacity = config.pack_capacity or 2 * batch_size
    share = trained.sum() / max(sizes.sum(), 1)
    targets = config.pack_targets or min(length, max(int(math.ceil(1.25 * share * length)),
                                                     int(min(trained.max(), length))))
    return PackSpec(rows, length, capacity, targets)
