"""Preference losses: Bradley–Terry (reward models), DPO and conservative DPO, IPO, ORPO.

Each loss returns one unreduced value per pair, ``[B]``. :func:`log1mexp` and :func:`log_odds`
are elementwise; :func:`ranking_pair_weights` turns ``[B, K]`` ranks into ``[B, K, K]`` weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses._common import _f32, _same_shape

# Largest per-token mean log-prob the odds ratio accepts: log(1 − e^ℓ) is −inf at ℓ = 0.
_MAX_MEAN_LOGP = -1e-7


def _log_ratios(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
) -> tuple[jax.Array, jax.Array]:
    """``(r_c, r_r) = (π_c − ref_c, π_r − ref_r)``, each response's policy/reference log-ratio."""
    args = dict(
        policy_chosen_logps=_f32(policy_chosen_logps),
        policy_rejected_logps=_f32(policy_rejected_logps),
        ref_chosen_logps=_f32(ref_chosen_logps),
        ref_rejected_logps=_f32(ref_rejected_logps),
    )
    _same_shape(**args)
    chosen = args["policy_chosen_logps"] - args["ref_chosen_logps"]
    rejected = args["policy_rejected_logps"] - args["ref_rejected_logps"]
    return chosen, rejected


def _preference_margin(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
) -> jax.Array:
    """``h = (π_c − ref_c) − (π_r − ref_r)``, the implicit-reward margin of DPO and IPO."""
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
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


def ranking_pair_weights(ranks: ArrayLike) -> jax.Array:
    """Weights turning a ranking of K responses into all its strictly ordered pairs.

    ``w[b, i, j] = 1 / n_b`` when response ``i`` ranks strictly better than ``j`` (lower rank),
    where ``n_b`` is the number of such pairs in ranking ``b``; tied responses form no pair. Each
    ranking therefore counts once however many pairs it yields, as in InstructGPT (which
    divides by ``C(K, 2)``, the pair count without ties). A ranking of all ties weighs 0.
    ``sum(w * bradley_terry_loss(r[:, :, None], r[:, None, :])) / B`` is the ranking loss.

    Args:
      ranks: ``[B, K]`` rank of each response, 0 the best; equal ranks are ties.

    Returns:
      ``[B, K, K]`` float32 weights, each ranking's summing to 1 (or 0 if all tied).

    References:
      Ouyang et al., arXiv:2203.02155, eq. 1.
    """
    ranks = jnp.asarray(ranks)
    better = (ranks[:, :, None] < ranks[:, None, :]).astype(jnp.float32)
    n_pairs = jnp.sum(better, axis=(1, 2), keepdims=True)
    return better / jnp.maximum(n_pairs, 1.0)


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


def log_odds(mean_logps: ArrayLike) -> jax.Array:
    """Log-odds of a completion as ORPO defines them: ``ℓ − log(1 − e^ℓ)``.

    ``ℓ`` is the per-token *mean* log-prob, so ``e^ℓ`` is the geometric-mean token probability
    ``P`` and the result is ``log(P / (1 − P))``. ``log(1 − e^ℓ)`` is computed stably
    (:func:`log1mexp`); ``ℓ`` is capped at ``−1e−7`` because the odds are infinite at ``ℓ = 0``
    exactly, which bounds the log-odds above by about 16.1.

    Args:
      mean_logps: ``[B]`` (any shape) per-token mean log-probs, ``≤ 0``.

    Returns:
      float32 log-odds of the same shape.

    References:
      Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model",
      arXiv:2403.07691, eq. 4.
    """
    mean_logps = jnp.minimum(_f32(mean_logps), _MAX_MEAN_LOGP)
    return mean_logps - log1mexp(mean_logps)


def odds_ratio_loss(chosen_logps: ArrayLike, rejected_logps: ArrayLike) -> jax.Array:
    """ORPO's odds-ratio term: ``−log σ(log odds(y_w) − log odds(y_l))``.

    ``log odds(y) = ℓ − log(1 − e^ℓ)`` where ``ℓ`` is the per-token *mean* log-prob of ``y``
    under the policy (:func:`log_odds`, which caps ``ℓ`` at ``−1e−7``).

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
    return -jax.nn.log_sigmoid(log_odds(chosen) - log_odds(rejected))


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
