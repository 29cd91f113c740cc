"""Per-token and per-sequence log-probabilities from causal-LM logits.

Shift convention (the one place it is handled): a causal LM fed ``tokens [B, T]`` returns
``logits [B, T, V]`` where ``logits[:, t]`` predicts ``tokens[:, t + 1]``. :func:`token_logprobs`
returns an array aligned with ``tokens``: entry ``t`` is ``log p(tokens[t] | tokens[:t])``, taken
from ``logits[:, t - 1]``; entry 0 has no prediction and is 0. Because the result is aligned with
the tokens, the same ``completion_mask`` that marks completion tokens selects their log-probs.

Those take ``[B, T, V]`` logits. The training steps never build them: :func:`logprobs_at`
gathers only the hidden states that predict a counted token (a batch's :class:`HeadTargets`,
or :func:`targets_from_completion_mask` of a padded batch) and runs them through the chunked
head :func:`token_logprobs_from_hidden`; :func:`group_sums` adds the log-probs into sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.chunked_logprobs import token_logprobs_from_hidden

__all__ = ["HeadTargets", "HeadWeight", "gather_logprobs", "group_sums", "logprobs_at",
           "sequence_logprobs", "targets_from_completion_mask", "token_logprobs",
           "token_logprobs_from_hidden"]
from jaxalign.masking import masked_mean, masked_sum


def _check_logits_tokens(logits: jax.Array, tokens: jax.Array) -> None:
    if logits.ndim != tokens.ndim + 1 or logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits must have shape tokens.shape + [V]; got logits {logits.shape} and "
            f"tokens {tokens.shape}"
        )


def gather_logprobs(logits: ArrayLike, tokens: ArrayLike) -> jax.Array:
    """``log softmax(logits)[..., tokens]`` without a shift, in float32.

    Args:
      logits: ``[..., V]`` unnormalised scores.
      tokens: ``[...]`` integer ids, one per row of ``logits``.

    Returns:
      ``[...]`` float32 log-probabilities. Computed as ``logits[tok] − logsumexp(logits)`` so
      the ``[..., V]`` log-softmax is never materialised.
    """
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens)
    _check_logits_tokens(logits, tokens)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs(logits: ArrayLike, tokens: ArrayLike) -> jax.Array:
    """Log-probability of each token given the tokens before it (shift handled here).

    ``out[b, t] = log softmax(logits[b, t − 1])[tokens[b, t]]`` for ``t ≥ 1`` and ``out[b, 0] = 0``.

    Args:
      logits: ``[B, T, V]`` logits of a causal LM run on ``tokens``.
      tokens: ``[B, T]`` integer token ids.

    Returns:
      ``[B, T]`` float32 log-probs aligned with ``tokens``.
    """
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens)
    _check_logits_tokens(logits, tokens)
    # Shift the [B, T] tokens rather than slice the [B, T, V] logits: slicing copies the logits
    # (and its transpose pads a zero tensor of that size), which costs ~2x in a training step
    # on CPU. The last position's "next token" wraps around and is discarded.
    next_tokens = jnp.roll(tokens, -1, axis=1)
    predicted = gather_logprobs(logits, next_tokens)
    return jnp.pad(predicted[:, :-1], ((0, 0), (1, 0)))


def sequence_logprobs(
    logits: ArrayLike,
    tokens: ArrayLike,
    completion_mask: ArrayLike,
    *,
    average: bool = False,
) -> jax.Array:
    """Log-probability of each sequence's completion: ``Σ_t mask_t · log p(y_t | y_<t)``.

    DPO uses the sum (``average=False``); IPO and ORPO use the per-token mean
    (``average=True``: the sum divided by the number of completion tokens, 0 for an empty
    completion).

    Args:
      logits: ``[B, T, V]`` logits of a causal LM run on ``tokens``.
      tokens: ``[B, T]`` prompt + completion ids (right-padded).
      completion_mask: ``[B, T]``, 1 on completion tokens, 0 on prompt and padding.
      average: per-token mean instead of sum.

    Returns:
      ``[B]`` float32 sequence log-probs.
    """
    per_token = token_logprobs(logits, tokens)
    mask = jnp.asarray(completion_mask)
    if mask.shape != per_token.shape:
        raise ValueError(
            f"completion_mask has shape {mask.shape}; expected tokens' shape {per_token.shape}"
        )
    if average:
        return masked_mean(per_token, mask, axis=-1)
    return masked_sum(per_token, mask, axis=-1)


# --- log-probs at chosen positions, from hidden states (the head never sees the others) -----


class HeadWeight(NamedTuple):
    """An LM head as :func:`token_logprobs_from_hidden` reads it: ``weight`` ``[D, V]``
    (``layout="dv"``) or a tied embedding ``[V, D]`` (``"vd"``), and the final soft-cap."""

    weight: jax.Array
    layout: str = "dv"
    soft_cap: float | None = None


class HeadTargets(NamedTuple):
    """Which positions reach the LM head, ``[rows, K]`` each (a batch's ``target_source``,
    ``target_token`` and ``target_group``).

    ``source``: the slot whose hidden state predicts the token; ``token``: the predicted id;
    ``group``: the sequence its log-prob adds into, ``-1`` for an unused slot.
    """

    source: jax.Array
    token: jax.Array
    group: jax.Array


def targets_from_completion_mask(
    tokens: ArrayLike, completion_mask: ArrayLike, *, row_groups: ArrayLike | None = None
) -> HeadTargets:
    """The :class:`HeadTargets` of a right- or left-padded batch: slot ``t ≥ 1`` with
    ``completion_mask[b, t] > 0`` is predicted from slot ``t − 1`` into group ``row_groups[b]``
    (default ``b``). ``K = T − 1``; slots outside the completion get group ``-1``.

    Args:
      tokens: ``[B, T]`` ids.
      completion_mask: ``[B, T]``, 1 on the tokens whose log-probs a loss reads.
      row_groups: ``[B]`` int group of each row.

    Returns:
      :class:`HeadTargets` of shape ``[B, T − 1]``.
    """
    tokens, mask = jnp.asarray(tokens), jnp.asarray(completion_mask)
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(f"tokens and completion_mask must both be [B, T]; got {tokens.shape}"
                         f" and {mask.shape}")
    rows, length = tokens.shape
    groups = (jnp.arange(rows, dtype=jnp.int32) if row_groups is None
              else jnp.asarray(row_groups, jnp.int32))
    source = jnp.broadcast_to(jnp.arange(length - 1, dtype=jnp.int32), (rows, length - 1))
    group = jnp.where(mask[:, 1:] > 0, groups[:, None], -1)
    return HeadTargets(source, tokens[:, 1:].astype(jnp.int32), group.astype(jnp.int32))


def logprobs_at(
    hidden: ArrayLike,
    head: HeadWeight,
    source: ArrayLike,
    token: ArrayLike,
    valid: ArrayLike,
    *,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    with_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``log p(token[r, k] | hidden[r, source[r, k]])`` ``[R, K]`` (0 where not ``valid``).

    Only the gathered positions reach the head, each row's valid ones first, so chunks
    holding only invalid slots are skipped (:func:`token_logprobs_from_hidden`); rows stay a
    separate axis throughout (a batch sharded over rows stays sharded).

    Args:
      hidden: ``[R, T, D]`` final hidden states.
      head: the :class:`HeadWeight` (e.g. ``model.apply(..., method="head")``).
      source: ``[R, K]`` int slots of ``hidden`` to read.
      token: ``[R, K]`` int predicted ids.
      valid: ``[R, K]`` bool (or > 0) slots that count.
      logit_scale: multiplies the (soft-capped) logits, e.g. ``1 / temperature``.
      with_entropy: also return each position's entropy ``[R, K]``.
    """
    hidden, source, token = jnp.asarray(hidden), jnp.asarray(source), jnp.asarray(token)
    valid = jnp.asarray(valid) > 0
    if hidden.ndim != 3 or source.ndim != 2 or source.shape[0] != hidden.shape[0] or (
            token.shape != source.shape or valid.shape != source.shape):
        raise ValueError(f"hidden must be [R, T, D] and source/token/valid [R, K]; got hidden "
                         f"{hidden.shape}, source {source.shape}, token {token.shape}, valid "
                         f"{valid.shape}")
    order = jnp.argsort(~valid, axis=1, stable=True)  # each row's valid slots first
    sort = lambda x: jnp.take_along_axis(x, order, axis=1)  # noqa: E731
    picked = jnp.take_along_axis(hidden, sort(source)[:, :, None], axis=1)  # [R, K, D]
    picked = picked.astype(head.weight.dtype)  # the head's compute dtype, as the dense head
    outputs = token_logprobs_from_hidden(
        picked, head.weight, sort(token), sort(valid), chunk_size=chunk_size,
        with_entropy=with_entropy, soft_cap=head.soft_cap, logit_scale=logit_scale,
        weight_layout=head.layout)
    inverse = jnp.argsort(order, axis=1)
    unsort = lambda x: jnp.take_along_axis(x, inverse, axis=1)  # noqa: E731
    return tuple(map(unsort, outputs)) if with_entropy else unsort(outputs)


def group_sums(values: ArrayLike, group: ArrayLike, num_groups: int) -> jax.Array:
    """``out[g] = Σ values[group == g]`` ``[num_groups]`` float32; ``group = -1`` is ignored.

    ``num_groups`` is static (a batch's pair or sequence capacity), so shapes never depend on
    the data.
    """
    values, group = jnp.asarray(values, jnp.float32), jnp.asarray(group, jnp.int32)
    if values.shape != group.shape:
        raise ValueError(f"values {values.shape} and group {group.shape} must have one shape")
    ids = jnp.where((group >= 0) & (group < num_groups), group, num_groups).reshape(-1)
    return jax.ops.segment_sum(values.reshape(-1), ids, num_segments=num_groups + 1)[:num_groups]
