"""Unpaired (binary-feedback) losses: KTO and BCO, with their baselines.

Each example is one completion with a thumbs-up or thumbs-down label ``desirable [B]``;
``policy_logps`` and ``ref_logps`` are its summed log-probs under the policy and reference, so
``r = π − ref`` is its log-ratio. KTO's baseline is a KL estimate from the batch
(:func:`kto_kl_baseline`); BCO's a running mean of rewards kept as an ``(init, update)`` pair
over :class:`BCOBaselineState`. The losses return one unreduced float32 value per example.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses._common import _f32, _same_shape


def _log_ratio_and_labels(policy_logps, ref_logps, desirable) -> tuple[jax.Array, jax.Array]:
    policy, ref, desirable = _f32(policy_logps), _f32(ref_logps), jnp.asarray(desirable)
    _same_shape(policy_logps=policy, ref_logps=ref, desirable=desirable)
    return policy - ref, desirable.astype(bool)


def kto_kl_baseline(policy_kl_logps: ArrayLike, ref_kl_logps: ArrayLike) -> jax.Array:
    """KTO's reference point ``z₀ = max(mean(π_KL − ref_KL), 0)``, with its gradient stopped.

    ``π_KL`` and ``ref_KL`` are the summed log-probs of *mismatched* completions (each prompt
    paired with another example's completion, as TRL's collator does by shifting the batch by
    one), so the mean is a biased but cheap estimate of ``KL(π ‖ π_ref)``. Like the paper and
    TRL no gradient flows through it. TRL averages per-process means and then clamps; a mean
    over the whole (sharded) batch is the same for equal per-process batch sizes.

    Args:
      policy_kl_logps: ``[B]`` summed log-probs of the mismatched completions under the policy.
      ref_kl_logps: ``[B]`` the same under the reference.

    Returns:
      ``[]`` float32 baseline ``z₀ ≥ 0``.

    References:
      Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization",
      arXiv:2402.01306, §4.
    """
    policy, ref = _f32(policy_kl_logps), _f32(ref_kl_logps)
    _same_shape(policy_kl_logps=policy, ref_kl_logps=ref)
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(policy - ref), 0.0))


def kto_loss(
    policy_logps: ArrayLike,
    ref_logps: ArrayLike,
    desirable: ArrayLike,
    kl_baseline: ArrayLike,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> jax.Array:
    """Kahneman–Tversky Optimization loss, ``λ_y − v(x, y)`` per example.

    With ``r = π − ref`` and the reference point ``z₀`` (:func:`kto_kl_baseline`): desirable
    examples lose ``λ_D (1 − σ(β (r − z₀)))``, undesirable ones ``λ_U (1 − σ(β (z₀ − r)))``;
    at ``r = z₀`` each is ``λ/2``. This is TRL 1.16's ``KTOTrainer`` (``loss_type="kto"``),
    whose mean over the batch is its loss; its comment cites the paper's eq. 7, the numbering
    of an earlier arXiv version. No gradient flows through ``kl_baseline``.

    Args:
      policy_logps: ``[B]`` summed log-probs of the completions under the policy.
      ref_logps: ``[B]`` summed log-probs of the completions under the reference.
      desirable: ``[B]`` bool (or 0/1) label, true for thumbs-up examples.
      kl_baseline: ``[]`` reference point ``z₀``.
      beta: reward scale β.
      desirable_weight: λ_D, weight of desirable examples.
      undesirable_weight: λ_U, weight of undesirable examples (the paper suggests
        ``λ_D n_D / (λ_U n_U)`` in ``[1, 4/3]``).

    Returns:
      ``[B]`` float32 losses.

    References:
      Ethayarajh et al., arXiv:2402.01306, eq. 8.
    """
    log_ratio, desirable = _log_ratio_and_labels(policy_logps, ref_logps, desirable)
    logits = beta * (log_ratio - jax.lax.stop_gradient(_f32(kl_baseline)))
    # 1 − σ(x) = σ(−x), which keeps its precision where σ(x) rounds to 1.
    return jnp.where(
        desirable,
        desirable_weight * jax.nn.sigmoid(-logits),
        undesirable_weight * jax.nn.sigmoid(logits),
    )


class BCOBaselineState(NamedTuple):
    """Running mean of BCO's implicit rewards, the reward shift δ."""

    mean: jax.Array  # [] float32: mean of every reward seen so far, δ (0 before any update)
    count: jax.Array  # [] float32: how many rewards it averages (exact up to 2**24)


def bco_baseline_init() -> BCOBaselineState:
    """The BCO baseline before any batch: ``δ = 0`` over ``0`` rewards."""
    return BCOBaselineState(mean=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.float32))


def bco_baseline_update(state: BCOBaselineState, rewards: ArrayLike) -> BCOBaselineState:
    """Fold a batch of rewards ``β·r`` into BCO's running mean δ.

    A *cumulative* mean, every reward seen weighing the same, not an exponential one: it has
    no decay rate to tune, and updating with batch A then B equals updating with A ∪ B, so δ
    does not depend on how the data is split into (micro-)batches. TRL's former
    ``BCOTrainer`` (absent from TRL 1.16) did the same (``RunningMoments`` over all rewards),
    updating with a batch's rewards of both labels before computing that batch's loss. No
    gradient flows into the state.

    Args:
      state: the baseline so far.
      rewards: ``[B]`` implicit rewards ``β·(π − ref)`` of the batch, desirable and undesirable.

    Returns:
      The updated :class:`BCOBaselineState`.
    """
    rewards = jax.lax.stop_gradient(_f32(rewards))
    if rewards.size == 0:
        return state
    count = state.count + rewards.size
    mean = state.mean + (jnp.mean(rewards) - state.mean) * (rewards.size / count)
    return BCOBaselineState(mean=mean.astype(jnp.float32), count=count.astype(jnp.float32))


def bco_loss(
    policy_logps: ArrayLike,
    ref_logps: ArrayLike,
    desirable: ArrayLike,
    baseline: BCOBaselineState | ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Binary Classifier Optimization: logistic loss on the shifted implicit reward.

    With ``x = β r − δ``: desirable examples lose ``−log σ(x)``, undesirable ones
    ``−log σ(−x)``; at ``β r = δ`` each is ``log 2``. δ is the running reward mean of
    :func:`bco_baseline_update` and takes no gradient. The paper's underlying-distribution
    matching (a density-ratio weight on undesirable examples) is left to the caller, who can
    multiply it in; TRL 1.16 has no ``BCOTrainer`` (only DPO's δ-free ``bco_pair``).

    Args:
      policy_logps: ``[B]`` summed log-probs of the completions under the policy.
      ref_logps: ``[B]`` summed log-probs of the completions under the reference.
      desirable: ``[B]`` bool (or 0/1) label, true for thumbs-up examples.
      baseline: a :class:`BCOBaselineState`, or the shift δ itself as a ``[]`` array.
      beta: reward scale β.

    Returns:
      ``[B]`` float32 losses.

    References:
      Jung et al., "Binary Classifier Optimization for Large Language Model Alignment",
      arXiv:2404.04656, eq. 7.
    """
    log_ratio, desirable = _log_ratio_and_labels(policy_logps, ref_logps, desirable)
    delta = baseline.mean if isinstance(baseline, BCOBaselineState) else baseline
    logits = beta * log_ratio - jax.lax.stop_gradient(_f32(delta))
    return jnp.where(desirable, -jax.nn.log_sigmoid(logits), -jax.nn.log_sigmoid(-logits))
