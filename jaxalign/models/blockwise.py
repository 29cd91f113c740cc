"""Blockwise (flash-style) attention: an online softmax over key blocks, never a ``T × T``
score tensor, with the mask rule of :mod:`jaxalign.models.layout` evaluated per block.

For each block of ``b`` queries the kernel walks the key blocks that can hold a key it may
attend to (from the first slot of its earliest segment up to the block itself: causality) and
keeps a running maximum ``m``, normaliser ``l`` and output ``acc`` (Milakov & Gimelshein 2018,
arXiv:1805.02867; FlashAttention, Dao et al. 2022, arXiv:2205.14135):

    s = soft_cap(q kᵀ · scale) (masked: −∞),  m' = max(m, max s),
    l' = l·e^(m − m') + Σ e^(s − m'),  acc' = acc·e^(m − m') + e^(s − m') v,  out = acc / l.

The gradient is a ``custom_vjp`` that recomputes each block's probabilities from the saved
log-sum-exp ``m + log l`` (FlashAttention-2's backward, arXiv:2307.08691):
``dv += pᵀ do``, ``ds = p ⊙ (do vᵀ − rowsum(do ⊙ out))``, ``dq += ds k``, ``dk += dsᵀ q``
(times the soft-cap's derivative ``1 − (s/c)²`` and the scale), so the backward pass too holds
one ``[B, H, b, b]`` block at a time. Grouped-query heads share their K/V block without copies
(``q [B, Hkv, G, T, Dh]``). A query that may attend to nothing (a padding slot) gets 0.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.models.layout import SequenceLayout, block_allowed

__all__ = ["blockwise_attention"]


def _pad(x: jax.Array, axis: int, length: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)


def _key_block_range(segments: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """``(first, last)`` key block ``[nb]`` each query block must visit: from the block of the
    first slot of its earliest segment (any row) to itself; ``first > last`` when the block
    holds no real query. Segment ids are clipped to ``[0, T]`` (merging ids only widens the
    range, never drops a key)."""
    batch, length = segments.shape
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segments.shape)
    ids = jnp.clip(segments, 0, length)
    first_of = jax.vmap(lambda s, t: jax.ops.segment_min(t, s, num_segments=length + 1))(
        ids, slots)
    first = jnp.take_along_axis(first_of, ids, axis=1)  # [B, T] first slot of each segment
    first = jnp.where(segments > 0, first, length)
    first_block = jnp.min(first.reshape(batch, -1, block), axis=(0, 2)) // block
    return first_block.astype(jnp.int32), jnp.arange(length // block, dtype=jnp.int32)


class _Blocks:
    """Slices of the block-major operands (``[nb, ...]``) and the mask of block pair (i, j)."""

    def __init__(self, layout: SequenceLayout, block: int, window: Any):
        batch, length = layout.segment_ids.shape
        self.block, self.window = block, window
        self.layout = jax.tree.map(
            lambda a: a.reshape(batch, length // block, block).swapaxes(0, 1), layout)

    def meta(self, i: jax.Array) -> SequenceLayout:
        return jax.tree.map(lambda a: a[i], self.layout)

    def allowed(self, i, j) -> jax.Array:
        slots = jnp.arange(self.block, dtype=jnp.int32)
        return block_allowed(self.meta(i), self.meta(j), i * self.block + slots,
                             j * self.block + slots, self.window)[:, None, None]


def _scores(q_i, k_j, scale, cap):
    """Soft-capped scores ``[B, Hkv, G, b, b]`` float32 and the cap's derivative factor."""
    raw = jnp.einsum("bkgqd,bksd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    if cap is None:
        return raw, None
    capped = jnp.tanh(raw / cap) * cap
    return capped, 1.0 - jnp.square(capped / cap)


def _forward(q, k, v, layout, window, *, scale, cap, block):
    """``(out [nb, B, Hkv, G, b, Dh] f32, lse [nb, B, Hkv, G, b])`` over block-major q/k/v."""
    blocks = _Blocks(layout, block, window)
    first, last = _key_block_range(layout.segment_ids, block)

    def query_block(i):
        q_i = q[i]

        def visit(j, carry):
            m, l, acc = carry
            s, _ = _scores(q_i, k[j], scale, cap)
            s = jnp.where(blocks.allowed(i, j), s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            correction = jnp.exp(m - m_safe)
            acc = acc * correction[..., None] + jnp.einsum(
                "bkgqs,bksd->bkgqd", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
            return m_new, l * correction + jnp.sum(p, axis=-1), acc

        shape = q_i.shape[:-1]
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(q_i.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(first[i], last[i] + 1, visit, init)
        real = l > 0
        out = acc / jnp.where(real, l, 1.0)[..., None]
        return out, jnp.where(real, m + jnp.log(jnp.where(real, l, 1.0)), 0.0)

    return jax.lax.map(query_block, jnp.arange(q.shape[0]))


def _backward(q, k, v, layout, window, out, lse, d_out, *, scale, cap, block):
    """``(dq, dk, dv)`` block-major float32, recomputing each block's probabilities."""
    blocks = _Blocks(layout, block, window)
    first, last = _key_block_range(layout.segment_ids, block)
    delta = jnp.sum(d_out * out, axis=-1)  # [nb, B, Hkv, G, b]

    def query_block(carry, i):
        dk, dv = carry
        q_i, do_i, lse_i, delta_i = q[i], d_out[i], lse[i], delta[i]

        def visit(j, inner):
            dq_i, dk, dv = inner
            s, cap_grad = _scores(q_i, k[j], scale, cap)
            p = jnp.where(blocks.allowed(i, j), jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv.at[j].add(jnp.einsum("bkgqs,bkgqd->bksd", p, do_i))
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v[j].astype(jnp.float32))
            ds = p * (dp - delta_i[..., None])
            ds = (ds if cap_grad is None else ds * cap_grad) * scale
            dq_i = dq_i + jnp.einsum("bkgqs,bksd->bkgqd", ds, k[j].astype(jnp.float32))
            dk = dk.at[j].add(jnp.einsum("bkgqs,bkgqd->bksd", ds, q_i.astype(jnp.float32)))
            return dq_i, dk, dv

        init = (jnp.zeros(q_i.shape, jnp.float32), dk, dv)
        dq_i, dk, dv = jax.lax.fori_loop(first[i], last[i] + 1, visit, init)
        return (dk, dv), dq_i

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(q.shape[0]))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, layout, window, scale, cap, block):
    return _forward(q, k, v, layout, window, scale=scale, cap=cap, block=block)[0]


def _attention_fwd(q, k, v, layout, window, scale, cap, block):
    out, lse = _forward(q, k, v, layout, window, scale=scale, cap=cap, block=block)
    return out, (q, k, v, layout, window, out, lse)


def _attention_bwd(scale, cap, block, residuals, d_out):
    q, k, v, layout, window, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, layout, window, out, lse, d_out, scale=scale, cap=cap,
                           block=block)
    no_grad = jax.tree.map(lambda a: None, (layout, window))
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)) + no_grad


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: SequenceLayout, *,
                        scale: float, soft_cap: float | None = None, window: Any = None,
                        block_size: int = 128) -> jax.Array:
    """Masked softmax attention without a ``T × T`` tensor, forward and backward.

    Args:
      q: ``[B, Hkv, G, T, Dh]`` queries (``G`` query heads per key/value head).
      k, v: ``[B, Hkv, T, Dh]`` keys and values (the dtype the dots run in).
      layout: the :class:`~jaxalign.models.layout.SequenceLayout` of the ``T`` slots (its
        positions are the sliding window's).
      scale: the score scale (``head_dim ** −0.5`` or Gemma's ``query_pre_attn_scalar``).
      soft_cap: ``c`` of ``c·tanh(s / c)`` on the scaled scores (Gemma 2), or ``None``.
      window: sliding window ``W`` (``None``: none; may be traced).
      block_size: queries and keys per block ``b`` (``T`` is padded up to a multiple).

    Returns:
      ``[B, Hkv, G, T, Dh]`` float32; equal to dense masked softmax attention on every query
      that may attend to something, 0 on the others.
    """
    batch, kv_heads, groups, length, head_dim = q.shape
    if k.shape != (batch, kv_heads, length, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, Hkv, T, Dh] = {(batch, kv_heads, length, head_dim)}"
                         f" for q of shape {q.shape}; got {k.shape} and {v.shape}")
    block = max(1, min(block_size, length))
    padded = -(-length // block) * block
    layout = jax.tree.map(lambda a: _pad(jnp.asarray(a, jnp.int32), 1, padded), layout)
    blocked = [_pad(x, x.ndim - 2, padded) for x in (q, k, v)]
    blocked = [x.reshape(*x.shape[:-2], padded // block, block, head_dim) for x in blocked]
    blocked = [jnp.moveaxis(x, -3, 0) for x in blocked]  # block-major: [nb, B, ..., b, Dh]
    window = None if window is None else jnp.asarray(window, jnp.int32)
    out = _attention(*blocked, layout, window, float(scale), soft_cap, block)
    out = jnp.moveaxis(out, 0, -3).reshape(batch, kv_heads, groups, padded, head_dim)
    return out[..., :length, :]
