"""Reward-model step: Bradley–Terry on pairs or on rankings of K responses."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign.losses import bradley_terry_loss, ranking_pair_weights
from jaxalign.train.completion import dropout_rngs
from jaxalign.train.state import TrainState, make_loss_step, train_dropout_key


def _pair_rewards(model, params, batch, rngs):
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], 0)
    rewards = model.apply({"params": params}, ids, mask, rngs=rngs).astype(jnp.float32)
    return jnp.split(rewards, 2)


def reward_loss(
    model: Any, params: Any, batch: dict[str, jax.Array], *, center_coef: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley–Terry reward-model loss for a pair batch or a ranking batch.

    Pairs (keys ``chosen_ids``, ``chosen_attention_mask``, ``rejected_*``, optional ``margin``
    and ``p_chosen`` ``[B]``): ``mean_b BT(r_c, r_r; margin, p_chosen)``. Rankings (keys
    ``ids``, ``attention_mask`` ``[B, K, L]``, ``ranks`` ``[B, K]``): every strictly ordered pair
    weighted by :func:`ranking_pair_weights`, averaged over rankings. Optional reward centring
    adds ``center_coef · mean((r_c + r_r)²)`` (Eisenstein et al. 2023), which pins the otherwise
    free offset of the rewards near 0. ``dropout_key``: the forward pass's ``"dropout"`` rng
    (LoRA dropout); none: deterministic.

    Returns:
      ``(loss, metrics)`` with ``accuracy``, ``rewards/chosen``, ``rewards/rejected``,
      ``rewards/margins``.
    """
    rngs = dropout_rngs(dropout_key)
    if "ranks" in batch:
        ids, mask = batch["ids"], batch["attention_mask"]
        b, k, length = ids.shape
        rewards = model.apply({"params": params}, ids.reshape(b * k, length),
                              mask.reshape(b * k, length), rngs=rngs)
        rewards = rewards.astype(jnp.float32).reshape(b, k)
        weights = ranking_pair_weights(batch["ranks"])
        r_i, r_j = rewards[:, :, None], rewards[:, None, :]
        r_i, r_j = jnp.broadcast_to(r_i, weights.shape), jnp.broadcast_to(r_j, weights.shape)
        per_pair = bradley_terry_loss(r_i, r_j)
        loss = jnp.sum(weights * per_pair) / b
        centre = jnp.sum(weights * (r_i + r_j) ** 2) / b
        accuracy = jnp.sum(weights * (r_i > r_j)) / jnp.maximum(jnp.sum(weights), 1e-9)
        chosen = jnp.sum(weights * r_i) / jnp.maximum(jnp.sum(weights), 1e-9)
        rejected = jnp.sum(weights * r_j) / jnp.maximum(jnp.sum(weights), 1e-9)
    else:
        chosen_r, rejected_r = _pair_rewards(model, params, batch, rngs)
        margin = batch.get("margin", jnp.zeros_like(chosen_r))
        p_chosen = batch.get("p_chosen", jnp.ones_like(chosen_r))
        loss = jnp.mean(bradley_terry_loss(chosen_r, rejected_r, margin=margin, p_chosen=p_chosen))
        centre = jnp.mean((chosen_r + rejected_r) ** 2)
        accuracy = jnp.mean((chosen_r > rejected_r).astype(jnp.float32))
        chosen, rejected = jnp.mean(chosen_r), jnp.mean(rejected_r)
    total = loss + center_coef * centre
    return total, {
        "bt_loss": loss,
        "accuracy": accuracy,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
    }


def make_reward_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    *,
    center_coef: float = 0.0,
    axis_name: str | None = None,
    jit: bool = True,
    mesh: Any = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)`` training a reward model (pairs or rankings)."""

    def loss_fn(params, state, batch):
        return reward_loss(model, params, batch, center_coef=center_coef,
                           dropout_key=train_dropout_key(state))

    return make_loss_step(loss_fn, optimizer, axis_name=axis_name, jit=jit, mesh=mesh,
                          model=model)
