"""jaxalign: a pure-JAX functional toolkit for aligning language models with preferences.

Layer 1 (pure math) is re-exported here: losses, advantage estimation, log-prob helpers, masked
reductions and KL controllers. Models, sampling, training steps and data live in submodules.
"""

__version__ = "0.1.0"

from jaxalign.advantages import gae, group_advantages, kl_shaped_rewards
from jaxalign.kl_control import AdaptiveKLController, FixedKLController, KLControllerState
from jaxalign.logprobs import gather_logprobs, sequence_logprobs, token_logprobs
from jaxalign.losses import (
    bradley_terry_loss,
    dpo_loss,
    entropy,
    ipo_loss,
    kl_penalty,
    log1mexp,
    log_odds,
    odds_ratio_loss,
    orpo_loss,
    ppo_clip_loss,
    ppo_loss,
    value_loss,
)
from jaxalign.masking import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLControllerState",
    "__version__",
    "bradley_terry_loss",
    "dpo_loss",
    "entropy",
    "gae",
    "gather_logprobs",
    "group_advantages",
    "ipo_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "log1mexp",
    "log_odds",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "odds_ratio_loss",
    "orpo_loss",
    "ppo_clip_loss",
    "ppo_loss",
    "sequence_logprobs",
    "token_logprobs",
    "value_loss",
]
