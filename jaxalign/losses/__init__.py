"""Pure alignment losses: Bradley–Terry, the DPO family, reference-free, unpaired, PPO.

Every function here is pure, takes keyword-only hyperparameters, computes in float32 even for
bfloat16 inputs (float64 stays float64), and works under ``jit``, ``vmap``, ``pmap`` and
``shard_map``: no value-dependent Python control flow, no I/O.

What they return:

- unreduced per-example ``[B]`` losses:

  - pairwise, on the four sequence log-probs (``preference.py``, ``dpo_variants.py``,
    ``anchored.py``): :func:`dpo_loss`, :func:`ipo_loss`, :func:`hinge_loss`,
    :func:`robust_dpo_loss`, :func:`exo_loss`, :func:`discopop_loss`, :func:`rpo_loss` (plus a
    chosen NLL), :func:`nca_loss`, :func:`bco_pair_loss`, :func:`sppo_hard_loss`,
    :func:`apo_zero_loss`, :func:`apo_down_loss`;
  - pairwise, reference-free (``preference.py``, ``reference_free.py``):
    :func:`bradley_terry_loss` (on rewards), :func:`odds_ratio_loss`, :func:`orpo_loss`,
    :func:`simpo_loss`, :func:`cpo_loss`;
  - unpaired, one completion and a ``desirable`` label each (``unpaired.py``):
    :func:`kto_loss`, :func:`bco_loss`;
- unreduced per-token ``[B, T]`` values: :func:`ppo_clip_loss`, :func:`value_loss`,
  :func:`kl_penalty`, and :func:`entropy` (``[B, T, V]`` logits to ``[B, T]`` entropies);
- elementwise helpers, same shape as the input: :func:`log1mexp`, :func:`log_odds`;
- ``[B, K, K]`` pair weights of ``[B, K]`` rankings: :func:`ranking_pair_weights`;
- baselines of the unpaired losses: :func:`kto_kl_baseline` returns a ``[]`` float32 KL
  estimate (no gradient); :func:`bco_baseline_init` / :func:`bco_baseline_update` are the
  ``(init, update)`` pair of a :class:`BCOBaselineState` (``mean``, ``count``: ``[]`` float32);
- *reduced* results: :func:`ppo_loss` returns ``(loss, metrics)``, the combined PPO objective
  (a float32 scalar; its policy term aggregated as ``loss_agg`` says) and a dict of scalar
  metrics; :func:`aggregate_loss` reduces per-token losses by token mean, sequence mean or
  Dr. GRPO's constant normaliser (:data:`LOSS_AGGREGATIONS`); :func:`clip_fractions` gives the
  low/high clip fractions;
- ``[B, T]`` GSPO log-ratios: :func:`sequence_log_ratio`.

Reduce the unreduced ones with :func:`jaxalign.masked_mean` (or ``jnp.mean``).
:data:`KL_ESTIMATORS` names the estimators :func:`kl_penalty` accepts.

Sequence log-probs passed to the preference losses are whatever the caller computed: sums over
completion tokens for DPO and its variants, CPO, KTO and BCO (as in the papers and TRL),
per-token means for IPO, ORPO and SimPO (as their authors do); RPO's and CPO's ``chosen_nll``
is a per-token mean. :func:`jaxalign.sequence_logprobs` computes either.
"""

from jaxalign.losses.anchored import (
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    nca_loss,
    sppo_hard_loss,
)
from jaxalign.losses.dpo_variants import (
    discopop_loss,
    exo_loss,
    hinge_loss,
    robust_dpo_loss,
    rpo_loss,
)
from jaxalign.losses.policy import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clip_fractions,
    entropy,
    kl_penalty,
    ppo_clip_loss,
    ppo_loss,
    sequence_log_ratio,
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
from jaxalign.losses.reference_free import cpo_loss, simpo_loss
from jaxalign.losses.unpaired import (
    BCOBaselineState,
    bco_baseline_init,
    bco_baseline_update,
    bco_loss,
    kto_kl_baseline,
    kto_loss,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "clip_fractions",
    "BCOBaselineState",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_baseline_init",
    "bco_baseline_update",
    "bco_loss",
    "bco_pair_loss",
    "bradley_terry_loss",
    "cpo_loss",
    "discopop_loss",
    "dpo_loss",
    "entropy",
    "exo_loss",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty",
    "kto_kl_baseline",
    "kto_loss",
    "log1mexp",
    "log_odds",
    "nca_loss",
    "odds_ratio_loss",
    "orpo_loss",
    "ppo_clip_loss",
    "ppo_loss",
    "ranking_pair_weights",
    "robust_dpo_loss",
    "rpo_loss",
    "simpo_loss",
    "sequence_log_ratio",
    "sppo_hard_loss",
    "value_loss",
]
