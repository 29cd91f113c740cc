"""Where each slot of a row sits: packed sequences and shared-prompt branches.

A :class:`SequenceLayout` describes rows that hold several sequences (padding-free packing) or
a prompt shared by two completions (``[prompt | chosen | rejected]``). Slot ``i`` may attend
to slot ``j`` iff

    j <= i  and  segment_ids[j] == segment_ids[i] > 0
            and  branch_ids[j] in {0, branch_ids[i]}
            (sliding-window layers also: positions[i] - positions[j] < W)

and rotary embeddings read ``positions`` (restarting at 0 in each segment; a branch continues
from the end of its segment's shared part). :func:`allowed_mask` is that rule as a dense
``[B, T, T]`` bool (the dense attention path); the blockwise path evaluates the same rule one
block at a time (:mod:`jaxalign.models.blockwise`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["SequenceLayout", "allowed_mask", "block_allowed", "check_layout", "layout_from_mask"]


class SequenceLayout(NamedTuple):
    """Per-slot placement of a batch of rows ``[B, T]`` (all int32).

    Attributes:
      positions: ``[B, T]`` rotary position of each slot (restarting per segment).
      segment_ids: ``[B, T]`` 0 = padding, 1, 2, ... = the packed sequence the slot belongs to.
      branch_ids: ``[B, T]`` 0 = the segment's shared part (e.g. a prompt), ``k > 0`` = branch
        ``k`` (1 = chosen, 2 = rejected); a branch sees the shared part and itself only.
    """

    positions: jax.Array
    segment_ids: jax.Array
    branch_ids: jax.Array


def check_layout(layout: SequenceLayout, shape: tuple[int, ...]) -> SequenceLayout:
    """``layout`` as int32 arrays, each checked to have ``shape`` (the tokens' ``[B, T]``)."""
    arrays = []
    for name, value in zip(SequenceLayout._fields, layout):
        value = jnp.asarray(value)
        if value.shape != tuple(shape):
            raise ValueError(f"layout.{name} has shape {value.shape}; expected the tokens'"
                             f" shape {tuple(shape)}")
        if not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(f"layout.{name} must be integer, got {value.dtype}")
        arrays.append(value.astype(jnp.int32))
    return SequenceLayout(*arrays)


def layout_from_mask(attention_mask: ArrayLike) -> SequenceLayout:
    """The layout of ordinary (left- or right-padded) rows: one segment per row (the real
    tokens), no branches, and *slot* numbers as window positions, so a sliding window counts
    slots exactly as the unpacked model does (equal to positions on every real token)."""
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
    return SequenceLayout(slots, (mask > 0).astype(jnp.int32), jnp.zeros_like(mask))


def block_allowed(query: SequenceLayout, key: SequenceLayout, query_slot: jax.Array,
                  key_slot: jax.Array, window: ArrayLike | None = None) -> jax.Array:
    """The attention rule between query slots and key slots: ``[B, Tq, Tk]`` bool.

    ``query``/``key`` are the layouts of those slots (``[B, Tq]`` / ``[B, Tk]``),
    ``query_slot [Tq]`` and ``key_slot [Tk]`` their slot numbers (causality), ``window`` the
    sliding window ``W`` (``None``: none; may be traced, e.g. a large value for global layers).
    """
    q_seg, k_seg = query.segment_ids[:, :, None], key.segment_ids[:, None, :]
    q_branch, k_branch = query.branch_ids[:, :, None], key.branch_ids[:, None, :]
    allowed = (key_slot[None, None, :] <= query_slot[None, :, None]) & (q_seg == k_seg) & (q_seg > 0)
    allowed &= (k_branch == 0) | (k_branch == q_branch)
    if window is not None:
        allowed &= (query.positions[:, :, None] - key.positions[:, None, :]) < window
    return allowed


def allowed_mask(layout: SequenceLayout, window: ArrayLike | None = None) -> jax.Array:
    """Dense ``[B, T, T]`` bool of :func:`block_allowed` over whole rows."""
    slots = jnp.arange(layout.segment_ids.shape[1], dtype=jnp.int32)
    return block_allowed(layout, layout, slots, slots, window)
