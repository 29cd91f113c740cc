"""The settings of one RLHF iteration: the single definition that ``make_rlhf_step`` reads and
``jaxalign ppo`` turns into flags and config-file keys (help text included).

Names follow TRL / OpenRLHF where they exist. No JAX here beyond the estimator names.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxalign.losses.policy import KL_ESTIMATORS
from jaxalign.settings import setting

__all__ = ["ADVANTAGE_ESTIMATORS", "RLHFConfig"]

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class RLHFConfig:
    """Hyperparameters of one RLHF iteration (see each field's help).

    Sampling: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``eos_id``, ``pad_id``.
    Rewards: ``kl_coef`` (β, the initial one if adaptive), ``kl_target`` (``None``: β stays
    fixed, as in TRL, OpenRLHF and verl by default; else adaptive towards this sequence KL over
    ``kl_horizon``), ``kl_estimator``, ``missing_eos_penalty``, ``whiten_rewards``,
    ``score_clip``. Advantages: ``advantage``, ``samples_per_prompt``, ``gamma``,
    ``gae_lambda``, ``whiten_advantages``. Update: ``ppo_epochs``, ``num_minibatches``,
    ``clip_eps``, ``value_clip``, ``vf_coef``, ``ent_coef``, ``shared_value_head``.
    """

    max_new_tokens: int = setting(32, "tokens sampled per completion")
    temperature: float = setting(1.0, "sampling temperature (0: greedy)")
    top_k: int = setting(0, "sample from the k likeliest tokens (0: all)")
    top_p: float = setting(1.0, "nucleus sampling mass")
    eos_id: int | None = setting(None, "token id that ends a completion (none: never ends)")
    pad_id: int = setting(0, "token id written after a completion ends")
    kl_coef: float = setting(0.05, "KL penalty coefficient beta (the initial one if adaptive)")
    kl_target: float | None = setting(None, "adapt beta towards this sequence KL (Ziegler et"
                                      " al. 2019); none: beta stays fixed")
    kl_horizon: float = setting(10_000.0, "horizon of the adaptive KL controller")
    kl_estimator: str = setting("k1", "per-token KL estimator (Schulman 2020)",
                                choices=KL_ESTIMATORS)
    missing_eos_penalty: float | None = setting(None, "subtracted from the score of"
                                                " completions without EOS (none: no penalty)")
    whiten_rewards: bool = setting(False, "whiten per-token rewards (GAE only)")
    score_clip: float | None = setting(None, "clip scores to [-X, X] (none: no clip)")
    advantage: Literal["gae", "grpo", "rloo"] = setting(
        "gae", "advantage estimator: GAE with a value model, or the critic-free GRPO / RLOO"
        " (samples_per_prompt >= 2)", choices=ADVANTAGE_ESTIMATORS)
    samples_per_prompt: int = setting(1, "completions sampled per prompt")
    gamma: float = setting(1.0, "discount")
    gae_lambda: float = setting(0.95, "GAE lambda")
    whiten_advantages: bool = setting(True, "whiten advantages over the batch (not with grpo)")
    ppo_epochs: int = setting(2, "passes over each rollout batch")
    num_minibatches: int = setting(2, "minibatches per pass")
    clip_eps: float = setting(0.2, "PPO ratio clip epsilon")
    value_clip: float | None = setting(0.2, "value clip range (none: unclipped)")
    vf_coef: float = setting(0.1, "value loss coefficient")
    ent_coef: float = setting(0.0, "entropy bonus coefficient")
    shared_value_head: bool = setting(False, "the value is a head on the policy's trunk (no"
                                      " separate value model; GAE only)")

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage must be one of {ADVANTAGE_ESTIMATORS}, got"
                             f" {self.advantage!r}")
        if self.advantage != "gae" and self.samples_per_prompt < 2:
            raise ValueError(f"advantage={self.advantage!r} needs samples_per_prompt >= 2, got"
                             f" {self.samples_per_prompt}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got"
                             f" {self.kl_estimator!r}")
        for name in ("max_new_tokens", "samples_per_prompt", "ppo_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.shared_value_head and self.advantage != "gae":
            raise ValueError("shared_value_head needs advantage='gae'")

    @property
    def uses_critic(self) -> bool:
        """Whether advantages come from a value function (GAE)."""
        return self.advantage == "gae"
