"""GAE against its closed-form special cases and a float64 Python-loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jaxalign as ja
from jaxalign import testing as jt


# Jitted once per drawn shape (gamma / lambda traced), as the steps call them, instead of one
# compile per eager op per shape: the hypothesis tests below draw a new shape every example.
_gae = jax.jit(lambda r, v, m, gamma, lam: ja.gae(r, v, m, gamma=gamma, lam=lam))
_reinforce_pp = jax.jit(lambda r, m, gamma: ja.reinforce_pp_advantages(r, m, gamma=gamma))


def np_gae(rewards, values, mask, gamma, lam):
    """Direct transcription of GAE (Schulman et al. 2015) per row, over valid positions only."""
    rewards, values = np.float64(rewards), np.float64(values)
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        next_value, next_adv = 0.0, 0.0
        for t in idx[::-1]:
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t] = next_adv
    returns = np.where(mask > 0, adv + values, 0.0)
    return adv, returns


def test_gae_lambda_zero_is_td_error():
    r = jnp.array([[1.0, 0.0, 2.0, 0.5]])
    v = jnp.array([[0.5, 1.0, -1.0, 2.0]])
    m = jnp.ones((1, 4))
    adv, ret = ja.gae(r, v, m, gamma=0.9, lam=0.0)
    next_v = np.array([[1.0, -1.0, 2.0, 0.0]])  # bootstrap 0 after the last token
    np.testing.assert_allclose(adv, r + 0.9 * next_v - v, rtol=1e-6)
    np.testing.assert_allclose(ret, adv + v, rtol=1e-6)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    r = jnp.array([[0.0, 1.0, 2.0, 3.0, 9.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    v = jnp.array([[0.0, 0.2, 0.3, 0.4, 7.0], [1.0, 2.0, 5.0, 5.0, 5.0]])
    m = jnp.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    adv, ret = ja.gae(r, v, m, gamma=1.0, lam=1.0)
    expected = np.array([[0.0, 6.0 - 0.2, 5.0 - 0.3, 3.0 - 0.4, 0.0], [2.0 - 1.0, 1.0 - 2.0, 0, 0, 0]])
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret, np.where(m, expected + v, 0), rtol=1e-6, atol=1e-6)


@given(jt.masked_rollouts(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_matches_float64_reference(rollout, gamma, lam):
    adv, ret = _gae(rollout["rewards"], rollout["values"], rollout["mask"], gamma, lam)
    ref_adv, ref_ret = np_gae(rollout["rewards"], rollout["values"], rollout["mask"], gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-4, atol=1e-3)


@given(jt.masked_rollouts(), st.data())
def test_gae_ignores_masked_positions(rollout, data):
    """Values past (or before) the mask never change the result, even NaN or inf."""
    mask = rollout["mask"]
    junk = data.draw(st.sampled_from([np.nan, np.inf, -1e30, 123.0]))
    rewards = np.where(mask > 0, rollout["rewards"], junk)
    values = np.where(mask > 0, rollout["values"], junk)
    adv, ret = _gae(rollout["rewards"], rollout["values"], mask, 1.0, 0.95)  # the defaults
    adv2, ret2 = _gae(rewards, values, mask, 1.0, 0.95)
    np.testing.assert_array_equal(adv, adv2)
    np.testing.assert_array_equal(ret, ret2)
    assert (np.asarray(adv)[mask == 0] == 0).all() and (np.asarray(ret)[mask == 0] == 0).all()


def test_gae_fully_masked_row_is_zero():
    adv, ret = ja.gae(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.array([[0, 0, 0], [1, 1, 1]]))
    np.testing.assert_array_equal(adv[0], 0.0)
    np.testing.assert_array_equal(ret[0], 0.0)
    assert (np.asarray(adv[1]) != 0).any()


@given(jt.masked_rollouts(allow_empty=False))
def test_masked_whiten_has_zero_mean_unit_variance(rollout):
    mask = rollout["mask"]
    values = rollout["values"] + np.arange(mask.size, dtype=np.float32).reshape(mask.shape)
    if mask.sum() < 2 or np.var(values[mask > 0]) < 1e-3:
        return
    w = np.asarray(ja.masked_whiten(values, mask))
    valid = w[mask > 0]
    np.testing.assert_allclose(valid.mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(valid.var(ddof=1), 1.0, rtol=1e-3)
    assert (w[mask == 0] == 0).all()


def test_group_advantages_closed_forms():
    scores = jnp.array([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    rloo = ja.group_advantages(scores, 3, "rloo")
    np.testing.assert_allclose(rloo[:3], [1 - 2.5, 2 - 2.0, 3 - 1.5], rtol=1e-6)
    np.testing.assert_allclose(rloo[3:], 0.0, atol=1e-6)
    grpo = ja.group_advantages(scores, 3, "grpo")
    np.testing.assert_allclose(grpo[:3], [-1.0, 0.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(grpo[3:], 0.0, atol=1e-6)


def test_kl_shaped_rewards_put_the_score_on_the_last_completion_token():
    kl = jnp.array([[0.5, 1.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    rewards = ja.kl_shaped_rewards(jnp.array([3.0, -1.0, 7.0]), kl, mask, kl_coef=0.1)
    np.testing.assert_allclose(rewards, [[-0.05, -0.1, -0.2 + 3.0, 0.0], [-0.1 - 1.0, 0, 0, 0],
                                         [7.0, 0, 0, 0]], rtol=1e-6)


# ------------------------------------------------------------------ the GRPO family
def np_group_advantages(scores, k, estimator, eps=1e-6):
    """Each paper's formula, per group, in float64 Python loops."""
    scores = np.float64(scores)
    out = np.zeros_like(scores)
    for g in range(len(scores) // k):
        group = scores[g * k:(g + 1) * k]
        for i in range(k):
            if estimator == "grpo":  # Shao et al. 2024, §4.1.2 (unbiased std, as TRL)
                out[g * k + i] = (group[i] - group.mean()) / (group.std(ddof=1) + eps)
            elif estimator == "dr_grpo":  # Liu et al. 2025, eq. 3
                out[g * k + i] = group[i] - group.mean()
            else:  # RLOO, Ahmadian et al. 2024: minus the mean of the others
                out[g * k + i] = group[i] - np.mean(np.delete(group, i))
    return out


@given(st.integers(2, 5), st.integers(1, 4), st.sampled_from(["grpo", "dr_grpo", "rloo"]),
       st.data())
def test_group_advantages_match_float64_references(k, groups, estimator, data):
    scores = data.draw(jt.rewards((k * groups,)))
    got = np.asarray(ja.group_advantages(scores, k, estimator))
    expected = np_group_advantages(scores, k, estimator)
    # GRPO divides by σ_g: where σ_g is at float32 rounding level the quotient is not a float32
    # quantity; compare the groups whose spread float32 resolves, check the others are finite
    spread = np.float64(scores).reshape(groups, k).std(1, ddof=1)
    resolved = np.repeat(spread > 1e-3 if estimator == "grpo" else spread >= 0, k)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[resolved], expected[resolved], rtol=1e-4,
                               atol=1e-3 * (1 + np.abs(expected).max()))
    # every group's advantages sum to zero (GRPO's are O(1) after the division)
    sums = got.reshape(groups, k).sum(1)[resolved[::k]]
    scale = 1.0 if estimator == "grpo" else 1 + np.abs(scores).max()
    np.testing.assert_allclose(sums, 0.0, atol=1e-5 * scale * k)


def test_dr_grpo_keeps_the_scale_grpo_divides_out():
    scores = jnp.array([0.0, 0.0, 0.0, 0.1, 5.0, 5.0, 5.0, 15.0])
    dr = ja.group_advantages(scores, 4, "dr_grpo")
    grpo = ja.group_advantages(scores, 4, "grpo")
    np.testing.assert_allclose(dr, [-0.025, -0.025, -0.025, 0.075, -2.5, -2.5, -2.5, 7.5],
                               rtol=1e-5)
    np.testing.assert_allclose(grpo[:4], grpo[4:], rtol=1e-3)  # GRPO: both groups look alike


def np_reinforce_pp(rewards, mask, gamma):
    """Return-to-go per row (valid positions only), whitened over all valid tokens."""
    rewards = np.float64(rewards)
    returns = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        running = 0.0
        for t in np.flatnonzero(mask[b])[::-1]:
            running = rewards[b, t] + gamma * running
            returns[b, t] = running
    valid = mask > 0
    mean, var = returns[valid].mean(), returns[valid].var(ddof=1) if valid.sum() > 1 else 0.0
    return np.where(valid, (returns - mean) / np.sqrt(var + 1e-8), 0.0)


@given(jt.masked_rollouts(allow_empty=False), st.floats(0.5, 1.0))
def test_reinforce_pp_matches_float64_reference(rollout, gamma):
    mask = rollout["mask"]
    got = np.asarray(_reinforce_pp(rollout["rewards"], mask, gamma))
    expected = np_reinforce_pp(rollout["rewards"], mask, gamma)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    junk = np.where(mask > 0, rollout["rewards"], np.nan)  # masked tokens never matter
    np.testing.assert_array_equal(_reinforce_pp(junk, mask, gamma), got)
