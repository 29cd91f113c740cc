"""Evaluating aligned policies against their SFT starting point (layer 3: host-side numbers).

What is measured, for a policy ``π`` and a reference ``π_SFT`` on the same prompts:

* **gold reward**: mean of a scoring function (any ``texts -> [N]`` callable; the demo uses
  :func:`jaxalign.demo.task.gold_reward`) over completions sampled from ``π`` at temperature 1;
* **KL(π‖π_SFT)**, sequence level, from the policy's own samples:
  ``KL ≈ mean_i Σ_t [log π(y_it | y_i<t) − log π_SFT(y_it | y_i<t)]`` — an unbiased
  Monte-Carlo estimate of the KL between the two distributions over whole completions (nats
  per completion, as the DPO paper's Figure 2 plots it); exactly 0 for identical models;
* **win rate vs SFT**: each prompt gets one completion from ``π`` and one from ``π_SFT``;
  the gold reward judges, a win counts 1, a tie ½, a loss 0; the win rate is the mean outcome,
  with a percentile **bootstrap 95% confidence interval** over prompts;
* for PPO, the **gold reward curve** over iterations (:func:`curve_improvement` compares its
  first and last 10%).

Plots are in :mod:`jaxalign.plots`: ``plot_reward_curve`` and ``plot_frontier`` (gold reward
against KL, one line per method and its swept hyperparameter, like Figure 2 of Rafailov et al. 2023, arXiv:2305.18290).

``report.json`` (written by ``python -m jaxalign.demo``) has this schema::

    {
      "config": {...},                        # the DemoConfig that produced it
      "quick": bool,
      "corpus": {"reviews": int, "positive_share": float, "negative_share": float,
                 "gold_mean": float},
      "prompts": {"preference_prompts": int, "ppo_prompts": int, "eval_prompts": int},
      "tokenizer": {"vocab_size": int, "completion_tokens_p50": float,
                    "completion_tokens_max": int},
      "sft": {"steps": int, "first_nll": float, "final_nll": float, "truncated_reviews": int},
      "preferences": {"pairs_train": int, "pairs_heldout": int, "ties_dropped": int,
                      "unfinished_empty_or_identical_dropped": int,
                      "label_agreement_with_gold": float,   # share of labels = gold order
                      "bt_temperature": float, "sft_sample_gold_mean": float},
      "reward_model": {"heldout_accuracy": float,  # RM ranks the gold-better response higher
                       "heldout_label_accuracy": float,    # the same, vs the noisy labels
                       "train_accuracy": float, "steps": int, "heldout_pairs": int},
      "methods": {                            # "sft", "ppo", "dpo", "ipo", "orpo"
        NAME: {"gold_reward": float,          # mean gold reward of n samples
               "gold_reward_se": float,       # its standard error
               "kl_to_sft": float,            # nats per completion (see above)
               "kl_to_sft_se": float,
               "win_rate_vs_sft": float,      # ties count 1/2
               "win_rate_ci": [lo, hi],       # bootstrap 95% interval
               "n": int,                      # prompts evaluated
               "examples": [str, ...],        # a few sampled reviews (prompt + completion)
               "hyperparameters": {...}}      # beta / lam / kl_coef_init ... of the run
      },                                      # "sft" is an independent SFT sample set
      "ppo_curve": {"iteration": [int],       # main (adaptive-KL) run, one entry per iteration
                    "gold_reward": [float], "gold_reward_se": [float],
                    "rm_score": [float], "kl": [float], "kl_coef": [float],
                    "response_length": [float],
                    "improvement": {...}},    # curve_improvement(...) of the per-sample rewards
      "frontier": [{"method": str, "param": str, "value": float, "run": str,
                    "gold_reward": float, "kl_to_sft": float, "win_rate_vs_sft": float,
                    "label": str, "kl_closed_form": bool}],  # last two: best-of-n points only
      "best_of_n": [{"n": int,                # samples per prompt; the reward model picks one
                     "gold_reward": float, "gold_reward_se": float,
                     "win_rate_vs_sft": float, "win_rate_ci": [lo, hi],
                     "prompts": int,
                     "kl_closed_form": float,  # log n − (n−1)/n, an upper bound on the KL
                     "reward_model_score": float,   # mean learned reward of the picks
                     "finished_share": float,       # picks that end with EOS
                     "examples": [str, ...]}],
      "rlaif": {"judge": str,                 # the reward model, P(a ≻ b) = σ(r_a − r_b)
                "label_agreement": float,     # judge prefers the gold-better response, held out
                "label_agreement_pairs": str, # which pairs that is measured on
                "label_agreement_train": float,   # the same on the pairs the judge trained on
                "n_pairs": int, "n_pairs_heldout": int,
                "labels": {"judge": str, SPLIT: {"pairs": int, "agreement_with_gold": float,
                                                 "agreement_with_annotator": float,
                                                 "annotator_agreement_with_gold": float,
                                                 "mean_p_chosen": float}},  # train, heldout
                "dpo": {...}},                # DPO on the AI labels: a "methods" entry
      "stages": {"ran": [STAGE], "skipped": [STAGE]},   # skipped = reused from the cache
      "targets": [{"name": str, "value": float, "threshold": str, "passed": bool}],
      "passed": bool,                         # every target met
      "enforced": bool,                       # false with --quick (exit status ignores them)
      "timings_s": {STAGE: float},            # this process (0.0 for a reused stage)
      "stage_seconds_when_run": {STAGE: float},
      "total_wall_s": float                   # this process, imports and compilation included
    }
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxalign.batching import map_batches
from jaxalign.sampling import make_generate
from jaxalign.train.completion import completion_sums

__all__ = [
    "Completions", "bootstrap_ci", "curve_improvement", "evaluate_policy", "mean_and_se",
    "sample_completions", "sequence_kl", "summarize_rewards",
    "win_outcomes", "win_rate", "win_rate_with_ci",
]


class Completions(NamedTuple):
    """Sampled completions (host numpy arrays).

    Attributes:
      prompt_ids, prompt_mask: ``[N, P]`` int32, left-padded prompts.
      tokens, completion_mask: ``[N, C]`` int32; mask 1 through EOS.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    completion_mask: np.ndarray


# ----------------------------------------------------------------------------- statistics
def mean_and_se(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(mean, standard error of the mean)``; the error is 0 for fewer than two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("mean_and_se needs at least one value")
    se = float(np.std(values, ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0
    return float(np.mean(values)), se


def win_outcomes(rewards: np.ndarray, baseline_rewards: np.ndarray) -> np.ndarray:
    """Per-prompt outcome ``[N]``: 1 if ``rewards > baseline``, ½ on a tie, 0 otherwise."""
    rewards = np.asarray(rewards, dtype=np.float64)
    baseline_rewards = np.asarray(baseline_rewards, dtype=np.float64)
    if rewards.shape != baseline_rewards.shape or rewards.ndim != 1:
        raise ValueError(f"need two [N] arrays; got {rewards.shape} and {baseline_rewards.shape}")
    ties = np.where(rewards == baseline_rewards, 0.5, 0.0)
    return np.where(rewards > baseline_rewards, 1.0, ties)


def win_rate(rewards: np.ndarray, baseline_rewards: np.ndarray) -> float:
    """Mean of :func:`win_outcomes`: ``(wins + ties/2) / N``."""
    return float(np.mean(win_outcomes(rewards, baseline_rewards)))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``values`` (Efron & Tibshirani 1993).

    Resamples the ``N`` values with replacement ``n_resamples`` times and returns the
    ``(1 − confidence)/2`` and ``(1 + confidence)/2`` quantiles of the resampled means.
    Deterministic for a given ``seed``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty [N] array, got shape {values.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // values.size)  # bound the [chunk, N] index matrix
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        rows = rng.integers(0, values.size, (stop - start, values.size))
        means[start:stop] = values[rows].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def win_rate_with_ci(
    rewards: np.ndarray, baseline_rewards: np.ndarray, *, confidence: float = 0.95,
    n_resamples: int = 2000, seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """``(win rate, (low, high))``: :func:`win_rate` and a bootstrap interval over prompts."""
    outcomes = win_outcomes(rewards, baseline_rewards)
    interval = bootstrap_ci(outcomes, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return float(np.mean(outcomes)), interval


def summarize_rewards(
    rewards: Sequence[float] | np.ndarray, baseline_rewards: Sequence[float] | np.ndarray, *,
    seed: int = 0,
) -> dict[str, Any]:
    """Gold reward (mean ± SE) and win rate vs the baseline (bootstrap 95% CI) of ``[N]`` rewards.

    The reward half of :func:`evaluate_policy`'s entry, for completions obtained some other way
    (best-of-N picks): ``{"gold_reward", "gold_reward_se", "win_rate_vs_sft", "win_rate_ci",
    "n"}``.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    gold, gold_se = mean_and_se(rewards)
    rate, (low, high) = win_rate_with_ci(rewards, np.asarray(baseline_rewards), seed=seed)
    return {"gold_reward": gold, "gold_reward_se": gold_se, "win_rate_vs_sft": rate,
            "win_rate_ci": [low, high], "n": int(rewards.size)}


def curve_improvement(
    rewards_per_iteration: Sequence[Sequence[float] | np.ndarray], *, fraction: float = 0.1
) -> dict[str, float]:
    """Compare the first and last ``fraction`` of a reward curve.

    Pools the per-sample rewards of the first ``k = max(1, round(fraction·T))`` iterations and
    of the last ``k``, and returns their means, the difference ``improvement = last − first``
    and its standard error ``se = sqrt(s²_first/n_first + s²_last/n_last)``.
    """
    if not rewards_per_iteration:
        raise ValueError("empty reward curve")
    count = max(1, int(round(fraction * len(rewards_per_iteration))))
    first = np.concatenate([np.ravel(r) for r in rewards_per_iteration[:count]]).astype(np.float64)
    last = np.concatenate([np.ravel(r) for r in rewards_per_iteration[-count:]]).astype(np.float64)
    first_mean, first_se = mean_and_se(first)
    last_mean, last_se = mean_and_se(last)
    return {"iterations_pooled": count, "first_mean": first_mean, "last_mean": last_mean,
            "improvement": last_mean - first_mean, "se": math.hypot(first_se, last_se)}


# ----------------------------------------------------------------------------- model side
def sample_completions(
    model: Any,
    params: Any,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    key: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int = 0,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> Completions:
    """Samples one completion per prompt with :func:`jaxalign.sampling.make_generate`.

    Prompts ``[N, P]`` (left-padded) are processed ``batch_size`` at a time; a last partial
    batch is padded by repeating rows, so every call has the same shape (one compilation).
    Batch ``i`` uses ``fold_in(key, i)``.
    """
    generate = make_generate(model, max_new_tokens=max_new_tokens, temperature=temperature,
                             eos_id=eos_id, pad_id=pad_id)
    prompt_ids, prompt_mask = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)

    def sample(index, ids, mask):
        out = generate(params, ids, mask, jax.random.fold_in(key, index))
        return out.tokens, out.completion_mask

    tokens, masks = map_batches(sample, (prompt_ids, prompt_mask), batch_size)
    return Completions(prompt_ids, prompt_mask, tokens, masks)


@functools.lru_cache(maxsize=16)
def _make_log_ratio_fn(model: Any) -> Callable:
    @jax.jit
    def log_ratio(params, ref_params, ids, attention_mask, completion_mask):
        def sequence_logps(p):  # the chunked head, completion positions only
            return completion_sums(model, p, ids, attention_mask, completion_mask)

        return sequence_logps(params) - sequence_logps(ref_params)

    return log_ratio


def sequence_kl(
    model: Any,
    params: Any,
    ref_params: Any,
    completions: Completions,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Per-sample ``Σ_t log π(y_t) − log π_ref(y_t)`` over completion tokens, ``[N]``.

    Its mean over samples drawn from ``π`` (at temperature 1) estimates ``KL(π‖π_ref)`` per
    completion. The full sequence is the left-padded prompt followed by the completion; position
    ids come from the attention mask, exactly as the sampler saw them.
    """
    ids = np.concatenate([completions.prompt_ids, completions.tokens], axis=1)
    attention = np.concatenate([completions.prompt_mask, completions.completion_mask], axis=1)
    completion = np.concatenate(
        [np.zeros_like(completions.prompt_mask), completions.completion_mask], axis=1)
    fn = _make_log_ratio_fn(model)
    values = map_batches(lambda _, *batch: fn(params, ref_params, *batch),
                         (ids, attention, completion), batch_size)
    return values.astype(np.float64)


def evaluate_policy(
    model: Any,
    params: Any,
    ref_params: Any,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    key: jax.Array,
    *,
    score_fn: Callable[[list[str]], np.ndarray],
    decode_fn: Callable[[np.ndarray, np.ndarray], list[str]],
    baseline_rewards: np.ndarray,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int = 0,
    batch_size: int = 64,
    n_examples: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Gold reward, KL to the reference and win rate vs the baseline of one policy.

    Args:
      model, params: the policy (a ``CausalLM``).
      ref_params: the reference (SFT) parameters for the same model.
      prompt_ids, prompt_mask: ``[N, P]`` left-padded prompts.
      key: sampling key.
      score_fn: ``texts -> [N]`` gold rewards.
      decode_fn: ``(tokens [N, C], completion_mask [N, C]) -> texts``.
      baseline_rewards: ``[N]`` gold rewards of the reference's completions of the same prompts.

    Returns:
      The per-method entry of ``report.json`` (see the module docstring), plus ``rewards``
      (a list, per prompt) for further statistics.
    """
    completions = sample_completions(model, params, prompt_ids, prompt_mask, key,
                                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                     batch_size=batch_size)
    texts = decode_fn(completions.tokens, completions.completion_mask)
    prompts = decode_fn(completions.prompt_ids[:n_examples], completions.prompt_mask[:n_examples])
    rewards = np.asarray(score_fn(texts), dtype=np.float64)
    kl = sequence_kl(model, params, ref_params, completions, batch_size=batch_size)
    kl_mean, kl_se = mean_and_se(kl)
    return {**summarize_rewards(rewards, baseline_rewards, seed=seed),
            "kl_to_sft": kl_mean, "kl_to_sft_se": kl_se,
            "examples": [p + t for p, t in zip(prompts, texts[:n_examples])],
            "rewards": rewards.tolist()}
