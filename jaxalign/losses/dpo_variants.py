"""Losses on the DPO log-ratios: hinge (SLiC/RSO), robust DPO, EXO, DiscoPOP and RPO.

Every loss here takes the four sequence log-prob *sums* that :func:`~jaxalign.dpo_loss` takes
and is a function of the DPO margin ``h = (π_c − ref_c) − (π_r − ref_r)`` (RPO adds an NLL
term). Losses that anchor each log-ratio on its own (NCA, BCO-pair, SPPO, APO) are in
:mod:`jaxalign.losses.anchored`. Each returns one unreduced float32 value per pair, ``[B]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.losses._common import _f32, _same_shape
from jaxalign.losses.preference import _preference_margin, dpo_loss

# Cap on the log of DiscoPOP's weighted exponential term: e^50 ≈ 5e21 is finite in float32.
_DISCOPOP_MAX_LOG_EXP = 50.0


def hinge_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Hinge loss on the reference-normalised margin: ``relu(1 − β h)``.

    ``h`` is the DPO margin. The loss is 1 at ``h = 0`` and 0 once ``h ≥ 1/β``. SLiC-HF's
    calibration loss is ``max(0, δ − log π(y_w) + log π(y_l))`` on raw policy log-probs plus a
    regulariser; we follow TRL's ``loss_type="hinge"`` (RSO's form): the reference-normalised
    margin with ``δ = 1/β``, scaled by β, and no regulariser.

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: inverse margin β (the hinge's margin on ``h`` is ``1/β``).

    Returns:
      ``[B]`` float32 losses.

    References:
      Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
      arXiv:2305.10425. Liu et al., "Statistical Rejection Sampling Improves Preference
      Optimization", arXiv:2309.06657 (the normalised hinge).
    """
    h = _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return jax.nn.relu(1.0 - beta * h)


def robust_dpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Robust DPO: an unbiased DPO loss under preference labels flipped with probability ε.

    ``loss = ((1 − ε)·ℓ(h) − ε·ℓ(−h)) / (1 − 2ε)`` with ``ℓ(h) = −log σ(β h)``. Unlike
    conservative DPO (:func:`~jaxalign.dpo_loss` with ``label_smoothing``) it is unbounded
    below for ``ε > 0`` (about ``−εβh/(1 − 2ε)`` for large ``h``); ``ε = 0`` is DPO. TRL's
    ``loss_type="robust"`` only warns for ``ε`` outside ``[0, 0.5)``; we raise.

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: inverse temperature β of the KL constraint.
      label_smoothing: flip rate ε, a Python float in ``[0, 0.5)``.

    Returns:
      ``[B]`` float32 losses.

    Raises:
      ValueError: if ``label_smoothing`` is outside ``[0, 0.5)``.

    References:
      Chowdhury, Kini & Natarajan, "Provably Robust DPO: Aligning Language Models with Noisy
      Feedback", arXiv:2403.00409.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    logits = beta * _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    eps = label_smoothing
    clean, flipped = -jax.nn.log_sigmoid(logits), -jax.nn.log_sigmoid(-logits)
    return ((1.0 - eps) * clean - eps * flipped) / (1.0 - 2.0 * eps)


def exo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> jax.Array:
    """EXO-pref: reverse KL from the policy's pair distribution to the (smoothed) labels.

    With ``q_w = σ(β h)`` and ``q_l = σ(−β h)`` (the softmax of the two implicit rewards):
    ``loss = q_w (log q_w − log(1 − ε)) + q_l (log q_l − log ε)``, ``KL(q ‖ (1 − ε, ε))``. It
    is 0 at ``β h = log((1 − ε)/ε)`` and ``−log 2 − ½ log(ε(1 − ε))`` at ``h = 0``. Same as
    TRL's ``loss_type="exo_pair"``; our default ε = 1e−3 is the paper's (TRL's default 0 raises).

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: inverse temperature β (``β_π`` in the paper).
      label_smoothing: label probability ε of the rejected response, a Python float in
        ``(0, 0.5)``.

    Returns:
      ``[B]`` float32 losses.

    Raises:
      ValueError: if ``label_smoothing`` is outside ``(0, 0.5)``.

    References:
      Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment",
      arXiv:2402.00856, eq. 16.
    """
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in (0, 0.5); got {label_smoothing}")
    logits = beta * _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    log_q_w, log_q_l = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    log_p_w, log_p_l = jnp.log1p(-label_smoothing), jnp.log(label_smoothing)
    return jnp.exp(log_q_w) * (log_q_w - log_p_w) + jnp.exp(log_q_l) * (log_q_l - log_p_l)


def discopop_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    tau: float = 0.05,
) -> jax.Array:
    """DiscoPOP (log-ratio modulated loss): DPO's logistic loss blended with an exponential one.

    With ``z = β h`` and ``m = σ(z / τ)``: ``loss = −log σ(z)·(1 − m) + exp(−z)·m``; at
    ``h = 0`` it is ``(1 + log 2)/2``. Same as TRL's ``loss_type="discopop"`` except that we
    compute ``exp(−z)·m`` as ``exp(log σ(z/τ) − z)`` with the exponent capped at 50 (instead
    of clipping ``z``), so values and gradients stay finite where TRL's ``exp(−z)·m`` is
    ``inf·0 = nan`` (float32, ``z < −88``); the cap only bites for ``τ > 1``, where the exact
    loss grows like ``exp(|z|(1 − 1/τ))``.

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      beta: inverse temperature β.
      tau: temperature τ of the mixing weight (0.05 in the paper).

    Returns:
      ``[B]`` float32 losses.

    References:
      Lu, Holt, Fanconi, Chan, Foerster, van der Schaar & Lange, "Discovering Preference
      Optimization Algorithms with and for Large Language Models", arXiv:2406.08414, eq. 5.
    """
    logits = beta * _preference_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    log_mix = jax.nn.log_sigmoid(logits / tau)
    logistic = -jax.nn.log_sigmoid(logits)
    weighted_exponential = jnp.exp(jnp.minimum(log_mix - logits, _DISCOPOP_MAX_LOG_EXP))
    return logistic * (1.0 - jnp.exp(log_mix)) + weighted_exponential


def rpo_loss(
    policy_chosen_logps: ArrayLike,
    policy_rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    chosen_nll: ArrayLike,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    label_smoothing: ArrayLike = 0.0,
) -> jax.Array:
    """RPO (iterative reasoning preference optimisation): DPO plus α·NLL of the chosen response.

    ``loss = dpo_loss(...) + α·chosen_nll``; ``α = 0`` is DPO. The paper's NLL is the chosen
    sequence's NLL divided by its length, as ``chosen_nll`` here; TRL 1.16 expresses RPO as
    ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, α]`` and averages the NLL over all
    chosen tokens of the batch at once, which equals the batch mean of ours only when the
    chosen completions have equal lengths.

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      policy_rejected_logps: ``[B]`` the same for the rejected completions.
      ref_chosen_logps: ``[B]`` chosen log-probs under the frozen reference.
      ref_rejected_logps: ``[B]`` rejected log-probs under the reference.
      chosen_nll: ``[B]`` per-token mean negative log-likelihood of the chosen completion under
        the policy (usually ``−sequence_logprobs(..., average=True)``).
      beta: inverse temperature β of the DPO term.
      alpha: weight α of the NLL term (1 in the paper).
      label_smoothing: ε of the DPO term, as in :func:`~jaxalign.dpo_loss`.

    Returns:
      ``[B]`` float32 losses.

    References:
      Pang et al., "Iterative Reasoning Preference Optimization", arXiv:2404.19733.
    """
    chosen_nll = _f32(chosen_nll)
    _same_shape(policy_chosen_logps=jnp.asarray(policy_chosen_logps), chosen_nll=chosen_nll)
    dpo = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, label_smoothing=label_smoothing,
    )
    return dpo + alpha * chosen_nll
