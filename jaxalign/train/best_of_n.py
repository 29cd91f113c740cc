"""Best-of-N sampling and rejection-sampling fine-tuning (self-improvement with a filter).

:func:`best_of_n` samples ``n`` completions per prompt with the compiled sampler, scores them
with a reward model or a pure reward function, and keeps the best — an inference-time
alignment baseline whose KL to the sampling policy is known in closed form
(:func:`best_of_n_kl`), and a data generator for :func:`rejection_sampling_finetune`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxalign.sampling import make_generate
from jaxalign.train.sft import make_sft_step
from jaxalign.train.state import create_train_state


class BestOfN(NamedTuple):
    """Result of :func:`best_of_n` for ``B`` prompts, ``n`` samples each, ``N`` new tokens.

    Attributes:
      tokens: ``[B, N]`` the best completion per prompt.
      completion_mask: ``[B, N]`` its mask.
      scores: ``[B, n]`` the score of every sample.
      best_index: ``[B]`` argmax of ``scores`` per prompt (first on ties).
      all_tokens: ``[B, n, N]`` every sample.
      all_masks: ``[B, n, N]`` their masks.
    """

    tokens: jax.Array
    completion_mask: jax.Array
    scores: jax.Array
    best_index: jax.Array
    all_tokens: jax.Array
    all_masks: jax.Array


def best_of_n_kl(n: int) -> float:
    """``KL(π_best-of-n ‖ π) = log n − (n − 1)/n`` (Stiennon et al. 2020; Beirami et al. 2024,
    arXiv:2401.01879, an upper bound that is tight for continuous rewards)."""
    return math.log(n) - (n - 1) / n


@functools.lru_cache(maxsize=16)
def _make_best_of_n(generate, n):
    @jax.jit
    def run(params, scorer, prompt_ids, prompt_mask, key):
        batch = prompt_ids.shape[0]
        ids = jnp.repeat(prompt_ids, n, axis=0)
        mask = jnp.repeat(prompt_mask, n, axis=0)
        out = generate(params, ids, mask, key)
        scores = jnp.asarray(scorer(ids, mask, out.tokens, out.completion_mask), jnp.float32)
        scores = scores.reshape(batch, n)
        best = jnp.argmax(scores, axis=1)
        all_tokens = out.tokens.reshape(batch, n, -1)
        all_masks = out.completion_mask.reshape(batch, n, -1)
        pick = lambda x: jnp.take_along_axis(x, best[:, None, None], axis=1)[:, 0]  # noqa: E731
        return BestOfN(pick(all_tokens), pick(all_masks), scores, best, all_tokens, all_masks)

    return run


def best_of_n(
    policy: Any,
    params: Any,
    scorer: Callable,
    prompts: dict,
    n: int,
    key: jax.Array,
    **sampling: Any,
) -> BestOfN:
    """Samples ``n`` completions per prompt and keeps the highest-scoring one (one jit).

    Args:
      policy: a ``CausalLM``; ``params`` its parameters.
      scorer: ``scorer(prompt_ids, prompt_mask, completion_ids, completion_mask) -> [B·n]``;
        build one with :func:`jaxalign.train.scorers.reward_model_scorer` or
        :func:`~jaxalign.train.scorers.completion_scorer`. A
        :class:`jax.tree_util.Partial` (what ``reward_model_scorer`` returns) is passed
        into the compiled function as an argument, its arrays as inputs; any other callable
        keys the compilation by identity (keep one object per reward), and arrays it closes
        over are compiled in as constants.
      prompts: ``{"prompt_ids", "prompt_mask"}`` ``[B, P]``, left-padded.
      n: samples per prompt.
      key: PRNG key.
      **sampling: keyword arguments of :func:`jaxalign.generate` (``max_new_tokens``, required;
        ``temperature``, ``top_k``, ``top_p``, ``eos_id``, ``pad_id``).

    Returns:
      :class:`BestOfN`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    run = _make_best_of_n(make_generate(policy, **sampling), n)
    if not isinstance(scorer, jax.tree_util.Partial):
        scorer = jax.tree_util.Partial(scorer)
    return run(params, scorer, jnp.asarray(prompts["prompt_ids"], jnp.int32),
               jnp.asarray(prompts["prompt_mask"], jnp.int32), key)


def _sft_batch_from_best(prompt_ids, prompt_mask, best: BestOfN) -> dict:
    """Prompt + best completion as an SFT batch (completion tokens are the targets)."""
    ids = np.concatenate([np.asarray(prompt_ids), np.asarray(best.tokens)], axis=1)
    completion = np.asarray(best.completion_mask)
    attention = np.concatenate([np.asarray(prompt_mask), completion], axis=1)
    completion_mask = np.concatenate([np.zeros_like(prompt_mask), completion], axis=1)
    return {"input_ids": ids.astype(np.int32), "attention_mask": attention.astype(np.int32),
            "completion_mask": completion_mask.astype(np.int32)}


def rejection_sampling_finetune(
    policy: Any,
    params: Any,
    scorer: Callable,
    prompts: dict,
    key: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    n: int = 8,
    rounds: int = 3,
    steps_per_round: int = 10,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    callback: Callable[[int, dict], None] | None = None,
) -> tuple[Any, list[dict]]:
    """Alternates best-of-n sampling and SFT on the selected completions (RAFT / ReST-style).

    Each round samples ``n`` completions for every prompt, keeps the best, and takes
    ``steps_per_round`` SFT steps on (prompt, best completion). The log records, per round, the
    mean score of all samples (the policy's own reward) and of the selected ones.

    References:
      Dong et al., "RAFT: Reward rAnked FineTuning", arXiv:2304.06767; Gulcehre et al.,
      "Reinforced Self-Training (ReST)", arXiv:2308.08998.

    Returns:
      ``(params, log)`` where ``log`` is a list of per-round dicts.
    """
    sft_step = make_sft_step(policy, optimizer)
    state = create_train_state(jax.tree.map(jnp.copy, params), optimizer, key)
    log = []
    for round_index in range(rounds):
        key, sample_key = jax.random.split(key)
        best = best_of_n(policy, state.params, scorer, prompts, n, sample_key,
                         max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                         pad_id=pad_id)
        batch = _sft_batch_from_best(prompts["prompt_ids"], prompts["prompt_mask"], best)
        losses = []
        for _ in range(steps_per_round):
            state, metrics = sft_step(state, batch)
            losses.append(metrics["loss"])
        scores = np.asarray(best.scores)
        entry = {"round": round_index, "mean_score": float(scores.mean()),
                 "best_score": float(scores.max(axis=1).mean()),
                 "sft_loss": float(jax.device_get(losses[-1])) if losses else float("nan")}
        log.append(entry)
        if callback is not None:
            callback(round_index, entry)
    return state.params, log
