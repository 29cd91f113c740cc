"""Losses that anchor each log-ratio on its own: NCA, BCO-pair, SPPO-hard, APO-zero, APO-down.

DPO only constrains the margin ``h = r_c − r_r``; these losses also say where ``r_c = π_c −
ref_c`` and ``r_r = π_r − ref_r`` (sequence log-prob sums) should go in absolute terms, e.g.
the chosen likelihood up and the rejected one down. Each returns one unreduced float32 value
per pair, ``[B]``; they take the same four arguments as :func:`~jaxalign.dpo_loss`.
"""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from jaxalign.losses.preference import _log_ratios


def nca_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Noise Contrastive Alignment of a pair, anchoring both log-ratios.

    ``loss = −log σ(β r_c) − ½ log σ(−β r_c) − ½ log σ(−β r_r)``: the chosen response is
    classified as data against the pair as noise; at ``π = π_ref`` the loss is ``2 log 2``.
    This is the paper's NCA with ``K = 2`` and binary preference labels, identical to TRL's
    ``loss_type="nca_pair"``.

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: reward scale β (the implicit reward is ``β·r``).

    Returns:
      ``[B]`` float32 losses.

    References:
      Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards",
      arXiv:2402.05369.
    """
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    chosen, rejected = beta * chosen, beta * rejected
    return (
        -jax.nn.log_sigmoid(chosen)
        - 0.5 * jax.nn.log_sigmoid(-chosen)
        - 0.5 * jax.nn.log_sigmoid(-rejected)
    )


def bco_pair_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Binary-classifier loss on a pair: ``−log σ(β r_c) − log σ(−β r_r)``.

    The chosen response is classified desirable and the rejected one undesirable, with the
    implicit reward ``β r`` as the logit; at ``π = π_ref`` the loss is ``2 log 2``. The BCO
    paper subtracts a running reward baseline δ from each logit; TRL 1.16's
    ``loss_type="bco_pair"``, and this function, use ``δ = 0`` (:func:`~jaxalign.bco_loss`
    takes δ).

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: reward scale β.

    Returns:
      ``[B]`` float32 losses.

    References:
      Jung et al., "Binary Classifier Optimization for Large Language Model Alignment",
      arXiv:2404.04656.
    """
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return -jax.nn.log_sigmoid(beta * chosen) - jax.nn.log_sigmoid(-beta * rejected)


def sppo_hard_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Self-play preference optimisation with hard win probabilities.

    ``loss = (r_c − 1/(2β))² + (r_r + 1/(2β))²``: each log-ratio regresses on
    ``η (P − ½)`` with ``P = 1`` for the chosen and ``0`` for the rejected response; at
    ``π = π_ref`` it is ``2/(4β²)``. The paper's η is ``1/β`` here; it estimates ``P`` softly
    (PairRM) against the previous iterate as reference, while we, like TRL's
    ``loss_type="sppo_hard"``, take hard labels and whatever reference is passed.

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the reference (the previous iterate).
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: inverse step size β = 1/η.

    Returns:
      ``[B]`` float32 losses.

    References:
      Wu et al., "Self-Play Preference Optimization for Language Model Alignment",
      arXiv:2405.00675, Algorithm 1.
    """
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    target = 0.5 / beta
    return (chosen - target) ** 2 + (rejected + target) ** 2


def apo_zero_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """APO-zero: push the chosen likelihood up and the rejected one down, anchored at π_ref.

    ``loss = (1 − σ(β r_c)) + σ(β r_r)``, for chosen outputs better than the model's own. The
    paper writes ``−σ(β r_c) + σ(β r_r)``; we add the constant 1, as TRL's
    ``loss_type="apo_zero"`` does, so the loss lies in ``(0, 2)`` and is 1 at ``π = π_ref``
    (gradients are the paper's).

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: reward scale β.

    Returns:
      ``[B]`` float32 losses.

    References:
      D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions:
      Addressing Underspecification in Alignment", arXiv:2408.06266, eq. 7.
    """
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (1.0 - jax.nn.sigmoid(beta * chosen)) + jax.nn.sigmoid(beta * rejected)


def apo_down_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """APO-down: push both likelihoods down, the rejected one more, anchored at π_ref.

    ``loss = σ(β r_c) + (1 − σ(β (r_c − r_r)))``, for chosen outputs worse than the model's
    own. The paper writes ``σ(β r_c) − σ(β (r_c − r_r))``; we add the constant 1, as TRL's
    ``loss_type="apo_down"`` does, so the loss lies in ``(0, 2)`` and is 1 at ``π = π_ref``
    (gradients are the paper's).

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: reward scale β.

    Returns:
      ``[B]`` float32 losses.

    References:
      D'Oosterlinck et al., arXiv:2408.06266, eq. 8.
    """
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return jax.nn.sigmoid(beta * chosen) + (1.0 - jax.nn.sigmoid(beta * (chosen - rejected)))
