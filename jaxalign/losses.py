"""Pure alignment losses: Bradley–Terry, DPO (and conservative DPO), IPO, ORPO, PPO.

Every function here is pure, takes keyword-only hyperparameters, computes in float32 even for
bfloat16 inputs (float64 stays float64), and returns an *unreduced* loss: one value per example
``[B]`` or per token ``[B, T]``. Reduce with :func:`jaxalign.masked_mean` (or ``jnp.mean``).
All of them work under ``jit``, ``vmap``, ``pmap`` and ``shard_map``: no value-dependent Python
control flow, no I/O.

Sequence log-probs passed to the preference losses are whatever the caller computed: sums over
completion tokens for DPO (as in the paper and TRL), per-token means for IPO and ORPO (as their
authors do). :func:`jaxalign.sequence_logprobs` computes either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.masking import masked_mean

# exp() of a log-ratio past this overflows float32 gradients; see ppo_clip_loss and kl_penalty.
_MAX_LOG_RATIO = 20.0
# Largest per-token mean log-prob the odds ratio accepts: log(1 − e^ℓ) is −inf at ℓ = 0.
_MAX_MEAN_LOGP = -1e-7

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def _f32(x: ArrayLike) -> jax.Array:
    """Cast to at least float32 (bf16/f16 → f32; f64 stays f64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _same_shape(**arrays: jax.Array) -> None:
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"arguments must have the same shape; got {listed}")


def _preference_margin(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
) -> jax.Array:
    """``h = (π_c − ref_c) − (π_r − ref_r)``, the implicit-reward margin of DPO and IPO."""
    args = dict(
        policy_chosen_logps=_f32(policy_chosen_logps),
        policy_rejected_logps=_f32(policy_rejected_logps),
        ref_chosen_logps=_f32(ref_chosen_logps),
        ref_rejected_logps=_f32(ref_rejected_logps),
    )
    _same_shape(**args)
    chosen = args["policy_chosen_logps"] - args["ref_chosen_logps"]
    rejected = args["policy_rejected_logps"] - args["ref_rejected_logps"]
    return chosen - rejected


def bradley_terry_loss(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    *,
    margin: ArrayLike = 0.0,
    p_chosen: ArrayLike = 1.0,
) -> jax.Array:
    """Bradley–Terry negative log-likelihood of a preference, for reward-model training.

    ``loss = −log σ(r_c − r_r − m)``, the InstructGPT reward-model loss; ``m`` is an optional
    required margin (Llama 2 uses one per preference strength). With a soft label
    ``p = P(chosen ≻ rejected)`` (AI feedback, noisy labellers) it is the binary cross-entropy
    ``−p·log σ(d) − (1 − p)·log σ(−d)``, ``d = r_c − r_r − m``; ``p = 1`` is the hard loss.

    Args:
      chosen_rewards: ``[B]`` rewards of the preferred responses.
      rejected_rewards: ``[B]`` rewards of the dispreferred responses.
      margin: scalar or ``[B]`` margin subtracted from the reward difference.
      p_chosen: scalar or ``[B]`` probability that the chosen response is preferred.

    Returns:
      ``[B]`` float32 losses.

    References:
      Bradley & Terry, "Rank Analysis of Incomplete Block Designs", Biometrika 1952.
      Ouyang et al., "Training language models to follow instructions with human feedback",
      arXiv:2203.02155, eq. 1.
    """
    chosen_rewards, rejected_rewards = _f32(chosen_rewards), _f32(rejected_rewards)
    _same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards - _f32(margin)
    p_chosen = _f32(p_chosen)
    return -(p_chosen * jax.nn.log_sigmoid(diff) + (1.0 - p_chosen) * jax.nn.log_sigmoid(-diff))


def dpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: ArrayLike = 0.0,
) -> jax.Array:
    """Direct Preference Optimization loss (conservative DPO when ``label_smoothing > 0``).

    With ``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``:
    ``loss = −(1 − ε)·log σ(β h) − ε·log σ(−β h)``. ``ε`` is the probability that the label is
    flipped (cDPO); it may be a scalar or ``[B]`` (soft labels: ``ε = 1 − p_chosen``). At
    ``π = π_ref`` the loss is ``log 2`` for every ``ε``. The implicit rewards TRL logs are
    ``β·(log π − log π_ref)`` of each response.

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: inverse temperature β of the KL constraint.
      label_smoothing: ε in ``[0, 0.5)``, scalar or ``[B]``.

    Returns:
      ``[B]`` float32 losses.

    References:
      Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a
      Reward Model", arXiv:2305.18290, eq. 7. Mitchell, "A note on DPO with noisy preferences
      & relationship to IPO" (2023) for the conservative variant.
    """
    logits = beta * _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    eps = _f32(label_smoothing)
    return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


def ipo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Identity Preference Optimisation loss: ``(h − 1/(2β))²``.

    ``h`` is the DPO margin ``(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``
    computed from the log-probs given. The IPO authors (and TRL's ``loss_type="ipo"``) use
    per-token *mean* log-probs, so ``1/(2β)`` is a per-token margin; our preference step passes
    means (``sequence_logprobs(..., average=True)``). The loss is 0 at ``h = 1/(2β)``.

    Args:
      policy_chosen_logps: ``[B]`` log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: regularisation β (τ in the paper).

    Returns:
      ``[B]`` float32 losses.

    References:
      Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
      Preferences", arXiv:2310.12036, eq. 17.
    """
    h = _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (h - 1.0 / (2.0 * beta)) ** 2


def log1mexp(x: ArrayLike) -> jax.Array:
    """``log(1 − eˣ)`` for ``x < 0``, accurate near 0 and for very negative ``x``.

    Uses ``log(−expm1(x))`` for ``x > −log 2`` and ``log1p(−eˣ)`` otherwise (Mächler 2012).
    """
    x = _f32(x)
    near_zero = x > -jnp.log(2.0)
    # Each branch gets an input that is safe for it, so the unused branch has finite gradients.
    x_near = jnp.where(near_zero, x, -1.0)
    x_far = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def odds_ratio_loss(chosen_logps: ArrayLike, rejected_logps: ArrayLike) -> jax.Array:
    """ORPO's odds-ratio term: ``−log σ(log odds(y_w) − log odds(y_l))``.

    ``log odds(y) = ℓ − log(1 − e^ℓ)`` where ``ℓ`` is the per-token *mean* log-prob of ``y``
    under the policy (the odds of the geometric-mean token probability). ``log(1 − e^ℓ)`` is
    computed stably (:func:`log1mexp`); ``ℓ`` is capped at ``−1e−7`` because the odds are
    infinite at ``ℓ = 0`` exactly.

    Args:
      chosen_logps: ``[B]`` per-token mean log-probs of the chosen completions.
      rejected_logps: ``[B]`` per-token mean log-probs of the rejected completions.

    Returns:
      ``[B]`` float32 losses.

    References:
      Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model",
      arXiv:2403.07691, eqs. 4–7.
    """
    chosen, rejected = _f32(chosen_logps), _f32(rejected_logps)
    _same_shape(chosen_logps=chosen, rejected_logps=rejected)
    chosen = jnp.minimum(chosen, _MAX_MEAN_LOGP)
    rejected = jnp.minimum(rejected, _MAX_MEAN_LOGP)
    log_odds = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
    return -jax.nn.log_sigmoid(log_odds)


def orpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    chosen_nll: ArrayLike,
    *,
    lam: float = 0.1,
) -> jax.Array:
    """ORPO loss: ``L_SFT + λ·L_OR``, supervised NLL on the chosen response plus the odds ratio.

    Args:
      chosen_logps: ``[B]`` per-token mean log-probs of the chosen completions.
      rejected_logps: ``[B]`` per-token mean log-probs of the rejected completions.
      chosen_nll: ``[B]`` negative log-likelihood of the chosen completion (per-token mean in the
        paper, i.e. usually ``−chosen_logps``).
      lam: weight λ of the odds-ratio term (0.1 in the paper; TRL calls it ``beta``).

    Returns:
      ``[B]`` float32 losses.

    References:
      Hong et al., arXiv:2403.07691, eq. 6.
    """
    chosen_nll = _f32(chosen_nll)
    return chosen_nll + lam * odds_ratio_loss(chosen_logps, rejected_logps)


def _log_ratio(logps: ArrayLike, old_logps: ArrayLike) -> jax.Array:
    logps, old_logps = _f32(logps), _f32(old_logps)
    _same_shape(logps=logps, old_logps=old_logps)
    return jnp.clip(logps - old_logps, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)


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
    clipped_values = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
    return 0.5 * jnp.maximum(unclipped, (clipped_values - returns) ** 2)


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
      estimator: one of ``"k1"``, ``"k2"``, ``"k3"``, ``"abs"``.

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
    ``L_VF`` is :func:`value_loss` and ``H`` the policy entropy. Seed-style code that writes
    ``L_policy + c1·L_VF + c2·L_ENT`` and says "maximise the policy and entropy terms, minimise
    the value term" describes the same objective: here every sign is folded in so the whole
    expression is minimised.

    Args:
      logps: ``[B, T]`` log-probs of the taken tokens under the current policy.
      old_logps: ``[B, T]`` their log-probs at rollout time.
      advantages: ``[B, T]`` advantages (already whitened if desired).
      values: ``[B, T]`` current value predictions.
      old_values: ``[B, T]`` value predictions at rollout time.
      returns: ``[B, T]`` value targets.
      mask: ``[B, T]``, 1 on completion tokens.
      entropies: optional ``[B, T]`` per-token policy entropies (:func:`entropy` of the logits);
        the entropy term is skipped when ``None``.
      clip_eps: policy ratio clip ε.
      value_clip: value clip range, ``None`` to disable.
      vf_coef: c1.
      ent_coef: c2.
      dual_clip: optional dual-clip constant (see :func:`ppo_clip_loss`).

    Returns:
      ``(loss, metrics)``: a float32 scalar and a dict with ``loss``, ``policy_loss``,
      ``value_loss``, ``entropy``, ``clipfrac`` (fraction of tokens whose ratio was clipped),
      ``value_clipfrac`` (fraction of tokens where the clipped value error was used), and ``approx_kl`` (``mean(ρ − 1 − log ρ)``, the k3 estimate of
      ``KL(π_old ‖ π)``).

    References:
      Schulman et al., arXiv:1707.06347, eq. 9.
    """
    logps, old_logps = _f32(logps), _f32(old_logps)
    mask = jnp.asarray(mask)
    _same_shape(logps=logps, mask=mask)
    policy_loss = masked_mean(
        ppo_clip_loss(logps, old_logps, advantages, clip_eps=clip_eps, dual_clip=dual_clip), mask
    )
    vf_loss = masked_mean(value_loss(values, old_values, returns, clip_range=value_clip), mask)
    if entropies is None:
        mean_entropy = jnp.zeros((), jnp.float32)
    else:
        mean_entropy = masked_mean(_f32(entropies), mask)
    loss = policy_loss + vf_coef * vf_loss - ent_coef * mean_entropy

    log_ratio = jax.lax.stop_gradient(_log_ratio(logps, old_logps))
    ratio = jnp.exp(log_ratio)
    metrics = {
        "loss": loss,
        "policy_loss": policy_loss,
        "value_loss": vf_loss,
        "entropy": mean_entropy,
        "clipfrac": masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask),
        "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
    }
    if value_clip is not None:
        # Tokens whose value moved past the clip range and whose clipped error is the larger
        # (the one the loss used; TRL's definition). Requiring the move past the range keeps
        # float rounding from counting tokens where the two errors are equal.
        values_sg, old_values = jax.lax.stop_gradient(_f32(values)), _f32(old_values)
        returns = _f32(returns)
        clipped_values = old_values + jnp.clip(values_sg - old_values, -value_clip, value_clip)
        used_clip = (jnp.abs(values_sg - old_values) > value_clip) & (
            (clipped_values - returns) ** 2 > (values_sg - returns) ** 2)
        metrics["value_clipfrac"] = masked_mean(used_clip.astype(jnp.float32), mask)
    else:
        metrics["value_clipfrac"] = jnp.zeros((), jnp.float32)
    return loss, metrics
