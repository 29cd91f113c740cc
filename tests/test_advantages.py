"""GAE against its closed-form special cases and a float64 Python-loop reference."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jaxalign as ja
from jaxalign import testing as jt


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
    adv, ret = ja.gae(**rollout, gamma=gamma, lam=lam)
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
    adv, ret = ja.gae(rollout["rewards"], rollout["values"], mask)
    adv2, ret2 = ja.gae(rewards, values, mask)
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
