"""The settings of one RLHF iteration: the single definition that ``make_rlhf_step`` reads and
``jaxalign ppo`` turns into flags and config-file keys (help text included).

Names follow TRL / OpenRLHF where they exist. No JAX here beyond the estimator names.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxalign.losses.policy import KL_ESTIMATORS
from jaxalign.settings import setting

__all__ = ["ADVANTAGE_ESTIMATORS", "GROUP_ESTIMATORS", "GRPOConfig", "LOSS_AGGREGATIONS",
           "RLHFConfig"]

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum_norm")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # advantages relative to the prompt's group


@dataclasses.dataclass(frozen=True)
class RLHFConfig:
    """Hyperparameters of one RLHF iteration (see each field's help).

    Sampling: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``eos_id``, ``pad_id``.
    Rewards: ``kl_coef`` (β, the initial one if adaptive), ``kl_target`` (``None``: β stays
    fixed, as in TRL, OpenRLHF and verl by default; else adaptive towards this sequence KL over
    ``kl_horizon``), ``kl_estimator``, ``kl_in`` (``"reward"``: ``−β·KL_t`` shapes the reward, as
    in PPO-RLHF; ``"loss"``: ``β·KL`` is a loss term, as in the GRPO paper), ``missing_eos_penalty``,
    ``whiten_rewards``, ``score_clip``. Advantages: ``advantage``, ``samples_per_prompt``,
    ``gamma``, ``gae_lambda``, ``whiten_advantages``, and DAPO's ``dynamic_sampling`` with
    ``oversample``. Update: ``ppo_epochs``, ``num_minibatches``, ``clip_eps`` (with
    ``clip_eps_low`` / ``clip_eps_high`` for DAPO's asymmetric clip, ``dual_clip``),
    ``importance_sampling_level`` (``"sequence"``: GSPO), ``loss_agg``, ``value_clip``,
    ``vf_coef``, ``ent_coef``, ``shared_value_head``.

    ``kl_coef = 0`` with a fixed β (``kl_target=None``) skips the reference model altogether
    (no reference forward pass; :func:`~jaxalign.train.rlhf.init_rlhf_state` keeps no reference
    params) and the ``kl`` metric is 0, as TRL's GRPO does with ``beta=0``.
    """

    max_new_tokens: int = setting(32, "tokens sampled per completion")
    temperature: float = setting(1.0, "sampling temperature (0: greedy)")
    top_k: int = setting(0, "sample from the k likeliest tokens (0: all)")
    top_p: float = setting(1.0, "nucleus sampling mass")
    eos_id: int | tuple[int, ...] | None = setting(
        None, "token id(s) that end a completion, e.g. a chat model's end-of-turn and"
        " end-of-text ids as a tuple (none: never ends)")
    pad_id: int = setting(0, "token id written after a completion ends")
    kl_coef: float = setting(0.05, "KL penalty coefficient beta (the initial one if adaptive)")
    kl_target: float | None = setting(None, "adapt beta towards this sequence KL (Ziegler et"
                                      " al. 2019); none: beta stays fixed")
    kl_horizon: float = setting(10_000.0, "horizon of the adaptive KL controller")
    kl_estimator: str | None = setting(None, "per-token KL estimator (Schulman 2020); none: k1"
                                       " with kl_in=reward (TRL's PPO), k3 with kl_in=loss (the"
                                       " GRPO paper, TRL's GRPO, verl's low_var_kl)",
                                       choices=KL_ESTIMATORS)
    kl_in: Literal["reward", "loss"] = setting(
        "reward", "where the KL penalty goes: reward (-beta*KL_t shapes the per-token reward or"
        " the sequence score) or loss (+beta*KL_t per token in the policy loss, as in the GRPO"
        " paper)", choices=("reward", "loss"))
    missing_eos_penalty: float | None = setting(None, "subtracted from the score of"
                                                " completions without EOS (none: no penalty)")
    whiten_rewards: bool = setting(False, "whiten per-token rewards (GAE only)")
    score_clip: float | None = setting(None, "clip scores to [-X, X] (none: no clip)")
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = setting(
        "gae", "advantage estimator: GAE with a value model, or critic-free: grpo (group mean/std),"
        " dr_grpo (group mean only), rloo (leave-one-out mean), reinforce_pp (REINFORCE++:"
        " whitened over the whole batch); the group ones need samples_per_prompt >= 2",
        choices=ADVANTAGE_ESTIMATORS)
    samples_per_prompt: int = setting(1, "completions sampled per prompt")
    gamma: float = setting(1.0, "discount")
    gae_lambda: float = setting(0.95, "GAE lambda")
    whiten_advantages: bool | None = setting(
        None, "whiten advantages over the batch's tokens; none: only for gae (and reinforce_pp,"
        " whose normalisation it is), not for grpo / dr_grpo / rloo, as in their papers")
    dynamic_sampling: bool = setting(False, "DAPO dynamic sampling: train only on prompt groups"
                                     " whose raw rewards are not all equal (group estimators)")
    oversample: int = setting(1, "prompts sampled per prompt trained on (dynamic sampling): a"
                              " batch of B prompts trains on B / oversample groups, informative"
                              " ones first")
    ppo_epochs: int = setting(2, "passes over each rollout batch")
    num_minibatches: int = setting(2, "minibatches per pass")
    clip_eps: float = setting(0.2, "PPO ratio clip epsilon")
    clip_eps_low: float | None = setting(None, "lower ratio clip: 1 - this (none: clip_eps)")
    clip_eps_high: float | None = setting(None, "upper ratio clip: 1 + this (none: clip_eps;"
                                          " DAPO's clip-higher uses 0.28)")
    dual_clip: float | None = setting(None, "dual-clip constant c > 1: the loss of tokens with"
                                      " negative advantage is capped at -c*A (none: off)")
    importance_sampling_level: Literal["token", "sequence"] = setting(
        "token", "importance ratio per token (PPO, GRPO) or per sequence (GSPO: exp of the"
        " sequence's mean log-ratio)", choices=("token", "sequence"))
    loss_agg: Literal["token_mean", "sequence_mean", "token_sum_norm"] = setting(
        "token_mean", "loss aggregation over a minibatch: token_mean (mean over all tokens, DAPO"
        " and TRL), sequence_mean (mean over sequences of their token means, the GRPO paper) or"
        " token_sum_norm (token sum / (sequences x max_new_tokens), Dr. GRPO)",
        choices=LOSS_AGGREGATIONS)
    value_clip: float | None = setting(0.2, "value clip range (none: unclipped)")
    vf_coef: float = setting(0.1, "value loss coefficient")
    ent_coef: float = setting(0.0, "entropy bonus coefficient")
    shared_value_head: bool = setting(False, "the value is a head on the policy's trunk (no"
                                      " separate value model; GAE only)")

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage must be one of {ADVANTAGE_ESTIMATORS}, got"
                             f" {self.advantage!r}")
        if self.advantage in GROUP_ESTIMATORS and self.samples_per_prompt < 2:
            raise ValueError(f"advantage={self.advantage!r} needs samples_per_prompt >= 2, got"
                             f" {self.samples_per_prompt}")
        for name, allowed in (("kl_estimator", KL_ESTIMATORS + (None,)),
                              ("kl_in", ("reward", "loss")),
                              ("importance_sampling_level", ("token", "sequence")),
                              ("loss_agg", LOSS_AGGREGATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("max_new_tokens", "samples_per_prompt", "ppo_epochs", "num_minibatches",
                     "oversample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.shared_value_head and self.advantage != "gae":
            raise ValueError("shared_value_head needs advantage='gae'")
        self._check_grpo_family()

    def _check_grpo_family(self) -> None:
        if self.dynamic_sampling and self.advantage not in GROUP_ESTIMATORS:
            raise ValueError("dynamic_sampling filters prompt groups: it needs advantage grpo,"
                             f" dr_grpo or rloo, got {self.advantage!r}")
        if self.oversample > 1 and not self.dynamic_sampling:
            raise ValueError("oversample > 1 needs dynamic_sampling=True")
        if self.kl_in == "loss" and self.uses_critic:
            raise ValueError("kl_in='loss' is for the critic-free estimators; GAE shapes its"
                             " rewards with the KL (kl_in='reward')")
        for name in ("clip_eps", "clip_eps_low", "clip_eps_high"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")

    @property
    def uses_critic(self) -> bool:
        """Whether advantages come from a value function (GAE)."""
        return self.advantage == "gae"

    @property
    def uses_reference(self) -> bool:
        """Whether the step needs the reference policy: not with a fixed β of 0."""
        return not (self.kl_coef == 0.0 and self.kl_target is None)

    @property
    def kl_estimator_used(self) -> str:
        """``kl_estimator``, or its default for ``kl_in``: k1 in the reward, k3 in the loss."""
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k3" if self.kl_in == "loss" else "k1"

    @property
    def whitens_advantages(self) -> bool:
        """``whiten_advantages``, or its default: whiten for gae and reinforce_pp only."""
        if self.whiten_advantages is not None:
            return self.whiten_advantages
        return self.advantage in ("gae", "reinforce_pp")


def _default(name: str, value: object) -> dataclasses.Field:
    """``RLHFConfig``'s field ``name`` (its help and choices) with another default."""
    field = RLHFConfig.__dataclass_fields__[name]
    return dataclasses.field(default=value, metadata=field.metadata)


@dataclasses.dataclass(frozen=True)
class GRPOConfig(RLHFConfig):
    """:class:`RLHFConfig` with GRPO's defaults (Shao et al. 2024, arXiv:2402.03300, as TRL's
    ``GRPOTrainer`` sets them): group-normalised advantages over 8 samples per prompt, the KL
    (k3) in the loss with β = 0 (no reference model, TRL's default since DAPO and Dr. GRPO
    found it unnecessary), one on-policy update per batch (ratio 1), DAPO's token-mean loss.
    Every other field and every check is :class:`RLHFConfig`'s; ``jaxalign grpo`` embeds it."""

    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = _default(
        "advantage", "grpo")
    samples_per_prompt: int = _default("samples_per_prompt", 8)
    kl_coef: float = _default("kl_coef", 0.0)
    kl_in: Literal["reward", "loss"] = _default("kl_in", "loss")
    ppo_epochs: int = _default("ppo_epochs", 1)
    num_minibatches: int = _default("num_minibatches", 1)
