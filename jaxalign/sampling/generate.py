"""The compiled generation loop: prefill, KV cache, ``lax.while_loop`` decoding until every row
stops (see :mod:`jaxalign.sampling`)."""

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
from jaxalign.sampling.tokens import _sample

__all__ = ["GenerateOutput", "generate", "is_stop_token", "make_generate", "stop_ids"]


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
