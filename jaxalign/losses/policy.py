"""Policy-gradient losses for RLHF: PPO's clipped surrogate, value loss, entropy, KL penalty.

The per-token pieces return unreduced ``[B, T]`` values; :func:`ppo_loss` combines them into
one masked-mean scalar plus the usual metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses._common import _f32, _same_shape
from jaxalign.masking import masked_mean

# exp() of a log-ratio past this overflows float32 gradients; see ppo_clip_loss and kl_penalty.
_MAX_LOG_RATIO = 20.0

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def _log_ratio(logps: ArrayLike, old_logps: ArrayLike) -> jax.Array:
    logps, old_logps = _f32(logps), _f32(old_logps)
    _same_shape(logps=logps, old_logps=old_logps)
    return jnp.clip(logps - old_logps, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _clipped_values(values: jax.Array, old_values: jax.Array, clip_range: float) -> jax.Array:
    """``clip(V, V_old − c, V_old + c)``, written as PPO implementations compute it."""
    return old_values + jnp.clip(values - old_values, -clip_range, clip_range)


def ppo_clip_loss(
    logps: ArrayLike,
    old_logps: ArrayLike,
    advantages: ArrayLike,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
) -> jax.Array:
    """PPO clipped surrogate, as a loss to minimise (the negated objective).

    ``loss_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)``, ``ρ_t = exp(log π(a_t) − log π_old(a_t))``.
    With ``dual_clip = c > 1`` (Ye et al. 2020, as in OpenRLHF) the loss of tokens with
    ``A_t < 0`` is further capped at ``−c·A_t``. The log-ratio is clipped to ±20 before ``exp``
    so that extreme log-probs cannot overflow; such ratios are far outside any clip range.

    Args:
      logps: ``[B, T]`` log-probs of the taken tokens under the current policy.
      old_logps: ``[B, T]`` the same under the policy that sampled them.
      advantages: ``[B, T]`` advantage estimates (treated as constants).
      clip_eps: ε, the clip range of the ratio.
      dual_clip: optional c > 1 for dual-clip PPO.

    Returns:
      ``[B, T]`` float32 per-token losses.

    References:
      Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347, eq. 7.
      Ye et al., "Mastering Complex Control in MOBA Games with Deep RL", arXiv:1912.09729.
    """
    ratio = jnp.exp(_log_ratio(logps, old_logps))
    advantages = jax.lax.stop_gradient(_f32(advantages))
    surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    loss = -surrogate
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -dual_clip * advantages), loss)
    return loss


def value_loss(
    values: ArrayLike,
    old_values: ArrayLike,
    returns: ArrayLike,
    *,
    clip_range: float | None = None,
) -> jax.Array:
    """Squared-error value loss, optionally with PPO-style value clipping.

    ``½(V − R)²``, or with ``clip_range = c``:
    ``½·max((V − R)², (clip(V, V_old − c, V_old + c) − R)²)`` (as in OpenAI baselines, TRL and
    OpenRLHF).

    Args:
      values: ``[B, T]`` current value predictions.
      old_values: ``[B, T]`` predictions at rollout time (used only with clipping).
      returns: ``[B, T]`` regression targets (treated as constants).
      clip_range: c, or ``None`` for no clipping.

    Returns:
      ``[B, T]`` float32 per-token losses.
    """
    values, old_values = _f32(values), _f32(old_values)
    returns = jax.lax.stop_gradient(_f32(returns))
    _same_shape(values=values, old_values=old_values, returns=returns)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * unclipped
    clipped = (_clipped_values(values, old_values, clip_range) - returns) ** 2
    return 0.5 * jnp.maximum(unclipped, clipped)


def entropy(logits: ArrayLike) -> jax.Array:
    """Entropy of ``softmax(logits)`` over the last axis: ``H = −Σ_v p_v log p_v``.

    Logits of ``−inf`` (filtered tokens) contribute 0, with finite gradients.

    Args:
      logits: ``[..., V]`` unnormalised scores.

    Returns:
      ``[...]`` float32 entropies in nats.
    """
    log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
    probs = jnp.exp(log_probs)
    safe_log_probs = jnp.where(jnp.isfinite(log_probs), log_probs, 0.0)
    return -jnp.sum(probs * safe_log_probs, axis=-1)


def kl_penalty(logps: ArrayLike, ref_logps: ArrayLike, *, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from log-probs of tokens sampled from ``π``.

    With ``r = log π_ref(a) − log π(a)``:

    - ``k1``: ``−r = log π − log π_ref`` (unbiased, can be negative; TRL's default),
    - ``k2``: ``½ r²`` (biased, low variance),
    - ``k3``: ``eʳ − 1 − r`` (unbiased, always ≥ 0; ``r`` clipped to ±20 before ``exp``),
    - ``abs``: ``|log π − log π_ref|``.

    Args:
      logps: ``[B, T]`` log-probs of the sampled tokens under the policy.
      ref_logps: ``[B, T]`` their log-probs under the reference policy.
      estimator: one of :data:`KL_ESTIMATORS` (``"k1"``, ``"k2"``, ``"k3"``, ``"abs"``).

    Returns:
      ``[B, T]`` float32 per-token KL estimates.

    References:
      Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
    """
    logps, ref_logps = _f32(logps), _f32(ref_logps)
    _same_shape(logps=logps, ref_logps=ref_logps)
    log_ratio = ref_logps - logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        log_ratio = jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return jnp.expm1(log_ratio) - log_ratio
    if estimator == "abs":
        return jnp.abs(log_ratio)
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def _ratio_metrics(logps, old_logps, mask, *, clip_eps: float) -> dict[str, jax.Array]:
    """``clipfrac`` and ``approx_kl`` (k3 of ``KL(π_old ‖ π)``) of :func:`ppo_loss`."""
    log_ratio = jax.lax.stop_gradient(_log_ratio(logps, old_logps))
    ratio = jnp.exp(log_ratio)
    return {
        "clipfrac": masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
    }


def _value_clipfrac(values, old_values, returns, mask, *, clip_range: float | None) -> jax.Array:
    """Fraction of valid tokens where :func:`value_loss` used the clipped error (0 unclipped).

    Counted: tokens whose value moved past the clip range and whose clipped error is the larger
    (the one the loss used; TRL's definition). Requiring the move past the range keeps float
    rounding from counting tokens where the two errors are equal.
    """
    if clip_range is None:
        return jnp.zeros((), jnp.float32)
    values, old_values = jax.lax.stop_gradient(_f32(values)), _f32(old_values)
    returns = _f32(returns)
    moved_past_range = jnp.abs(values - old_values) > clip_range
    clipped_is_larger = (
        (_clipped_values(values, old_values, clip_range) - returns) ** 2 > (values - returns) ** 2)
    return masked_mean((moved_past_range & clipped_is_larger).astype(jnp.float32), mask)


def ppo_loss(
    logps: ArrayLike,
    old_logps: ArrayLike,
    advantages: ArrayLike,
    values: ArrayLike,
    old_values: ArrayLike,
    returns: ArrayLike,
    mask: ArrayLike,
    *,
    entropies: ArrayLike | None = None,
    clip_eps: float = 0.2,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.1,
    ent_coef: float = 0.0,
    dual_clip: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The combined PPO objective as one scalar to minimise, with the usual metrics.

    ``loss = −L_clip + c1·L_VF − c2·H`` (Schulman et al. 2017, eq. 9, negated for gradient
    descent), each term a masked mean over valid tokens: ``−L_clip`` is :func:`ppo_clip_loss`,
    ``L_VF`` is :func:`value_loss` and ``H`` the policy entropy. Code that writes
    ``L_policy + c1·L_VF + c2·L_ENT`` and says "maximise the policy and entropy terms, minimise
    the value term" describes the same objective; here every sign is folded in.

    Args:
      logps, old_logps: ``[B, T]`` log-probs of the taken tokens now and at rollout time.
      advantages: ``[B, T]`` advantages (already whitened if desired).
      values, old_values: ``[B, T]`` value predictions now and at rollout time.
      returns: ``[B, T]`` value targets.
      mask: ``[B, T]``, 1 on completion tokens.
      entropies: optional ``[B, T]`` per-token policy entropies (:func:`entropy` of the logits);
        the entropy term is skipped when ``None``.
      clip_eps: policy ratio clip ε.
      value_clip: value clip range, ``None`` to disable.
      vf_coef, ent_coef: c1, c2.
      dual_clip: optional dual-clip constant (see :func:`ppo_clip_loss`).

    Returns:
      ``(loss, metrics)``: a float32 scalar and a dict of float32 scalars ``loss``,
      ``policy_loss``, ``value_loss``, ``entropy``, ``clipfrac`` (fraction of tokens whose ratio
      was clipped), ``approx_kl`` (``mean(ρ − 1 − log ρ)``, the k3 estimate of
      ``KL(π_old ‖ π)``) and ``value_clipfrac`` (fraction where the clipped value error was used).

    References:
      Schulman et al., arXiv:1707.06347, eq. 9.
    """
    logps, old_logps = _f32(logps), _f32(old_logps)
    mask = jnp.asarray(mask)
    _same_shape(logps=logps, mask=mask)
    per_token = ppo_clip_loss(logps, old_logps, advantages, clip_eps=clip_eps, dual_clip=dual_clip)
    policy_loss = masked_mean(per_token, mask)
    vf_loss = masked_mean(value_loss(values, old_values, returns, clip_range=value_clip), mask)
    mean_entropy = (jnp.zeros((), jnp.float32) if entropies is None
                    else masked_mean(_f32(entropies), mask))
    loss = policy_loss + vf_coef * vf_loss - ent_coef * mean_entropy
    metrics = {"loss": loss, "policy_loss": policy_loss, "value_loss": vf_loss,
               "entropy": mean_entropy, **_ratio_metrics(logps, old_logps, mask, clip_eps=clip_eps)}
    metrics["value_clipfrac"] = _value_clipfrac(values, old_values, returns, mask,
                                                clip_range=value_clip)
    return loss, metrics
