"""The metrics of one RLHF iteration, under the names TRL, OpenRLHF and verl users look for.

Always: ``score/mean``, ``score/std`` (raw scores of every sampled completion), ``kl`` (mean
sequence KL to the reference at rollout time, 0 without one), ``kl_coef``, ``entropy``,
``policy/clipfrac`` (``|ρ − 1| > ε``), ``policy/clipfrac_low`` / ``policy/clipfrac_high``
(TRL's ``clip_ratio/low_mean`` / ``high_mean``: clipped with ``A < 0`` below, ``A > 0`` above),
``policy/approx_kl``, ``loss/policy``, ``loss/value``, ``loss/total``, ``value/clipfrac``,
``response_length``, ``eos_fraction``, ``return/mean``, ``advantage/mean``, ``grad_norm``, and
``completions/mean_length``, ``/min_length``, ``/max_length``, ``/clipped_ratio`` (the share
that ran out of tokens before EOS) over every sampled completion.

With several samples per prompt: ``frac_reward_zero_std`` (share of prompt groups whose raw
rewards are all equal: no signal for a group estimator). With Python reward functions:
``rewards/<name>/mean`` and ``/std``. With ``kl_in="loss"`` and a reference: ``loss/kl``. With
dynamic sampling: ``dynamic_sampling/kept_fraction`` (informative share of sampled groups);
the update metrics then describe the kept groups, the sample metrics every sampled one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.masking import masked_mean
from jaxalign.train.rlhf_config import RLHFConfig

__all__ = ["rlhf_metrics"]


def _completion_metrics(lengths: jax.Array, has_eos: jax.Array) -> dict[str, jax.Array]:
    lengths = lengths.astype(jnp.float32)
    return {"completions/mean_length": jnp.mean(lengths),
            "completions/min_length": jnp.min(lengths),
            "completions/max_length": jnp.max(lengths),
            "completions/clipped_ratio": 1.0 - jnp.mean(has_eos.astype(jnp.float32))}


def rlhf_metrics(config: RLHFConfig, scored: dict, updates: dict, mask: jax.Array,
                 advantages: jax.Array, returns: jax.Array, kl_coef: jax.Array, *,
                 sampled_rewards: dict, sampled_has_eos: jax.Array, sampled_lengths: jax.Array,
                 text: Any = None, selection: dict | None = None) -> dict[str, jax.Array]:
    """Scalar metrics of an iteration: ``scored``/``updates``/``mask``/``advantages`` are the
    trained rows', ``sampled_*`` every sampled row's (the same rows without dynamic
    sampling); ``text`` the Python rewards, if any."""
    valid = mask > 0
    mean = jnp.mean
    raw = sampled_rewards["raw_scores"]
    metrics = {
        "score/mean": mean(raw), "score/std": jnp.std(raw),
        "kl": mean(jnp.sum(scored["kl"], axis=1)), "kl_coef": kl_coef,
        "entropy": scored["entropy"],
        "policy/clipfrac": mean(updates["clipfrac"]),
        "policy/clipfrac_low": mean(updates["clipfrac_low"]),
        "policy/clipfrac_high": mean(updates["clipfrac_high"]),
        "policy/approx_kl": mean(updates["approx_kl"]),
        "loss/policy": mean(updates["policy_loss"]), "loss/value": mean(updates["value_loss"]),
        "loss/total": mean(updates["loss"]), "value/clipfrac": mean(updates["value_clipfrac"]),
        "response_length": mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        "eos_fraction": mean(scored["has_eos"].astype(jnp.float32)),
        "return/mean": masked_mean(returns, valid),
        "advantage/mean": masked_mean(advantages, valid),
        "grad_norm": mean(updates["grad_norm"]),
        **_completion_metrics(sampled_lengths, sampled_has_eos),
    }
    if config.samples_per_prompt > 1:
        grouped = raw.reshape(-1, config.samples_per_prompt)
        zero_std = jnp.max(grouped, axis=1) == jnp.min(grouped, axis=1)
        metrics["frac_reward_zero_std"] = mean(zero_std.astype(jnp.float32))
    if text is not None:
        metrics.update(text.metrics(sampled_rewards["per_function"]))
    if "kl_loss" in updates:
        metrics["loss/kl"] = mean(updates["kl_loss"])
    if selection is not None:
        metrics["dynamic_sampling/kept_fraction"] = selection["kept_fraction"]
    return metrics
