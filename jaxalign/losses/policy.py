"""Policy-gradient losses for RLHF: PPO's clipped surrogate, value loss, entropy, KL penalty,
and the GRPO family's variations: asymmetric clipping (DAPO), sequence-level ratios (GSPO) and
loss aggregations (token mean, sequence mean, Dr. GRPO's constant normaliser).

The per-token pieces return unreduced ``[B, T]`` values; :func:`aggregate_loss` reduces them
under a mask, and :func:`ppo_loss` combines them into one scalar plus the usual metrics.
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
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum_norm")


def _log_ratio(logps: ArrayLike, old_logps: ArrayLike) -> jax.Array:
    logps, old_logps = _f32(logps), _f32(old_logps)
    _same_shape(logps=logps, old_logps=old_logps)
    return jnp.clip(logps - old_logps, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def _clipped_values(values: jax.Array, old_values: jax.Array, clip_range: float) -> jax.Array:
    """``clip(V, V_old − c, V_old + c)``, written as PPO implementations compute it."""
    return old_values + jnp.clip(values - old_values, -clip_range, clip_range)


def _clip_range(clip_eps: float, low: float | None, high: float | None) -> tuple[float, float]:
    return (clip_eps if low is None else low), (clip_eps if high is None else high)


def ppo_clip_loss(
    logps: ArrayLike,
    old_logps: ArrayLike,
    advantages: ArrayLike,
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
) -> jax.Array:
    """PPO clipped surrogate, as a loss to minimise (the negated objective).

    ``loss_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)``, ``ρ_t = exp(log π(a_t) − log π_old(a_t))``.
    ``clip_eps_low`` / ``clip_eps_high`` (default ``clip_eps``) make the range
    ``[1 − ε_low, 1 + ε_high]``: DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476, eq. 10)
    raises ``ε_high`` so unlikely tokens with positive advantage can grow.
    With ``dual_clip = c > 1`` (Ye et al. 2020, as in OpenRLHF) the loss of tokens with
    ``A_t < 0`` is further capped at ``−c·A_t``. The log-ratio is clipped to ±20 before ``exp``
    so that extreme log-probs cannot overflow; such ratios are far outside any clip range.

    Args:
      logps: ``[B, T]`` log-probs of the taken tokens under the current policy.
      old_logps: ``[B, T]`` the same under the policy that sampled them.
      advantages: ``[B, T]`` advantage estimates (treated as constants).
      clip_eps: ε, the clip range of the ratio.
      dual_clip: optional c > 1 for dual-clip PPO.
      clip_eps_low, clip_eps_high: optional ε of the lower / upper side (default ``clip_eps``).

    Returns:
      ``[B, T]`` float32 per-token losses.

    References:
      Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347, eq. 7.
      Ye et al., "Mastering Complex Control in MOBA Games with Deep RL", arXiv:1912.09729.
    """
    low, high = _clip_range(clip_eps, clip_eps_low, clip_eps_high)
    ratio = jnp.exp(_log_ratio(logps, old_logps))
    advantages = jax.lax.stop_gradient(_f32(advantages))
    surrogate = jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - low, 1 + high) * advantages)
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


def _ratio_metrics(logps, old_logps, mask, *, clip_eps: float,
                   clip_eps_low: float | None = None,
                   clip_eps_high: float | None = None) -> dict[str, jax.Array]:
    """``clipfrac`` and ``approx_kl`` (k3 of ``KL(π_old ‖ π)``) of :func:`ppo_loss`."""
    log_ratio = jax.lax.stop_gradient(_log_ratio(logps, old_logps))
    ratio = jnp.exp(log_ratio)
    if clip_eps_low is None and clip_eps_high is None:
        outside = jnp.abs(ratio - 1.0) > clip_eps
    else:
        low, high = _clip_range(clip_eps, clip_eps_low, clip_eps_high)
        outside = (ratio > 1.0 + high) | (ratio < 1.0 - low)
    return {
        "clipfrac": masked_mean(outside.astype(jnp.float32), mask),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
    }


def clip_fractions(logps: ArrayLike, old_logps: ArrayLike, advantages: ArrayLike,
                   mask: ArrayLike, *, clip_eps: float = 0.2, clip_eps_low: float | None = None,
                   clip_eps_high: float | None = None) -> dict[str, jax.Array]:
    """Fractions of valid tokens whose clipped surrogate has no gradient, by side (TRL's
    ``clip_ratio/low_mean`` and ``clip_ratio/high_mean``).

    ``low``: ``ρ_t < 1 − ε_low`` and ``A_t < 0``; ``high``: ``ρ_t > 1 + ε_high`` and ``A_t > 0``
    (ε of a side defaults to ``clip_eps``).

    Args:
      logps, old_logps: ``[B, T]`` log-probs now and at rollout time.
      advantages: ``[B, T]`` advantages.
      mask: ``[B, T]``, 1 on completion tokens.

    Returns:
      ``{"low": [], "high": []}`` float32 fractions.
    """
    low, high = _clip_range(clip_eps, clip_eps_low, clip_eps_high)
    ratio = jnp.exp(jax.lax.stop_gradient(_log_ratio(logps, old_logps)))
    advantages = _f32(advantages)
    return {"low": masked_mean(((ratio < 1 - low) & (advantages < 0)).astype(jnp.float32), mask),
            "high": masked_mean(((ratio > 1 + high) & (advantages > 0)).astype(jnp.float32),
                                mask)}


def sequence_log_ratio(logps: ArrayLike, old_logps: ArrayLike, mask: ArrayLike) -> jax.Array:
    """GSPO's sequence-level log importance ratio, spread over the tokens (Zheng et al. 2025,
    "Group Sequence Policy Optimization", arXiv:2507.18071, eqs. 7 and 14, "GSPO-token").

    ``log s_i = (1/|y_i|) Σ_t (log π(y_t) − log π_old(y_t))`` is the value on every valid token;
    the gradient of token ``t`` is that of ``log π(y_t)``: the per-token log-ratio is
    ``sg(log s_i) + log π(y_t) − sg(log π(y_t))``. Fed to :func:`ppo_clip_loss` (as
    ``logps = old_logps + this``) and averaged per sequence, it gives GSPO's objective
    ``min(s_i A_i, clip(s_i, 1 − ε, 1 + ε) A_i)`` and its gradient.

    Args:
      logps, old_logps: ``[B, T]`` token log-probs now and at rollout time.
      mask: ``[B, T]``, 1 on completion tokens.

    Returns:
      ``[B, T]`` float32 log-ratios, 0 at masked positions.
    """
    logps, old_logps = _f32(logps), _f32(old_logps)
    _same_shape(logps=logps, old_logps=old_logps)
    valid = jnp.asarray(mask) > 0
    sequence = masked_mean(jax.lax.stop_gradient(logps - old_logps), valid, axis=-1)
    per_token = sequence[..., None] + logps - jax.lax.stop_gradient(logps)
    return jnp.where(valid, per_token, 0.0)


def aggregate_loss(per_token: ArrayLike, mask: ArrayLike, mode: str = "token_mean", *,
                   num_tokens: ArrayLike | None = None, num_sequences: ArrayLike | None = None,
                   max_tokens: int | None = None) -> jax.Array:
    """Reduces per-token losses ``ℓ [B, T]`` under ``mask`` to a scalar.

    With ``L_i = Σ_t m_it`` the length of sequence ``i``:

    - ``token_mean``: ``Σ_it m ℓ / Σ_it m`` — every token weighs the same (DAPO,
      arXiv:2503.14476, eq. 12; TRL's default);
    - ``sequence_mean``: ``(1/B) Σ_i (Σ_t m ℓ) / L_i`` — every sequence weighs the same (the
      GRPO paper, arXiv:2402.03300, eq. 3), so long sequences' tokens weigh less;
    - ``token_sum_norm``: ``Σ_it m ℓ / (B · T_max)`` — a constant normaliser, the generation
      budget ``T_max`` (Dr. GRPO, arXiv:2503.20783, §3.1), with no length bias.

    Gradient accumulation: pass the *whole batch's* ``num_tokens`` (``token_mean``) or
    ``num_sequences`` (the other two) when reducing a micro-batch, and the sum over micro-batches
    equals the whole batch's loss (normalising each micro-batch by its own count does not).

    Args:
      per_token: ``[B, T]`` per-token losses.
      mask: ``[B, T]``, 1 on completion tokens.
      mode: one of :data:`LOSS_AGGREGATIONS`.
      num_tokens: ``Σ m`` to divide by (default: this batch's, at least 1).
      num_sequences: ``B`` to divide by (default: this batch's rows).
      max_tokens: ``T_max`` of ``token_sum_norm`` (default ``T``).

    Returns:
      A float32 scalar.
    """
    per_token = _f32(per_token)
    valid = jnp.asarray(mask) > 0
    _same_shape(per_token=per_token, mask=valid)
    rows = per_token.shape[0] if num_sequences is None else num_sequences
    if mode == "token_mean":
        if num_tokens is None:
            return masked_mean(per_token, valid)
        return jnp.sum(jnp.where(valid, per_token, 0.0)) / num_tokens
    if mode == "sequence_mean":
        return jnp.sum(masked_mean(per_token, valid, axis=-1)) / rows
    if mode == "token_sum_norm":
        budget = per_token.shape[-1] if max_tokens is None else max_tokens
        return jnp.sum(jnp.where(valid, per_token, 0.0)) / (rows * budget)
    raise ValueError(f"mode must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


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
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    loss_agg: str = "token_mean",
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
      clip_eps_low, clip_eps_high: optional asymmetric ratio clip (see :func:`ppo_clip_loss`).
      loss_agg: how the policy term is reduced (:func:`aggregate_loss`); the value and entropy
        terms are always token means.

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
    per_token = ppo_clip_loss(logps, old_logps, advantages, clip_eps=clip_eps, dual_clip=dual_clip,
                              clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)
    policy_loss = aggregate_loss(per_token, mask, loss_agg)
    vf_loss = masked_mean(value_loss(values, old_values, returns, clip_range=value_clip), mask)
    mean_entropy = (jnp.zeros((), jnp.float32) if entropies is None
                    else masked_mean(_f32(entropies), mask))
    loss = policy_loss + vf_coef * vf_loss - ent_coef * mean_entropy
    metrics = {"loss": loss, "policy_loss": policy_loss, "value_loss": vf_loss,
               "entropy": mean_entropy,
               **_ratio_metrics(logps, old_logps, mask, clip_eps=clip_eps,
                                clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)}
    metrics["value_clipfrac"] = _value_clipfrac(values, old_values, returns, mask,
                                                clip_range=value_clip)
    return loss, metrics
