"""Advantage estimators over token-level rollouts: GAE, the critic-free group estimators
(GRPO, Dr. GRPO, RLOO), REINFORCE++'s batch-normalised returns, and the KL-shaped per-token
rewards they start from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.masking import masked_whiten

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def gae(
    rewards: ArrayLike,
    values: ArrayLike,
    mask: ArrayLike,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over right-padded token rollouts.

    For valid positions ``t`` (``mask = 1``), with ``t'`` the next valid position:
    ``δ_t = r_t + γ V_{t'} − V_t`` and ``A_t = δ_t + γλ A_{t'}``. The episode ends after the last
    valid position, where the bootstrap value and advantage are 0. Masked positions are skipped
    (their rewards and values are never read, even if NaN), and ``A_t = R_t = 0`` there.
    Returns are ``R_t = A_t + V_t`` (the λ-return). Computed by a reverse ``lax.scan`` over time.

    Special cases: ``λ = 0`` gives the TD error ``δ_t``; ``γ = λ = 1`` gives the reward-to-go
    ``Σ_{k ≥ t} r_k`` minus ``V_t``.

    Args:
      rewards: ``[B, T]`` per-token rewards.
      values: ``[B, T]`` value estimates ``V(s_t)``.
      mask: ``[B, T]``, 1 on valid (completion) positions.
      gamma: discount γ.
      lam: GAE λ.

    Returns:
      ``(advantages, returns)``, both ``[B, T]`` float32.

    References:
      Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
      Estimation", arXiv:1506.02438, eq. 16.
    """
    rewards = jnp.asarray(rewards)
    values = jnp.asarray(values)
    mask = jnp.asarray(mask)
    if not (rewards.shape == values.shape == mask.shape) or rewards.ndim != 2:
        raise ValueError(
            f"rewards, values and mask must all be [B, T]; got rewards {rewards.shape}, "
            f"values {values.shape}, mask {mask.shape}"
        )
    dtype = jnp.promote_types(jnp.result_type(rewards, values), jnp.float32)
    valid = mask.astype(bool)
    rewards = jnp.where(valid, rewards, 0).astype(dtype)
    values = jnp.where(valid, values, 0).astype(dtype)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, is_valid = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(is_valid, value, next_value), jnp.where(is_valid, advantage, next_advantage))
        return carry, jnp.where(is_valid, advantage, 0)

    zeros = jnp.zeros_like(rewards[:, 0])  # like the inputs, so shard_map sees matching carries
    _, advantages = jax.lax.scan(
        step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True
    )
    advantages = advantages.T
    returns = jnp.where(valid, advantages + values, 0)
    return advantages, returns


def group_advantages(scores: ArrayLike, group_size: int, estimator: str, *,
                     eps: float = 1e-6) -> jax.Array:
    """Critic-free sequence advantages from ``scores [B·k]`` grouped ``k`` per prompt.

    With ``s̄_g`` the mean and ``σ_g`` the unbiased (``ddof=1``, as ``torch.std`` in TRL and
    verl) standard deviation of prompt ``g``'s ``k`` scores:

    - ``grpo``: ``(s_i − s̄_g) / (σ_g + eps)`` (Shao et al. 2024, arXiv:2402.03300, §4.1.2);
    - ``dr_grpo``: ``s_i − s̄_g``, no division by σ, which weights prompts of nearly equal rewards
      as heavily as the rest (Liu et al. 2025, "Understanding R1-Zero-Like Training",
      arXiv:2503.20783, eq. 3);
    - ``rloo``: ``s_i − (1/(k−1)) Σ_{j≠i} s_j = k/(k−1) · (s_i − s̄_g)``, the leave-one-out
      baseline (Ahmadian et al. 2024, arXiv:2402.14740, eq. 9).

    Each sums to zero over a group (GRPO's up to ``eps``). Rows ``g·k … g·k + k − 1`` are the
    samples of prompt ``g``.

    Args:
      scores: ``[B·k]`` sequence rewards.
      group_size: ``k ≥ 2`` samples per prompt.
      estimator: one of :data:`GROUP_ESTIMATORS` (``"grpo"``, ``"dr_grpo"``, ``"rloo"``).
      eps: GRPO's guard against a zero standard deviation.

    Returns:
      ``[B·k]`` advantages.
    """
    grouped = jnp.asarray(scores).reshape(-1, group_size)
    mean = jnp.mean(grouped, axis=1, keepdims=True)
    if estimator == "grpo":
        std = jnp.std(grouped, axis=1, keepdims=True, ddof=1)
        adv = (grouped - mean) / (std + eps)
    elif estimator == "dr_grpo":
        adv = grouped - mean
    elif estimator == "rloo":
        adv = (grouped - mean) * group_size / (group_size - 1)
    else:
        raise ValueError(f"estimator must be one of {GROUP_ESTIMATORS}, got {estimator!r}")
    return adv.reshape(-1)


def reinforce_pp_advantages(rewards: ArrayLike, completion_mask: ArrayLike, *,
                            gamma: float = 1.0) -> jax.Array:
    """REINFORCE++ advantages: the per-token return ``G_t = Σ_{s ≥ t} γ^{s−t} r_s`` whitened
    over every valid token of the batch (Hu 2025, arXiv:2501.03262, eq. 7 and §3.2; OpenRLHF's
    ``reinforce``): no critic, no groups, one global normalisation.

    With KL-shaped rewards (:func:`kl_shaped_rewards`) ``G_t = score − β Σ_{s ≥ t} KL_s``.

    Args:
      rewards: ``[B, T]`` per-token rewards (the score at the last completion token).
      completion_mask: ``[B, T]``, 1 on completion tokens.
      gamma: discount γ.

    Returns:
      ``[B, T]`` float32 advantages, 0 at masked positions.
    """
    rewards = jnp.asarray(rewards)
    returns, _ = gae(rewards, jnp.zeros_like(rewards), completion_mask, gamma=gamma, lam=1.0)
    return masked_whiten(returns, jnp.asarray(completion_mask) > 0)


def kl_shaped_rewards(scores: ArrayLike, kl: ArrayLike, completion_mask: ArrayLike, *,
                      kl_coef: ArrayLike) -> jax.Array:
    """Per-token rewards of RLHF: ``r_t = −β·KL_t``, plus the sequence score at the last
    completion token (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022, eq. 2).

    Args:
      scores: ``[B]`` sequence scores (reward model or reward function).
      kl: ``[B, T]`` per-token KL estimates, 0 at masked positions.
      completion_mask: ``[B, T]`` right-padded, 1 on completion tokens.
      kl_coef: β, a scalar.

    Returns:
      ``[B, T]`` float32 rewards (an empty completion puts its score at position 0).
    """
    lengths = jnp.sum(completion_mask, axis=1)
    last = jax.nn.one_hot(jnp.maximum(lengths - 1, 0), jnp.shape(kl)[1], dtype=jnp.float32)
    return -kl_coef * kl + last * jnp.asarray(scores)[:, None]
