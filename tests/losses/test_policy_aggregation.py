"""The GRPO family's loss pieces in ``jaxalign/losses/policy.py``: loss aggregation (token mean,
sequence mean, Dr. GRPO's constant normaliser), asymmetric clipping (DAPO), low/high clip
fractions and GSPO's sequence-level ratio, against float64 references of the papers' formulas
and the invariances users rely on (gradient accumulation, masked tokens)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxalign as ja
from jaxalign import testing as jt

MODES = ("token_mean", "sequence_mean", "token_sum_norm")


def np_aggregate(per_token, mask, mode):
    per_token, valid = np.float64(per_token), mask > 0
    if mode == "token_mean":  # DAPO eq. 12
        return np.sum(per_token * valid) / max(valid.sum(), 1)
    if mode == "sequence_mean":  # GRPO paper eq. 3
        return np.mean([np.sum(row * v) / max(v.sum(), 1) for row, v in zip(per_token, valid)])
    return np.sum(per_token * valid) / (per_token.shape[0] * per_token.shape[1])  # Dr. GRPO


@given(jt.masked_rollouts(), st.sampled_from(MODES))
def test_aggregate_loss_matches_float64_reference(rollout, mode):
    got = ja.aggregate_loss(rollout["rewards"], rollout["mask"], mode)
    expected = np_aggregate(rollout["rewards"], rollout["mask"], mode)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    junk = np.where(rollout["mask"] > 0, rollout["rewards"], np.nan)  # masked tokens: no effect
    np.testing.assert_array_equal(ja.aggregate_loss(junk, rollout["mask"], mode), got)


@given(jt.masked_rollouts(batch_size=st.integers(2, 6)), st.sampled_from(MODES), st.data())
def test_micro_batches_normalised_globally_sum_to_the_batch_loss(rollout, mode, data):
    """Gradient accumulation: each micro-batch divided by the whole batch's token (or sequence)
    count, summed, is the whole batch's loss — for every aggregation."""
    per_token, mask = rollout["rewards"], rollout["mask"]
    split = data.draw(st.integers(1, per_token.shape[0] - 1))
    whole = ja.aggregate_loss(per_token, mask, mode)
    counts = {"num_tokens": max(mask.sum(), 1)} if mode == "token_mean" else {
        "num_sequences": per_token.shape[0]}
    parts = [ja.aggregate_loss(per_token[rows], mask[rows], mode, **counts)
             for rows in (slice(0, split), slice(split, None))]
    np.testing.assert_allclose(sum(parts), whole, rtol=1e-5, atol=1e-5)


def test_per_micro_batch_token_mean_is_not_the_batch_token_mean():
    """The bug the global count avoids: micro-batches of unequal token counts, each averaged on
    its own, weigh their tokens unequally."""
    per_token = jnp.array([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]])
    whole = ja.aggregate_loss(per_token, mask)  # (4 + 5) / 5
    naive = np.mean([ja.aggregate_loss(per_token[i:i + 1], mask[i:i + 1]) for i in range(2)])
    np.testing.assert_allclose(whole, 9 / 5, rtol=1e-6)
    np.testing.assert_allclose(naive, 3.0, rtol=1e-6)


def test_aggregations_weigh_lengths_as_documented():
    per_token = jnp.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_allclose(ja.aggregate_loss(per_token, mask, "token_mean"), 8 / 5)
    np.testing.assert_allclose(ja.aggregate_loss(per_token, mask, "sequence_mean"), 2.5)
    np.testing.assert_allclose(ja.aggregate_loss(per_token, mask, "token_sum_norm"), 1.0)
    np.testing.assert_allclose(
        ja.aggregate_loss(per_token, mask, "token_sum_norm", max_tokens=8), 0.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        ja.aggregate_loss(per_token, mask, "mean")


# ------------------------------------------------------------------ asymmetric clipping
def np_clip_loss(ratio, advantages, low, high):
    ratio, advantages = np.float64(ratio), np.float64(advantages)
    return -np.minimum(ratio * advantages, np.clip(ratio, 1 - low, 1 + high) * advantages)


@given(jt.logps((2, 5), min_value=-3.0), jt.logps((2, 5), min_value=-3.0),
       jt.rewards((2, 5), bound=3.0), st.floats(0.0, 0.5), st.floats(0.0, 0.5))
def test_asymmetric_clip_matches_dapo_eq10(logps, old_logps, advantages, low, high):
    got = ja.ppo_clip_loss(logps, old_logps, advantages, clip_eps_low=low, clip_eps_high=high)
    ratio = np.exp(np.float64(logps) - np.float64(old_logps))
    np.testing.assert_allclose(got, np_clip_loss(ratio, advantages, low, high), rtol=1e-4,
                               atol=1e-4)


def test_symmetric_defaults_are_unchanged():
    logps, old = jnp.log(jnp.array([[1.5, 1.0, 0.7, 2.0]])), jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -1.0, -2.0, 1.0]])
    np.testing.assert_array_equal(ja.ppo_clip_loss(logps, old, adv, clip_eps=0.2),
                                  ja.ppo_clip_loss(logps, old, adv, clip_eps=0.2,
                                                   clip_eps_low=0.2, clip_eps_high=0.2))


def test_clip_fractions_count_the_clipped_side_with_its_advantage_sign():
    # ratios 1.5 (A>0, above 1+0.28), 1.25 (A>0, inside with clip-higher), 0.7 (A<0, below),
    # 0.7 (A>0: the min keeps the unclipped term, not counted), 2.0 (masked)
    logps = jnp.log(jnp.array([[1.5, 1.25, 0.7, 0.7, 2.0]]))
    old, mask = jnp.zeros((1, 5)), jnp.array([[1, 1, 1, 1, 0]])
    adv = jnp.array([[1.0, 1.0, -1.0, 1.0, 1.0]])
    got = ja.clip_fractions(logps, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    np.testing.assert_allclose(got["high"], 1 / 4)
    np.testing.assert_allclose(got["low"], 1 / 4)
    _, metrics = ja.ppo_loss(logps, old, adv, jnp.zeros((1, 5)), jnp.zeros((1, 5)),
                             jnp.zeros((1, 5)), mask, clip_eps=0.2, clip_eps_high=0.28)
    np.testing.assert_allclose(metrics["clipfrac"], 3 / 4)  # 1.5, 0.7, 0.7 outside [0.8, 1.28]


# ------------------------------------------------------------------ GSPO
@given(jt.masked_rollouts(allow_empty=False), st.floats(0.05, 0.3))
def test_sequence_ratio_gives_gspo_objective_and_gradient(rollout, clip_eps):
    """With the per-sequence ratio s_i = exp(mean_t log ρ_it) on every token and sequence-mean
    aggregation, the clipped loss is GSPO's −mean_i min(s_i A_i, clip(s_i) A_i) (eq. 5), and its
    gradient is that of the sequence objective itself."""
    mask = rollout["mask"]
    old = np.clip(rollout["values"], -8, 0).astype(np.float32)
    logps = (old + 0.1 * np.tanh(rollout["rewards"])).astype(np.float32)
    advantages = np.tanh(rollout["rewards"][:, :1]) * np.ones_like(mask)  # one per sequence

    def via_tokens(lp):
        ratio_logps = old + ja.sequence_log_ratio(lp, old, mask)
        per_token = ja.ppo_clip_loss(ratio_logps, old, advantages, clip_eps=clip_eps)
        return ja.aggregate_loss(per_token, mask, "sequence_mean")

    def direct(lp):  # GSPO eq. 5 in JAX, float32
        s = jnp.exp(ja.masked_mean(lp - old, mask > 0, axis=1))
        a = advantages[:, 0]
        return jnp.mean(-jnp.minimum(s * a, jnp.clip(s, 1 - clip_eps, 1 + clip_eps) * a))

    ratio = np.exp(np.sum((np.float64(logps) - old) * mask, 1) / mask.sum(1))
    expected = np.mean(np_clip_loss(ratio, advantages[:, 0], clip_eps, clip_eps))
    # jitted: each drawn shape costs one compile per function instead of one per eager op
    value_and_grad = jax.jit(jax.value_and_grad(via_tokens))(logps)
    np.testing.assert_allclose(value_and_grad[0], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(value_and_grad[1], jax.jit(jax.grad(direct))(logps), rtol=1e-3,
                               atol=1e-5)


def test_sequence_log_ratio_is_the_mean_and_ignores_masked_tokens():
    logps = jnp.array([[-1.0, -2.0, -3.0, 50.0]])
    old = jnp.array([[-1.5, -1.0, -3.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    np.testing.assert_allclose(ja.sequence_log_ratio(logps, old, mask),
                               [[-0.5 / 3, -0.5 / 3, -0.5 / 3, 0.0]], rtol=1e-6)
