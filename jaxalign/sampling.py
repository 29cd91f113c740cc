"""Autoregressive sampling from a causal LM, compiled end to end.

One ``jit``: a prefill over the (left-padded) prompts fills a :class:`~jaxalign.models.KVCache`,
which then grows once to ``P + N − 1`` slots, and a ``lax.while_loop`` decodes one
token per step and stops as soon as every row has produced EOS (or after ``max_new_tokens``).
Both run the model's ``decode`` method (``CausalLM`` and ``CausalLMWithValueHead`` have one),
which projects only the last position onto the vocabulary. Shapes are static, so a second call
with the same shapes reuses the compiled program.

Log-probabilities returned (both float32, 0 where ``completion_mask`` is 0):

* ``logps``: ``log q(y_t)`` under the distribution the token was actually drawn from, i.e.
  after temperature, top-k and top-p. Greedy decoding (``temperature=0``) draws from a point
  mass, so its ``logps`` are 0.
* ``policy_logps``: ``log π(y_t | y_<t)`` of the unmodified policy (temperature 1, no
  filtering) — what PPO needs as ``π_old``. Equal to ``logps`` at temperature 1 without
  filtering.

Sampling draws one uniform number per row and inverts the CDF (a two-level cumulative sum done
with small matmuls); on CPU this is far cheaper than Gumbel-max, which needs ``V`` random
numbers per row per step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxalign.models.transformer import init_cache, unstack_layer_params

__all__ = ["GenerateOutput", "generate", "is_stop_token", "make_generate", "sample_token",
           "stop_ids"]

_CDF_BLOCK = 64


class GenerateOutput(NamedTuple):
    """Result of :func:`generate`.

    Attributes:
      tokens: ``[B, N]`` int32 sampled ids; ``pad_id`` after each row's first stop token.
      logps: ``[B, N]`` float32 log-prob under the sampling distribution (after temperature,
        top-k, top-p; 0 for greedy); 0 where ``completion_mask`` is 0.
      policy_logps: ``[B, N]`` float32 log-prob under the raw policy (temperature 1, no
        filtering); 0 where ``completion_mask`` is 0.
      completion_mask: ``[B, N]`` int32, 1 up to and including the first EOS, 0 after.
    """

    tokens: jax.Array
    logps: jax.Array
    policy_logps: jax.Array
    completion_mask: jax.Array


def _row_max(x: jax.Array) -> jax.Array:
    return jnp.max(x, axis=-1, keepdims=True)


def _argmax(logits: jax.Array) -> jax.Array:
    """First index of the row maximum, ``[B, V] -> [B]`` (vectorises better than ``argmax``)."""
    slots = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    is_max = logits == _row_max(logits)
    return jnp.min(jnp.where(is_max, slots[None, :], logits.shape[-1]), axis=-1)


def _inverse_cdf_sample(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """Index ``i`` with probability ``w_i / Σw`` per row, from one uniform number per row.

    Two levels, so no length-``K`` cumulative sum is needed: block totals (blocks of ``C``
    entries) pick the block whose CDF range holds ``u · Σw``; a ``C``-long cumulative sum
    (a matmul with a triangular matrix of ones) picks the entry inside it. Entries of weight 0
    are never chosen.

    Args:
      weights: ``[B, K]`` nonnegative float32, at least one positive per row.
      uniform: ``[B]`` in ``[0, 1)``.

    Returns:
      ``(indices [B] int32, totals [B])``: the draws and each row's ``Σw``.
    """
    batch, size = weights.shape
    block = min(_CDF_BLOCK, size)
    n_blocks = -(-size // block)
    weights = jnp.pad(weights, ((0, 0), (0, n_blocks * block - size)))
    blocks = weights.reshape(batch, n_blocks, block)
    totals = jnp.einsum("bnc,c->bn", blocks, jnp.ones((block,), jnp.float32))
    strict = jnp.arange(n_blocks)[:, None] < jnp.arange(n_blocks)[None, :]
    offsets = totals @ strict.astype(jnp.float32)  # exclusive cumsum over blocks
    row_total = offsets[:, -1] + totals[:, -1]
    target = uniform * row_total
    block_ids = jnp.arange(n_blocks, dtype=jnp.int32)
    block_ok = ((offsets + totals) > target[:, None]) & (totals > 0)
    last_block = jnp.max(jnp.where(totals > 0, block_ids[None, :], 0), axis=-1)
    chosen_block = jnp.min(jnp.where(block_ok, block_ids[None, :], n_blocks), axis=-1)
    chosen_block = jnp.where(chosen_block == n_blocks, last_block, chosen_block)
    block_w = jnp.take_along_axis(blocks, chosen_block[:, None, None], axis=1)[:, 0]
    lower = jnp.arange(block)[:, None] <= jnp.arange(block)[None, :]
    block_cdf = block_w @ lower.astype(jnp.float32) + jnp.take_along_axis(
        offsets, chosen_block[:, None], axis=1
    )
    slots = jnp.arange(block, dtype=jnp.int32)
    ok = (block_cdf > target[:, None]) & (block_w > 0)
    last = jnp.max(jnp.where(block_w > 0, slots[None, :], 0), axis=-1)
    chosen = jnp.min(jnp.where(ok, slots[None, :], block), axis=-1)
    chosen = jnp.where(chosen == block, last, chosen)
    return chosen_block * block + chosen, row_total


def sample_token(
    logits: ArrayLike,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw one token per row from ``softmax(filter(logits / temperature))``.

    Filtering: ``top_k > 0`` keeps the ``k`` largest logits (and any tied with the k-th, as
    Hugging Face does); then ``top_p < 1`` keeps the smallest set of the remaining tokens, most
    likely first, whose mass reaches ``top_p`` (nucleus sampling, Holtzman et al. 2019,
    arXiv:1904.09751; tokens tied at the boundary are all kept). Both find a per-row
    threshold by bisection instead of sorting the vocabulary. ``temperature == 0`` is greedy
    (the first maximal logit).

    Args:
      logits: ``[B, V]`` float32 next-token logits.
      key: PRNG key.
      temperature, top_k, top_p: Python numbers (static).

    Returns:
      ``(tokens [B] int32, logps [B], policy_logps [B])``: the sampling distribution's
      log-prob of each token (0 for greedy) and the raw softmax's log-prob.
    """
    logits = jnp.asarray(logits)
    uniform = jax.random.uniform(key, (logits.shape[0],), jnp.float32)
    return _sample(logits, uniform, temperature=temperature, top_k=top_k, top_p=top_p)


def _sample(logits, uniform, *, temperature, top_k, top_p):
    """:func:`sample_token` given the row's uniform number ``[B]`` instead of a key."""
    logits = logits.astype(jnp.float32)
    top = _row_max(logits)

    def pick(values, tokens):
        return jnp.take_along_axis(values, tokens[:, None], axis=-1)[:, 0]

    def policy_logp(tokens):
        return pick(logits, tokens) - top[:, 0] - jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))

    if temperature == 0:
        tokens = _argmax(logits)
        return tokens, jnp.zeros(tokens.shape, jnp.float32), policy_logp(tokens)

    if top_k == 0 and top_p >= 1.0:
        # Unfiltered: weights exp((logits − max) / T); their sum comes out of the sampler.
        scaled = logits if temperature == 1.0 else logits / temperature
        scaled_top = top if temperature == 1.0 else top / temperature
        tokens, total = _inverse_cdf_sample(jnp.exp(scaled - scaled_top), uniform)
        logq = pick(scaled, tokens) - scaled_top[:, 0] - jnp.log(total)
        policy = logq if temperature == 1.0 else policy_logp(tokens)
        return tokens, logq, policy

    # Filtering keeps every token at or above a per-row threshold found by bisection: no sort
    # of the vocabulary (lax.top_k/sort made a step ~6x slower on CPU).
    scaled = logits / temperature
    keys = _order_keys(scaled)
    keep = jnp.ones(scaled.shape, bool)
    if top_k > 0:
        keep = keys >= _largest_threshold(keys, jnp.ones_like(scaled), float(top_k))
    weights = jnp.where(keep, jnp.exp(scaled - _row_max(scaled)), 0.0)
    if top_p < 1.0:
        target = top_p * jnp.sum(weights, axis=-1)
        keep = keep & (keys >= _largest_threshold(keys, weights, target))
        weights = jnp.where(keep, weights, 0.0)
    tokens, total = _inverse_cdf_sample(weights, uniform)
    logq = pick(scaled, tokens) - _row_max(scaled)[:, 0] - jnp.log(total)
    return tokens, logq, policy_logp(tokens)


def _order_keys(x: jax.Array) -> jax.Array:
    """``uint32`` keys with the order of the float32 values ``x`` (finite or ±inf; −0 = +0)."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys: jax.Array, weights: jax.Array, target: Any) -> jax.Array:
    """Per row, the largest key ``t`` with ``Σ weights[keys ≥ t] ≥ target`` (``[B, 1]``).

    Bisection over the 32-bit key range (32 masked row sums). With unit weights and
    ``target = k`` it is the k-th largest key, so ``keys ≥ t`` keeps the top k and any ties
    with the k-th (as Hugging Face's top-k does); with probability weights and ``target =
    p · Σw`` it keeps the smallest set of most likely tokens holding mass ``p`` (nucleus).
    The row minimum always qualifies (all the mass), one past the row maximum never does.
    """
    target = jnp.broadcast_to(jnp.asarray(target, jnp.float32), keys.shape[:1])[:, None]
    low = jnp.min(keys, axis=-1, keepdims=True)
    high = jnp.max(keys, axis=-1, keepdims=True)  # max + 1 is "never"; kept implicit

    def halve(_, bounds):
        low, high = bounds
        mid = low + (high - low + 1) // 2  # in (low, high]; low stays a qualifying key
        ok = jnp.sum(jnp.where(keys >= mid, weights, 0.0), axis=-1, keepdims=True) >= target
        return jnp.where(ok, mid, low), jnp.where(ok, high, mid - 1)

    low, _ = jax.lax.fori_loop(0, 32, halve, (low, high))
    return low


def _check_settings(model, max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got temperature={temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0; got top_k={top_k!r}")
    if top_k > model.config.vocab_size:
        raise ValueError(
            f"top_k={top_k} exceeds the vocabulary size {model.config.vocab_size}"
        )
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got top_p={top_p}")


def _check_prompts(model, prompt_ids, prompt_mask, max_new_tokens) -> None:
    if len(prompt_ids.shape) != 2:
        raise ValueError(f"prompt_ids must be [B, P]; got shape {tuple(prompt_ids.shape)}")
    if tuple(prompt_mask.shape) != tuple(prompt_ids.shape):
        raise ValueError(
            f"prompt_mask has shape {tuple(prompt_mask.shape)} but prompt_ids has shape "
            f"{tuple(prompt_ids.shape)}"
        )
    total = prompt_ids.shape[1] + max_new_tokens
    if total > model.config.max_len:
        raise ValueError(
            f"prompt length {prompt_ids.shape[1]} (prompt_ids shape {tuple(prompt_ids.shape)}) "
            f"+ max_new_tokens={max_new_tokens} = {total} exceeds the model's "
            f"max_len={model.config.max_len}"
        )


def _cast_matmul_weights(params: Any, dtype: Any) -> Any:
    """Matmul weights (every leaf of rank ≥ 2 but the embedding table) cast to ``dtype``.

    The model casts exactly these to its compute dtype before each matmul, so casting them once
    before the decode loop changes no number. The embedding table (gathered, then used in
    float32), norm scales and scalar heads (float32 math) stay as they are, so the sampler's
    forward pass rounds exactly what the training forward pass rounds.
    """
    def cast(path, leaf):
        name = getattr(path[-1], "key", None)
        return leaf if leaf.ndim < 2 or name == "embedding" else leaf.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def stop_ids(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """The stop-token ids of an ``eos_id`` setting: ``None`` -> ``()``, an id -> ``(id,)``, a
    list (a checkpoint's ``generation_config.json`` ``eos_token_id``) -> its distinct ids."""
    if eos_id is None:
        return ()
    ids = (eos_id,) if isinstance(eos_id, (int, np.integer)) else tuple(eos_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def is_stop_token(tokens: ArrayLike, eos_id: int | Sequence[int] | None) -> jax.Array:
    """``tokens [...]`` -> bool ``[...]``: whether each token is one of the stop ids."""
    tokens = jnp.asarray(tokens)
    ids = stop_ids(eos_id)
    if not ids:
        return jnp.zeros(tokens.shape, bool)
    if len(ids) == 1:
        return tokens == ids[0]
    table = jnp.asarray(ids, tokens.dtype).reshape((1,) * tokens.ndim + (len(ids),))
    return jnp.any(tokens[..., None] == table, axis=-1)


def _forward(model: nn.Module, params, tokens, mask, cache):
    """``(last-position logits [B, V], cache)`` via the model's ``decode`` method."""
    return model.apply({"params": params}, tokens, mask, cache, method="decode")


def make_generate(
    model: nn.Module,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
):
    """Compile-once sampler: ``fn(params, prompt_ids, prompt_mask, key) -> GenerateOutput``.

    The returned function is ``jax.jit``-ed; calls with the same shapes never retrace. The
    factory is memoised on the settings, normalised (defaults filled in, ``1`` = ``1.0``), so
    every caller that asks for the same sampler — :func:`generate` included — gets the same
    function and shares its compilations. See :func:`generate` for the arguments.
    """
    _check_settings(model, max_new_tokens, temperature, top_k, top_p)
    return _make_generate(model, max_new_tokens, float(temperature), top_k, float(top_p),
                          stop_ids(eos_id) or None, pad_id)


@functools.lru_cache(maxsize=64)
def _make_generate(model, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id):
    """:func:`make_generate` for normalised, positional settings (the memoised part)."""
    sample = functools.partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    num_new = max_new_tokens

    config = model.config
    # Decoding runs the blocks unrolled: a scanned model would slice every stacked weight
    # (a copy) in every step. Matmul weights are cast to the compute dtype once, before the
    # loop (see _cast_matmul_weights).
    decode_model = model.clone(config=dataclasses.replace(config, scan_layers=False, remat=False))

    def run(params, prompt_ids, prompt_mask, key) -> GenerateOutput:
        _check_prompts(model, prompt_ids, prompt_mask, num_new)
        params = unstack_layer_params(params, config.n_layers) if config.scan_layers else params
        params = _cast_matmul_weights(params, config.dtype)
        prompt_ids = prompt_ids.astype(jnp.int32)
        prompt_mask = prompt_mask.astype(jnp.int32)
        batch, prompt_len = prompt_ids.shape
        # The prefill attends over P slots only; then the cache grows to P + N - 1 slots (the
        # last sampled token is never fed back).
        cache = init_cache(model.config, batch, prompt_len)
        logits, cache = _forward(decode_model, params, prompt_ids, prompt_mask, cache)
        grow = functools.partial(jnp.pad, pad_width=((0, 0), (0, 0), (0, num_new - 1), (0, 0)))
        cache = cache._replace(
            keys=tuple(map(grow, cache.keys)),
            values=tuple(map(grow, cache.values)),
            mask=jnp.pad(cache.mask, ((0, 0), (0, num_new - 1))),
        )
        # One uniform number per row and step, drawn up front: no PRNG work inside the loop.
        uniforms = jax.random.uniform(key, (num_new, batch), jnp.float32)
        token, logq, logp = sample(logits, uniforms[0])
        done = is_stop_token(token, eos_id)
        tokens = jnp.full((batch, num_new), pad_id, jnp.int32).at[:, 0].set(token)
        logqs = jnp.zeros((batch, num_new), jnp.float32).at[:, 0].set(logq)
        logps = jnp.zeros((batch, num_new), jnp.float32).at[:, 0].set(logp)

        def cond(state):
            step, _, _, done, *_ = state
            return (step < num_new) & ~jnp.all(done)

        def body(state):
            step, cache, token, done, tokens, logqs, logps = state
            ones = jnp.ones((batch, 1), jnp.int32)
            logits, cache = _forward(decode_model, params, token[:, None], ones, cache)
            uniform = jax.lax.dynamic_index_in_dim(uniforms, step, keepdims=False)
            token, logq, logp = sample(logits, uniform)
            token = jnp.where(done, pad_id, token)
            column = (0, step)
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], column)
            logqs = jax.lax.dynamic_update_slice(logqs, jnp.where(done, 0.0, logq)[:, None], column)
            logps = jax.lax.dynamic_update_slice(logps, jnp.where(done, 0.0, logp)[:, None], column)
            if eos_id is not None:
                done = done | is_stop_token(token, eos_id)
            return step + 1, cache, token, done, tokens, logqs, logps

        state = (jnp.ones((), jnp.int32), cache, token, done, tokens, logqs, logps)
        _, _, _, _, tokens, logqs, logps = jax.lax.while_loop(cond, body, state)
        if eos_id is None:
            completion_mask = jnp.ones((batch, num_new), jnp.int32)
        else:
            is_eos = is_stop_token(tokens, eos_id).astype(jnp.int32)
            completion_mask = (jnp.cumsum(is_eos, axis=-1) - is_eos == 0).astype(jnp.int32)
        return GenerateOutput(tokens, logqs, logps, completion_mask)

    return jax.jit(run)


def generate(
    model: nn.Module,
    params: Any,
    prompt_ids: ArrayLike,
    prompt_mask: ArrayLike,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
) -> GenerateOutput:
    """Sample ``max_new_tokens`` continuations of left-padded prompts.

    Args:
      model: a :class:`~jaxalign.models.CausalLM` or ``CausalLMWithValueHead`` (anything with
        a ``decode(tokens, mask, cache) -> (logits [B, V], cache)`` method). A model with
        ``scan_layers`` decodes unrolled (its stacked weights are sliced once per call).
      params: its unboxed parameters, float32 or the compute dtype (the matmul weights are cast
        to the compute dtype once per call, outside the decode loop; the embedding table and
        norm scales stay as they are, as in the model's own forward pass).
      prompt_ids: ``[B, P]`` int token ids, left-padded (every row needs ≥ 1 real token).
      prompt_mask: ``[B, P]``, 0 on the left padding, 1 on prompt tokens.
      key: PRNG key; the same key gives the same samples.
      max_new_tokens: ``N``; ``P + N`` must not exceed ``model.config.max_len``.
      temperature: divides the logits; 0 means greedy.
      top_k: keep the ``k`` most likely tokens and any tied with the k-th (0 = off).
      top_p: nucleus mass in ``(0, 1]`` (1 = off); applied after ``top_k``, to the renormalised
        top-k distribution.
      eos_id: end-of-sequence id, or several (a chat model's end-of-turn and end-of-text
        tokens, as in ``generation_config.json``); a row stops after producing any of them
        (``None``: never stops).
      pad_id: written after EOS.

    Returns:
      :class:`GenerateOutput` with ``tokens``, ``logps``, ``policy_logps`` and
      ``completion_mask``, each ``[B, N]``. The full sequences are
      ``concat([prompt_ids, tokens], 1)`` with mask ``concat([prompt_mask, completion_mask], 1)``;
      positions come from the mask, so the model scores them exactly as they were sampled.

    Raises:
      ValueError: on a bad argument, naming it and the shapes involved.
    """
    prompt_ids = jnp.asarray(prompt_ids)
    prompt_mask = jnp.asarray(prompt_mask)
    fn = make_generate(model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_id=eos_id, pad_id=pad_id)
    _check_prompts(model, prompt_ids, prompt_mask, max_new_tokens)
    return fn(params, prompt_ids, prompt_mask, key)
