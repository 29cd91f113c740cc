"""Token log-probs (and entropies) straight from hidden states, chunk by chunk, never ``[N, V]``.

A language model's loss reads ``log softmax(x)[y]`` (and sometimes the entropy of
``softmax(x)``) where ``x = s · cap(h W)`` are the logits of hidden state ``h`` under the head
``W [D, V]``, ``cap(z) = c·tanh(z/c)`` is Gemma 2's final-logit soft-cap and ``s`` a logit
scale (``1/temperature``). Built densely, the logits of ``N`` tokens are an ``[N, V]`` float32
array (2 GiB for 4k tokens at V = 131k), and autodiff keeps it, its softmax and their
cotangents alive. :func:`token_logprobs_from_hidden` is a ``jax.custom_vjp`` that instead:

* forward: per chunk of ``C`` tokens computes the ``[C, V]`` logits (float32 accumulation, bf16
  inputs allowed), their logsumexp, the target's logit and the entropy ``H = lse − E_p[x]``; if
  ``[C, V]`` would still be large it also walks the vocabulary in chunks of ``Vc`` with an
  online (running-max) logsumexp (the weight is laid out as ``[V/Vc, D, Vc]`` once, so no
  loop slices it). It keeps only ``lse`` and ``E_p[x]`` per token.
* backward: recomputes each chunk's logits (vocabulary chunks outer, token chunks inner, so
  each ``∂W`` slice is accumulated once) and forms ``∂/∂x = g_lp·(onehot(y) − p) −
  g_H·p·(x − E_p[x])`` (times ``s·(1 − tanh²(z/c))`` through the cap), then
  ``∂h = ∂z Wᵀ`` and ``∂W += hᵀ ∂z`` chunk by chunk (``∂W`` accumulates in float32).

Chunks whose tokens are all masked are skipped (``lax.cond``), so targets sorted valid-first
cost only the valid chunks.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["DEFAULT_LOGPROB_CHUNK", "MAX_CHUNK_LOGITS", "token_logprobs_from_hidden"]

DEFAULT_LOGPROB_CHUNK = 1024
"""Tokens per chunk by default (measured on CPU; see README "Chunked log-probs")."""
MAX_CHUNK_LOGITS = 1 << 23
"""The vocabulary is split once one token chunk's logits would exceed this many floats (32 MiB)."""


class _Spec(NamedTuple):
    chunk: int  # tokens per chunk C
    vocab: int  # V
    vocab_chunk: int  # Vc (== V: one vocabulary chunk)
    soft_cap: float | None
    scale: float
    with_entropy: bool
    vocab_axis: int  # weight's vocabulary axis: 1 for [D, V], 0 for [V, D] (tied embedding)

    @property
    def vocab_chunks(self) -> int:
        return -(-self.vocab // self.vocab_chunk)


def _weight_chunks(spec: _Spec, weight: jax.Array) -> jax.Array:
    """``weight`` as ``[n_chunks, D, Vc]`` (or ``[n_chunks, Vc, D]`` for ``[V, D]``), zero-padded
    to a multiple of Vc: one copy per step, so no loop slices a strided weight."""
    n, vc = spec.vocab_chunks, spec.vocab_chunk
    if n == 1:
        return weight[None]
    pad = [(0, 0), (0, 0)]
    pad[spec.vocab_axis] = (0, n * vc - spec.vocab)
    weight = jnp.pad(weight, pad)
    if spec.vocab_axis == 0:
        return weight.reshape(n, vc, weight.shape[1])
    return weight.reshape(weight.shape[0], n, vc).transpose(1, 0, 2)


def _unchunk_weight(spec: _Spec, chunks: jax.Array) -> jax.Array:
    """The inverse of :func:`_weight_chunks` (drops the padding)."""
    if spec.vocab_chunks == 1:
        return chunks[0]
    if spec.vocab_axis == 0:
        return chunks.reshape(-1, chunks.shape[2])[:spec.vocab]
    return chunks.transpose(1, 0, 2).reshape(chunks.shape[1], -1)[:, :spec.vocab]


def _columns(spec: _Spec, k: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Vocabulary ids of chunk ``k`` and whether each is real (``None``: all are)."""
    cols = k * spec.vocab_chunk + jnp.arange(spec.vocab_chunk)
    real = None if spec.vocab_chunks * spec.vocab_chunk == spec.vocab else cols < spec.vocab
    return cols, real


def _raw_logits(spec: _Spec, hidden: jax.Array, weight: jax.Array) -> jax.Array:
    pattern = "cd,dv->cv" if spec.vocab_axis == 1 else "cd,vd->cv"
    return jnp.einsum(pattern, hidden, weight, preferred_element_type=jnp.float32)


def _capped(spec: _Spec, raw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x = s·cap(z), ∂x/∂z)``."""
    if spec.soft_cap is None:
        return spec.scale * raw, jnp.full((), spec.scale, jnp.float32)
    squashed = jnp.tanh(raw / spec.soft_cap)
    return spec.scale * spec.soft_cap * squashed, spec.scale * (1.0 - squashed * squashed)


def _chunk_forward(spec: _Spec, weights: jax.Array, hidden: jax.Array, targets: jax.Array):
    """``(target logit, lse, E_p[x])`` ``[R, C]`` each for one token chunk (online over V)."""
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = hidden.shape[0]

    def vocab_step(carry, chunk):
        top, total, weighted, picked = carry
        k, w = chunk
        _, real = _columns(spec, k)
        x, _ = _capped(spec, _raw_logits(spec, hidden, w))
        if real is not None:
            x = jnp.where(real[None, :], x, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(x, axis=1))
        decay = jnp.exp(top - new_top)
        e = jnp.exp(x - new_top[:, None])
        total = total * decay + jnp.sum(e, axis=1)
        if spec.with_entropy:
            weighted = weighted * decay + jnp.sum(e * jnp.where(e > 0, x, 0.0), axis=1)
        # The target's logit by a gather: a select over the chunk would be a second [R, V].
        local = targets - k * spec.vocab_chunk
        inside = (local >= 0) & (local < spec.vocab_chunk)
        at = jnp.take_along_axis(x, jnp.clip(local, 0, spec.vocab_chunk - 1)[:, None], axis=1)
        picked = picked + jnp.where(inside, at[:, 0], 0.0)
        return (new_top, total, weighted, picked), None

    init = (jnp.full((rows,), -jnp.inf, jnp.float32),) + (jnp.zeros((rows,), jnp.float32),) * 3
    (top, total, weighted, picked), _ = jax.lax.scan(
        vocab_step, init, (jnp.arange(spec.vocab_chunks), weights))
    lse = top + jnp.log(total)
    return picked.reshape(shape), lse.reshape(shape), (weighted / total).reshape(shape)


def _chunk_backward(spec: _Spec, k: jax.Array, w: jax.Array, grad_w: jax.Array, hidden,
                    targets, lse, mean_x, g_lp, g_ent):
    """``(grad_w + ∂W of this (token, vocabulary) chunk, ∂hidden [R, C, D] float32)``; no
    ∂W (``None``) when ``grad_w`` is ``None`` (a frozen head)."""
    shape = hidden.shape
    hidden, targets, lse, mean_x, g_lp, g_ent = (
        a.reshape(-1, *a.shape[2:]) for a in (hidden, targets, lse, mean_x, g_lp, g_ent))
    cols, real = _columns(spec, k)
    x, dx_dz = _capped(spec, _raw_logits(spec, hidden, w))
    p = jnp.exp(x - lse[:, None])
    onehot = cols[None, :] == targets[:, None]
    g_x = g_lp[:, None] * (onehot - p)
    if spec.with_entropy:
        g_x = g_x - g_ent[:, None] * p * (x - mean_x[:, None])
    g_z = g_x * dx_dz
    if real is not None:
        g_z = jnp.where(real[None, :], g_z, 0.0)
    g_z = g_z.astype(w.dtype)
    pattern = "cv,dv->cd" if spec.vocab_axis == 1 else "cv,vd->cd"
    g_hidden = jnp.einsum(pattern, g_z, w, preferred_element_type=jnp.float32)
    if grad_w is None:
        return None, g_hidden.reshape(shape)
    pattern = "cd,cv->dv" if spec.vocab_axis == 1 else "cd,cv->vd"
    delta = jnp.einsum(pattern, hidden.astype(g_z.dtype), g_z, preferred_element_type=jnp.float32)
    return grad_w + delta, g_hidden.reshape(shape)


def _chunked(spec: _Spec, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``[R, K, ...] -> [K / C, R, C, ...]`` for each array: chunks along the token axis, the
    row axis kept whole, so a batch sharded over rows stays sharded inside the loops."""
    return tuple(jnp.moveaxis(a.reshape(a.shape[0], a.shape[1] // spec.chunk, spec.chunk,
                                        *a.shape[2:]), 1, 0) for a in arrays)


def _unchunked(chunks: jax.Array) -> jax.Array:
    """The inverse of :func:`_chunked`: ``[K / C, R, C, ...] -> [R, K, ...]``."""
    chunks = jnp.moveaxis(chunks, 0, 1)
    return chunks.reshape(chunks.shape[0], -1, *chunks.shape[3:])


def _forward(spec: _Spec, hidden, weight, targets, mask):
    weights = _weight_chunks(spec, weight)

    def one(args):
        h, t, m = args
        zeros = (jnp.zeros(t.shape, jnp.float32),) * 3
        return jax.lax.cond(jnp.any(m > 0), lambda: _chunk_forward(spec, weights, h, t),
                            lambda: zeros)

    picked, lse, mean_x = jax.lax.map(one, _chunked(spec, hidden, targets, mask))
    picked, lse, mean_x = (_unchunked(a) for a in (picked, lse, mean_x))
    keep = mask > 0
    logps = jnp.where(keep, picked - lse, 0.0)
    entropy = jnp.where(keep, lse - mean_x, 0.0)
    return (logps, entropy), (lse, mean_x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _logprobs(spec: _Spec, hidden, weight, targets, mask):
    return _forward(spec, hidden, weight, targets, mask)[0]


def _logprobs_fwd(spec: _Spec, hidden, weight, targets, mask):
    # symbolic_zeros: each input says whether it is perturbed. A weight that is not (LoRA's
    # frozen head, stop_gradient-ed) gets no ∂W: the scan accumulating it is loop-carried, so
    # XLA would not remove it as dead code (a [D, V] float32 buffer and a matmul per chunk).
    needs_grad_w = weight.perturbed
    hidden, weight, targets, mask = (a.value for a in (hidden, weight, targets, mask))
    outputs, (lse, mean_x) = _forward(spec, hidden, weight, targets, mask)
    return outputs, (hidden, weight, targets, mask, lse, mean_x, () if needs_grad_w else None)


def _dense(g: Any, like: jax.Array) -> jax.Array:
    """A cotangent as a float32 array (a symbolic zero: zeros)."""
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros(like.shape, jnp.float32)
    return jnp.asarray(g, jnp.float32)


def _logprobs_bwd(spec: _Spec, residuals, cotangents):
    """Outer loop over vocabulary chunks (each emits its ∂W slice), inner over token chunks
    (each emits its ∂hidden, summed over the vocabulary chunks)."""
    hidden, weight, targets, mask, lse, mean_x, needs_grad_w = residuals
    keep = (mask > 0).astype(jnp.float32)
    g_lp, g_ent = (keep * _dense(g, lse) for g in cotangents)
    tokens = _chunked(spec, hidden, targets, mask, lse, mean_x, g_lp, g_ent)

    def vocab_step(g_hidden, chunk):
        k, w = chunk

        def token_step(grad_w, args):
            h, t, m, l, mx, gl, ge = args
            return jax.lax.cond(
                jnp.any(m > 0),
                lambda: _chunk_backward(spec, k, w, grad_w, h, t, l, mx, gl, ge),
                lambda: (grad_w, jnp.zeros(h.shape, jnp.float32)))

        init = None if needs_grad_w is None else jnp.zeros(w.shape, jnp.float32)
        grad_w, g_h = jax.lax.scan(token_step, init, tokens)
        return g_hidden + _unchunked(g_h), grad_w

    g_hidden, grad_w = jax.lax.scan(
        vocab_step, jnp.zeros(hidden.shape, jnp.float32),
        (jnp.arange(spec.vocab_chunks), _weight_chunks(spec, weight)))
    grad_w = (jnp.zeros(weight.shape, jnp.float32) if needs_grad_w is None
              else _unchunk_weight(spec, grad_w))
    return g_hidden.astype(hidden.dtype), grad_w.astype(weight.dtype), None, None


_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd, symbolic_zeros=True)


def _vocab_chunk(vocab: int, chunk: int, vocab_chunk_size: int | None) -> int:
    if vocab_chunk_size is not None:
        if vocab_chunk_size < 1:
            raise ValueError(f"vocab_chunk_size must be at least 1, got {vocab_chunk_size}")
        return min(vocab_chunk_size, vocab)
    pieces = math.ceil(chunk * vocab / MAX_CHUNK_LOGITS)
    return math.ceil(vocab / pieces)


def token_logprobs_from_hidden(
    hidden: ArrayLike,
    weight: ArrayLike,
    targets: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    with_entropy: bool = False,
    soft_cap: float | None = None,
    logit_scale: float = 1.0,
    weight_layout: str = "dv",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``log softmax(x)[targets]`` (and ``H(softmax(x))``) for ``x = s·cap(hidden @ W)``.

    ``cap(z) = c·tanh(z/c)`` with ``c = soft_cap`` (none: identity), ``s = logit_scale``. The
    same numbers as building the logits densely (float32, to rounding), without ``[N, V]``
    in the forward or the backward pass; differentiable in ``hidden`` and ``weight``.

    Args:
      hidden: ``[..., D]`` hidden states (bf16 or float32; the matmul accumulates in float32).
      weight: ``[D, V]`` head kernel (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``, a tied
        embedding, used without a transposed copy).
      targets: ``[...]`` int token ids predicted from each hidden state.
      mask: ``[...]``; positions with ``mask <= 0`` give 0 and no gradient (default all ones).
      chunk_size: tokens per chunk (default :data:`DEFAULT_LOGPROB_CHUNK`); need not divide N.
        With ``hidden [R, K, D]`` the chunks run along ``K`` over all ``R`` rows at once
        (``chunk_size // R`` slots of each row, at least 1), so rows sharded over a mesh stay
        sharded.
      vocab_chunk_size: vocabulary columns per chunk (default: all of V unless
        ``chunk_size·V`` exceeds :data:`MAX_CHUNK_LOGITS`); need not divide V.
      with_entropy: also return the entropy of each position's softmax.

    Returns:
      ``[...]`` float32 log-probs, or ``(log-probs, entropies)`` with ``with_entropy``.
    """
    hidden, weight, targets = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(targets)
    if weight_layout not in ("dv", "vd") or weight.ndim != 2:
        raise ValueError(f"weight must be 2-D with weight_layout 'dv' or 'vd'; got shape "
                         f"{weight.shape} and weight_layout={weight_layout!r}")
    vocab_axis = 1 if weight_layout == "dv" else 0
    if hidden.shape[-1:] != (weight.shape[1 - vocab_axis],) or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"hidden [..., D], weight ({weight_layout}) and targets [...] disagree:"
                         f" hidden {hidden.shape}, weight {weight.shape}, targets {targets.shape}")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else jnp.asarray(mask)
    if mask.shape != targets.shape:
        raise ValueError(f"mask has shape {mask.shape}; expected targets' shape {targets.shape}")
    chunk = DEFAULT_LOGPROB_CHUNK if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    lead = targets.shape
    if math.prod(lead) == 0:
        empty = jnp.zeros(lead, jnp.float32)
        return (empty, empty) if with_entropy else empty
    rows = lead[0] if len(lead) > 1 else 1  # [R, K...]: chunks run along K, all R rows at once
    width = math.prod(lead) // rows
    per_row = min(max(chunk // rows, 1), width)
    vocab = weight.shape[vocab_axis]
    spec = _Spec(per_row, vocab, _vocab_chunk(vocab, per_row * rows, vocab_chunk_size),
                 None if soft_cap is None else float(soft_cap), float(logit_scale),
                 bool(with_entropy), vocab_axis)
    pad = -width % per_row
    flat = lambda a, *tail: jnp.pad(  # noqa: E731
        a.reshape(rows, width, *tail), ((0, 0), (0, pad)) + ((0, 0),) * len(tail))
    logps, entropy = _logprobs(spec, flat(hidden, hidden.shape[-1]), weight,
                               flat(targets.astype(jnp.int32)), flat(mask.astype(jnp.float32)))
    logps, entropy = logps[:, :width].reshape(lead), entropy[:, :width].reshape(lead)
    return (logps, entropy) if with_entropy else logps
