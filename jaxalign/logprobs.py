"""Per-token and per-sequence log-probabilities from causal-LM logits.

Shift convention (the one place it is handled): a causal LM fed ``tokens [B, T]`` returns
``logits [B, T, V]`` where ``logits[:, t]`` predicts ``tokens[:, t + 1]``. :func:`token_logprobs`
returns an array aligned with ``tokens``: entry ``t`` is ``log p(tokens[t] | tokens[:t])``, taken
from ``logits[:, t - 1]``; entry 0 has no prediction and is 0. Because the result is aligned with
the tokens, the same ``completion_mask`` that marks completion tokens selects their log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

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
