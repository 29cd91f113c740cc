"""Reference-free preference losses: SimPO and CPO.

Neither needs a reference model: the implicit reward is the policy's own (scaled) log-prob.
SimPO uses per-token *mean* log-probs, CPO sequence *sums* (as TRL does for each); both return
one unreduced float32 value per pair, ``[B]``. ORPO, also reference-free, is in
:mod:`jaxalign.losses.preference`.
"""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from jaxalign.losses._common import _f32, _same_shape


def simpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> jax.Array:
    """Simple Preference Optimization: ``−log σ(β (ℓ_c − ℓ_r) − γ)`` on mean log-probs.

    ``ℓ`` is the per-token *mean* log-prob of a completion under the policy (the paper's
    length-normalised reward ``(β/|y|) log π(y|x)``), and γ a target reward margin; at
    ``ℓ_c = ℓ_r`` the loss is ``softplus(γ)``. TRL's ``CPOTrainer(loss_type="simpo")`` computes
    ``−log σ(β ((ℓ_c − ℓ_r) − simpo_gamma/β))``, the same thing, so its ``simpo_gamma`` is our
    γ (not γ/β); note that it also adds ``cpo_alpha``·NLL (default 1.0) and label smoothing,
    which SimPO does not have, unless ``cpo_alpha=0``.

    Args:
      chosen_logps: ``[B]`` per-token mean log-probs of the chosen completions.
      rejected_logps: ``[B]`` per-token mean log-probs of the rejected completions.
      beta: reward scale β of the length-normalised reward.
      gamma: target reward margin γ, in reward units (TRL's ``simpo_gamma``).

    Returns:
      ``[B]`` float32 losses.

    References:
      Meng, Xia & Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
      arXiv:2405.14734, eq. 6.
    """
    chosen, rejected = _f32(chosen_logps), _f32(rejected_logps)
    _same_shape(chosen_logps=chosen, rejected_logps=rejected)
    return -jax.nn.log_sigmoid(beta * (chosen - rejected) - gamma)


def cpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    chosen_nll: ArrayLike,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
) -> jax.Array:
    """Contrastive Preference Optimization: ``−log σ(β (π_c − π_r)) + α·chosen_nll``.

    A reference-free DPO (the paper's ``L_prefer``, its uniform-reference limit) plus
    behaviour cloning of the chosen response (``L_NLL``). As in TRL's ``CPOTrainer`` with
    ``loss_type="sigmoid"``, ``π`` are summed log-probs and the NLL a per-token mean weighted
    by ``cpo_alpha`` = α; TRL averages the NLL over all chosen tokens of the batch at once,
    which equals the batch mean of our per-example means only for equal chosen lengths (the
    paper writes the NLL as ``−log π(y_w|x)``, a sum, with weight 1).

    Args:
      chosen_logps: ``[B]`` summed log-probs of the chosen completions under the policy.
      rejected_logps: ``[B]`` summed log-probs of the rejected completions.
      chosen_nll: ``[B]`` per-token mean negative log-likelihood of the chosen completion.
      beta: inverse temperature β of the preference term.
      alpha: weight α of the NLL term (TRL's ``cpo_alpha``; 1 in the paper).

    Returns:
      ``[B]`` float32 losses.

    References:
      Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of LLM
      Performance in Machine Translation", arXiv:2401.08417, §3.
    """
    chosen, rejected, chosen_nll = _f32(chosen_logps), _f32(rejected_logps), _f32(chosen_nll)
    _same_shape(chosen_logps=chosen, rejected_logps=rejected, chosen_nll=chosen_nll)
    return -jax.nn.log_sigmoid(beta * (chosen - rejected)) + alpha * chosen_nll
