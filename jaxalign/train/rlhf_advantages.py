"""The RLHF step's path from samples to advantages: sequence rewards, DAPO's group filter, and
the advantage estimators of :class:`~jaxalign.train.rlhf_config.RLHFConfig`.

Stages of :func:`jaxalign.train.rlhf.make_rlhf_step` (pure functions of the config and arrays,
traced inside the one compiled step):

- :func:`sequence_rewards` — the raw score of each completion: a reward model's, a JAX
  scorer's, or the weighted sum of Python reward functions' (:mod:`jaxalign.train.text_rewards`);
- :func:`select_groups` — DAPO dynamic sampling: keep the prompt groups whose raw rewards are
  not all equal, informative groups first, into a batch of fixed size;
- :func:`shaped_scores` — clipping and the missing-EOS penalty;
- :func:`estimate_advantages` — GAE, the group estimators or REINFORCE++, with the KL either in
  the reward (``kl_in="reward"``) or left to the loss (``kl_in="loss"``), whitened exactly when
  :attr:`~jaxalign.train.rlhf_config.RLHFConfig.whitens_advantages` says so.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.advantages import gae, group_advantages, kl_shaped_rewards, reinforce_pp_advantages
from jaxalign.masking import masked_whiten
from jaxalign.train.rlhf_config import GROUP_ESTIMATORS, RLHFConfig

__all__ = ["estimate_advantages", "select_groups", "sequence_rewards", "shaped_scores"]


def sequence_rewards(reward: Any, reward_params: Any, rollout: dict, scorer: Any,
                     text_score: Any, text: Any) -> dict[str, jax.Array]:
    """``{"raw_scores": [B]}`` (and ``"per_function": [B, F]`` with Python rewards) of the
    rollout's completions, before clipping or penalties."""
    completion, mask = rollout["completion"], rollout["mask"]
    if text is not None:
        per_function = text_score(rollout["prompt_ids"], rollout["prompt_mask"], completion,
                                  mask, rollout["index"])
        return {"raw_scores": text.combine(per_function), "per_function": per_function}
    if scorer is not None:
        raw = scorer(rollout["prompt_ids"], rollout["prompt_mask"], completion, mask)
    else:
        raw = reward.apply({"params": reward_params}, rollout["ids"], rollout["attn"])
    return {"raw_scores": jnp.asarray(raw, jnp.float32)}


def _constrain(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(shd.BATCH_AXES)))


def select_groups(config: RLHFConfig, rollout: dict, rewards: dict,
                  mesh: Mesh | None) -> tuple[dict, dict, dict[str, jax.Array]]:
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, eq. 11) at a fixed shape.

    The rollout holds ``G·oversample`` prompt groups of ``k`` samples; a group is informative
    when its raw rewards are not all equal (otherwise every group estimator gives it zero
    advantage). The first ``G`` groups in the order "informative first, then by index" are
    kept, so the batch is filled with informative groups when there are enough and topped up
    with uninformative ones (zero advantage, no gradient) when not.

    Returns:
      The kept rows of ``rollout`` and ``rewards`` (``G·k``), and ``{"kept_fraction"}``: the
      share of sampled groups that were informative.
    """
    k = config.samples_per_prompt
    rows = rewards["raw_scores"].shape[0]
    if (rows // k) % config.oversample:
        raise ValueError(f"{rows // k} prompts do not split into oversample={config.oversample}")
    grouped = rewards["raw_scores"].reshape(-1, k)
    informative = jnp.max(grouped, axis=1) > jnp.min(grouped, axis=1)
    keep = (rows // k) // config.oversample
    order = jnp.argsort(jnp.logical_not(informative), stable=True)[:keep]
    indices = (order[:, None] * k + jnp.arange(k)[None, :]).reshape(-1)
    take = lambda x: _constrain(x[indices], mesh)  # noqa: E731
    rollout = {name: take(x) for name, x in rollout.items()}
    rewards = {name: take(x) for name, x in rewards.items()}
    return rollout, rewards, {"kept_fraction": jnp.mean(informative.astype(jnp.float32))}


def shaped_scores(config: RLHFConfig, raw_scores: jax.Array, has_eos: jax.Array) -> jax.Array:
    """``[B]`` scores the advantages use: clipped to ``±score_clip`` and minus the
    missing-EOS penalty (where configured)."""
    scores = raw_scores
    if config.score_clip is not None:
        scores = jnp.clip(scores, -config.score_clip, config.score_clip)
    if config.missing_eos_penalty is not None:
        scores = jnp.where(has_eos, scores, scores - config.missing_eos_penalty)
    return scores


def estimate_advantages(config: RLHFConfig, scored: dict, mask: jax.Array,
                        kl_coef: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(advantages, returns) [B, N]``.

    - ``gae``: GAE on the KL-shaped per-token rewards (optionally whitened rewards);
    - ``grpo`` / ``dr_grpo`` / ``rloo``: :func:`jaxalign.group_advantages` of the sequence
      reward — ``score − β·Σ_t KL_t`` with ``kl_in="reward"``, the score alone with
      ``kl_in="loss"`` (the GRPO paper) — on every token of the completion;
    - ``reinforce_pp``: the return of the KL-shaped per-token rewards (only the score at the
      last token with ``kl_in="loss"``), normalised over the batch.

    Advantages are then whitened over the batch's tokens iff ``config.whitens_advantages``
    (REINFORCE++'s normalisation is that whitening). Returns are 0 without a critic.
    """
    valid = mask > 0
    scores = scored["scores"]
    # with kl_in="loss" the KL is a loss term, so the rewards carry none
    kl = scored["kl"] if config.kl_in == "reward" else jnp.zeros_like(scored["kl"])
    if config.uses_critic:
        rewards = kl_shaped_rewards(scores, kl, mask, kl_coef=kl_coef)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, valid, shift_mean=False)
        advantages, returns = gae(rewards, scored["old_values"], valid, gamma=config.gamma,
                                  lam=config.gae_lambda)
    elif config.advantage in GROUP_ESTIMATORS:
        sequence_reward = scores - kl_coef * jnp.sum(kl, axis=1)
        advantages = group_advantages(sequence_reward, config.samples_per_prompt,
                                      config.advantage)[:, None] * valid
        returns = jnp.zeros_like(advantages)
    else:  # reinforce_pp; REINFORCE++'s normalisation is the whitening
        rewards = kl_shaped_rewards(scores, kl, mask, kl_coef=kl_coef)
        returns = jnp.zeros_like(rewards)
        if config.whitens_advantages:
            return reinforce_pp_advantages(rewards, valid, gamma=config.gamma), returns
        advantages, _ = gae(rewards, returns, valid, gamma=config.gamma, lam=1.0)
        return advantages, returns  # plain REINFORCE returns-to-go
    if config.whitens_advantages:
        advantages = masked_whiten(advantages, valid)
    return advantages, returns
