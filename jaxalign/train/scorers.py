"""Scorers: ``scorer(prompt_ids [B, P], prompt_mask [B, P], completion_ids [B, N],
completion_mask [B, N]) -> scores [B]``, the one protocol best-of-N and the RLHF step score with.

A scorer that is a :class:`jax.tree_util.Partial` carries its arrays (a reward model's params)
as pytree leaves, so it crosses ``jax.jit`` as an argument instead of being compiled in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["completion_scorer", "reward_model_scorer"]


@dataclasses.dataclass(frozen=True)
class _RewardModelScore:
    """``(params, prompt_ids, prompt_mask, completion, completion_mask) -> [B]``: the reward
    model's score of ``concat(prompt, completion)`` at its last token. Equal models compare
    equal, so one compilation serves every parameter value."""

    model: Any

    def __call__(self, params, prompt_ids, prompt_mask, completion, completion_mask):
        ids = jnp.concatenate([prompt_ids, completion], axis=1)
        mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
        return self.model.apply({"params": params}, ids, mask)


def reward_model_scorer(model: Any, params: Any) -> jax.tree_util.Partial:
    """A scorer from a ``RewardModel``: scores ``concat(prompt, completion)`` at its last token.

    The scorer is a :class:`jax.tree_util.Partial` whose leaves are ``params``: it crosses
    ``jax.jit`` as an argument, so the weights are neither baked into the compiled program as
    constants nor a reason to recompile when they change.
    """
    return jax.tree_util.Partial(_RewardModelScore(model), params)


def completion_scorer(reward_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable:
    """A scorer from a pure ``reward_fn(completion_ids, completion_mask) -> [B]``."""
    def score(prompt_ids, prompt_mask, completion, completion_mask):
        del prompt_ids, prompt_mask
        return reward_fn(completion, completion_mask)
    return score
