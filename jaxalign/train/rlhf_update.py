"""Stage 4 of the RLHF step: the policy (and value) update over one rollout batch.

:func:`ppo_epochs` runs ``ppo_epochs`` × ``num_minibatches`` optimiser updates as nested
``lax.scan`` s over shuffled minibatches; the loss of each is :func:`policy_loss_fn`'s: PPO's
clipped surrogate with a per-token or per-sequence (GSPO) ratio, asymmetric and dual clipping,
aggregated by token mean, sequence mean or Dr. GRPO's constant normaliser, plus the value loss,
the entropy bonus and, with ``kl_in="loss"``, ``β·KL(π‖π_ref)`` per token (the GRPO paper's
placement, k3 by default).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.losses import aggregate_loss, clip_fractions, kl_penalty, ppo_loss, sequence_log_ratio
from jaxalign.train.rlhf_config import RLHFConfig
from jaxalign.train.state import DROPOUT_STREAM

__all__ = ["policy_loss_fn", "ppo_epochs"]


def policy_loss_fn(forwards: Any, config: RLHFConfig, separate_value: bool,
                 prompt_len: int) -> Callable:
    """``loss_fn(policy_params, value_params, minibatch, kl_coef, dropout_key=None) -> (loss,
    metrics)`` (``dropout_key``: the update's LoRA dropout rng; none: deterministic): the
    clipped surrogate (token or sequence ratio, aggregated as ``config.loss_agg``), value loss,
    entropy bonus and, with ``kl_in="loss"``, ``β·KL(π‖π_ref)`` per token."""
    clip = {"clip_eps": config.clip_eps, "clip_eps_low": config.clip_eps_low,
            "clip_eps_high": config.clip_eps_high}
    kl_in_loss = config.kl_in == "loss" and config.uses_reference

    def loss_fn(policy_params, value_params, mb, kl_coef, dropout_key=None):
        value_key = None if dropout_key is None else jax.random.fold_in(dropout_key, 1)
        logps, entropies, values = forwards.policy(policy_params, mb["ids"], mb["attn"],
                                                   prompt_len, mb["completion"], mb["mask"],
                                                   dropout_key=dropout_key)
        if separate_value:
            values = forwards.value(value_params, mb["ids"], mb["attn"], prompt_len,
                                    dropout_key=value_key)
        elif values is None:
            values = jnp.zeros_like(mb["old_values"])
        ratio_logps = logps
        if config.importance_sampling_level == "sequence":
            ratio_logps = mb["old_logps"] + sequence_log_ratio(logps, mb["old_logps"], mb["mask"])
        if not config.ent_coef:  # a metric only: no backward pass through a softmax over V
            entropies = jax.lax.stop_gradient(entropies)
        loss, metrics = ppo_loss(
            ratio_logps, mb["old_logps"], mb["advantages"], values, mb["old_values"],
            mb["returns"], mb["mask"], entropies=entropies, value_clip=config.value_clip,
            vf_coef=config.vf_coef if config.uses_critic else 0.0, ent_coef=config.ent_coef,
            dual_clip=config.dual_clip, loss_agg=config.loss_agg, **clip)
        fractions = clip_fractions(ratio_logps, mb["old_logps"], mb["advantages"], mb["mask"],
                                   **clip)
        metrics["clipfrac_low"], metrics["clipfrac_high"] = fractions["low"], fractions["high"]
        if kl_in_loss:
            kl = kl_penalty(logps, mb["ref_logps"], estimator=config.kl_estimator_used)
            metrics["kl_loss"] = aggregate_loss(kl, mb["mask"], config.loss_agg)
            loss = loss + kl_coef * metrics["kl_loss"]
            metrics["loss"] = loss
        return loss, metrics

    return loss_fn


def ppo_epochs(forwards: Any, config: RLHFConfig, optimizers: tuple, mesh: Mesh | None,
                state: Any, rollout: dict, key: jax.Array) -> tuple[tuple, dict]:
    """``ppo_epochs`` × ``num_minibatches`` updates, nested ``lax.scan`` s over
    shuffled minibatches of ``rollout``; returns the new ``(policy_params, policy_opt,
    value_params, value_opt)`` and the per-update metrics ``[epochs, minibatches]``."""
    policy_optimizer, value_optimizer = optimizers
    batch, prompt_len = rollout["ids"].shape[0], rollout["prompt_len"]
    separate_value = config.uses_critic and not config.shared_value_head
    loss_fn = policy_loss_fn(forwards, config, separate_value, prompt_len)
    if batch % config.num_minibatches:
        raise ValueError(f"{batch} rollouts do not split into num_minibatches="
                         f"{config.num_minibatches}")

    def minibatch_step(carry, inputs):
        (policy_params, policy_opt, value_params, value_opt), (mb, dropout_key) = carry, inputs
        (_, metrics), (policy_grads, value_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(policy_params, value_params, mb,
                                                   state.kl.coef, dropout_key)
        updates, policy_opt = policy_optimizer.update(policy_grads, policy_opt, policy_params)
        policy_params = optax.apply_updates(policy_params, updates)
        if value_params is not None:
            updates, value_opt = value_optimizer.update(value_grads, value_opt, value_params)
            value_params = optax.apply_updates(value_params, updates)
        metrics["grad_norm"] = optax.tree.norm(policy_grads)
        return (policy_params, policy_opt, value_params, value_opt), metrics

    arrays = {k: v for k, v in rollout.items() if k != "prompt_len"}
    mb_size = batch // config.num_minibatches

    def epoch_step(carry, epoch_key):
        order = jax.random.permutation(epoch_key, batch)
        minibatches = jax.tree.map(
            lambda x: _constrain(x[order].reshape(config.num_minibatches, mb_size, *x.shape[1:]),
                                 mesh, P(None, shd.BATCH_AXES)), arrays)
        # each update's dropout masks (LoRA dropout): a stream of the epoch key apart from the
        # shuffle, so the minibatch order is what it was without dropout
        dropout_keys = jax.random.split(jax.random.fold_in(epoch_key, DROPOUT_STREAM),
                                        config.num_minibatches)
        return jax.lax.scan(minibatch_step, carry, (minibatches, dropout_keys))

    carry = (state.policy_params, state.policy_opt_state, state.value_params,
             state.value_opt_state)
    return jax.lax.scan(epoch_step, carry, jax.random.split(key, config.ppo_epochs))


def _constrain(x: jax.Array, mesh: Mesh | None, spec: P) -> jax.Array:
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
