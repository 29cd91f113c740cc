"""Pure alignment losses: Bradley–Terry, DPO (and conservative DPO), IPO, ORPO, PPO.

Every function here is pure, takes keyword-only hyperparameters, computes in float32 even for
bfloat16 inputs (float64 stays float64), and works under ``jit``, ``vmap``, ``pmap`` and
``shard_map``: no value-dependent Python control flow, no I/O.

What they return:

- unreduced per-example ``[B]`` losses: :func:`bradley_terry_loss`, :func:`dpo_loss`,
  :func:`ipo_loss`, :func:`odds_ratio_loss`, :func:`orpo_loss`;
- unreduced per-token ``[B, T]`` values: :func:`ppo_clip_loss`, :func:`value_loss`,
  :func:`kl_penalty`, and :func:`entropy` (``[B, T, V]`` logits to ``[B, T]`` entropies);
- elementwise helpers, same shape as the input: :func:`log1mexp`, :func:`log_odds`;
- ``[B, K, K]`` pair weights of ``[B, K]`` rankings: :func:`ranking_pair_weights`;
- one *reduced* result: :func:`ppo_loss` returns ``(loss, metrics)``, the masked mean over
  valid tokens of the combined PPO objective (a float32 scalar) and a dict of scalar metrics.

Reduce the unreduced ones with :func:`jaxalign.masked_mean` (or ``jnp.mean``).
:data:`KL_ESTIMATORS` names the estimators :func:`kl_penalty` accepts.

Sequence log-probs passed to the preference losses are whatever the caller computed: sums over
completion tokens for DPO (as in the paper and TRL), per-token means for IPO and ORPO (as their
authors do). :func:`jaxalign.sequence_logprobs` computes either.
"""

from jaxalign.losses.policy import (
    KL_ESTIMATORS,
    entropy,
    kl_penalty,
    ppo_clip_loss,
    ppo_loss,
    value_loss,
)
from jaxalign.losses.preference import (
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    log1mexp,
    log_odds,
    odds_ratio_loss,
    orpo_loss,
    ranking_pair_weights,
)

__all__ = [
    "KL_ESTIMATORS",
    "bradley_terry_loss",
    "dpo_loss",
    "entropy",
    "ipo_loss",
    "kl_penalty",
    "log1mexp",
    "log_odds",
    "odds_ratio_loss",
    "orpo_loss",
    "ppo_clip_loss",
    "ppo_loss",
    "ranking_pair_weights",
    "value_loss",
]
