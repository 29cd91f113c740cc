"""Unpaired losses (``jaxalign/losses/unpaired.py``: KTO and its KL baseline, BCO and its running
reward baseline) against float64 NumPy references written from the papers, closed forms, label
flips and the baseline's (init, update) pair."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from np_reference import np_sigmoid

import jaxalign as ja
from jaxalign import testing as jt

BATCHES = jt.unpaired_logps(min_value=-50.0)


def log_ratio(batch):
    return np.float64(batch["policy_logps"]) - np.float64(batch["ref_logps"])


def np_kto_paper(log_ratio, desirable, z0, beta, lam_d, lam_u):
    # Ethayarajh et al. eq. 8: λ_y − v(x, y), v = λ_D σ(β(r − z₀)) or λ_U σ(β(z₀ − r))
    value = np.where(desirable, lam_d * np_sigmoid(beta * (log_ratio - z0)),
                     lam_u * np_sigmoid(beta * (z0 - log_ratio)))
    return np.where(desirable, lam_d, lam_u) - value


def np_bco_paper(reward, desirable, delta):
    # Jung et al. eq. 7: −log σ(r_θ − δ) for thumbs-up, −log σ(−(r_θ − δ)) for thumbs-down
    shifted = reward - delta
    return np.where(desirable, np.logaddexp(0.0, -shifted), np.logaddexp(0.0, shifted))


# ---------------------------------------------------------------- KTO
@given(BATCHES, jt.betas(), st.floats(-5.0, 5.0), st.floats(0.5, 2.0), st.floats(0.5, 2.0))
def test_kto_matches_paper(batch, beta, z0, lam_d, lam_u):
    got = ja.kto_loss(**batch, kl_baseline=jnp.float32(z0), beta=beta, desirable_weight=lam_d,
                      undesirable_weight=lam_u)
    expected = np_kto_paper(log_ratio(batch), batch["desirable"], np.float32(z0), beta, lam_d,
                            lam_u)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_kto_is_half_its_weight_at_the_reference_point():
    z0 = jnp.float32(0.75)
    policy = jnp.array([-3.0, -3.0, -10.0])
    got = ja.kto_loss(policy, policy - z0, jnp.array([True, False, True]), z0, beta=0.3,
                      desirable_weight=1.0, undesirable_weight=1.4)
    np.testing.assert_allclose(got, [0.5, 0.7, 0.5], rtol=1e-6)


@given(BATCHES, jt.betas(), st.floats(-5.0, 5.0), st.floats(0.5, 2.0))
def test_kto_flipping_every_label_gives_the_complement(batch, beta, z0, lam):
    both = [ja.kto_loss(**{**batch, "desirable": labels}, kl_baseline=jnp.float32(z0), beta=beta,
                        desirable_weight=lam, undesirable_weight=lam)
            for labels in (batch["desirable"], ~batch["desirable"])]
    np.testing.assert_allclose(both[0] + both[1], lam, rtol=1e-5)


def test_kto_accepts_zero_one_labels():
    policy, ref = jnp.array([-1.0, -2.0, -3.0]), jnp.array([-1.5, -1.0, -3.0])
    as_bool = ja.kto_loss(policy, ref, jnp.array([True, False, True]), 0.1)
    np.testing.assert_array_equal(ja.kto_loss(policy, ref, jnp.array([1, 0, 1]), 0.1), as_bool)
    np.testing.assert_array_equal(ja.kto_loss(policy, ref, jnp.array([1.0, 0.0, 1.0]), 0.1),
                                  as_bool)


@given(jt.logps((6,), min_value=-50.0), jt.logps((6,), min_value=-50.0))
def test_kto_kl_baseline_is_the_clamped_mean_log_ratio(policy, ref):
    z0 = ja.kto_kl_baseline(policy, ref)
    assert z0.shape == () and z0.dtype == jnp.float32
    expected = max(float(np.mean(np.float64(policy) - ref)), 0.0)
    np.testing.assert_allclose(z0, expected, rtol=1e-5, atol=1e-5)


def test_no_gradient_flows_through_the_kto_baseline():
    policy, ref = jnp.array([-1.0, -2.0, -4.0]), jnp.array([-3.0, -3.0, -3.0])
    kl_policy = jnp.array([-2.0, -1.0, -1.5])  # log-ratios 1, 2, 1.5: z₀ = 1.5 > 0

    def total(kl_policy, policy):
        z0 = ja.kto_kl_baseline(kl_policy, ref)
        return ja.kto_loss(policy, ref, jnp.array([True, False, True]), z0).sum()

    assert float(ja.kto_kl_baseline(kl_policy, ref)) > 0
    own_grad = jax.grad(ja.kto_kl_baseline, argnums=(0, 1))(kl_policy, ref)
    assert all((np.asarray(g) == 0.0).all() for g in own_grad)  # stopped in the baseline itself
    grad_kl, grad_policy = jax.grad(total, argnums=(0, 1))(kl_policy, policy)
    np.testing.assert_array_equal(grad_kl, 0.0)
    assert np.abs(grad_policy).min() > 0  # the policy log-probs still get a gradient
    # and a baseline passed in directly is treated as a constant too
    grad_z0 = jax.grad(lambda z: ja.kto_loss(policy, ref, jnp.array([True, False, True]), z).sum())
    assert float(grad_z0(jnp.float32(0.4))) == 0.0


def test_kto_kl_baseline_is_zero_for_a_negative_estimate():
    np.testing.assert_array_equal(ja.kto_kl_baseline(jnp.array([-5.0, -6.0]),
                                                     jnp.array([-1.0, -1.0])), 0.0)


# ---------------------------------------------------------------- BCO
@given(BATCHES, jt.betas(), st.floats(-5.0, 5.0))
def test_bco_matches_paper(batch, beta, delta):
    got = ja.bco_loss(**batch, baseline=jnp.float32(delta), beta=beta)
    expected = np_bco_paper(beta * log_ratio(batch), batch["desirable"], np.float32(delta))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_bco_is_log2_where_the_reward_equals_the_shift():
    beta, delta = 0.2, 0.6
    state = ja.bco_baseline_update(ja.bco_baseline_init(), jnp.array([0.2, 1.0]))  # mean 0.6
    policy = jnp.array([-1.0, -5.0])
    ref = policy - delta / beta
    for baseline in (state, jnp.float32(delta)):
        np.testing.assert_allclose(ja.bco_loss(policy, ref, jnp.array([True, False]), baseline,
                                               beta=beta), math.log(2), rtol=1e-5)


@given(BATCHES, jt.betas(), st.floats(-5.0, 5.0))
def test_bco_flipping_a_label_changes_the_loss_by_the_shifted_reward(batch, beta, delta):
    up = ja.bco_loss(**{**batch, "desirable": np.ones_like(batch["desirable"])},
                     baseline=jnp.float32(delta), beta=beta)
    down = ja.bco_loss(**{**batch, "desirable": np.zeros_like(batch["desirable"])},
                       baseline=jnp.float32(delta), beta=beta)
    # softplus(−x) − softplus(x) = −x, x = βr − δ
    np.testing.assert_allclose(up - down, -(beta * log_ratio(batch) - np.float32(delta)),
                               rtol=1e-4, atol=1e-3)


def test_bco_takes_no_gradient_through_its_baseline():
    policy, ref = jnp.array([-1.0, -2.0]), jnp.array([-2.0, -2.5])
    labels = jnp.array([True, False])
    grad = jax.grad(lambda d: ja.bco_loss(policy, ref, labels, d).sum())(jnp.float32(0.3))
    assert float(grad) == 0.0
    state_grad = jax.grad(lambda r: ja.bco_baseline_update(ja.bco_baseline_init(), r).mean)(
        jnp.array([0.5, 1.5]))
    np.testing.assert_array_equal(state_grad, 0.0)


# ---------------------------------------------------------------- BCO's running baseline
def test_bco_baseline_init_is_zeros():
    state = ja.bco_baseline_init()
    assert isinstance(state, ja.BCOBaselineState)
    for field in state:
        assert field.shape == () and field.dtype == jnp.float32 and float(field) == 0.0


@given(jt.rewards(st.tuples(st.integers(1, 6))), jt.rewards(st.tuples(st.integers(1, 6))))
def test_bco_baseline_is_the_cumulative_mean_of_every_reward_seen(first, second):
    state = ja.bco_baseline_update(ja.bco_baseline_init(), first)
    np.testing.assert_allclose(state.mean, np.mean(np.float64(first)), rtol=1e-5, atol=1e-5)
    state = ja.bco_baseline_update(state, second)
    everything = np.concatenate([first, second]).astype(np.float64)
    np.testing.assert_allclose(state.mean, everything.mean(), rtol=1e-5, atol=1e-5)
    assert float(state.count) == everything.size
    # hence independent of how the rewards were split into batches (not an EMA)
    at_once = ja.bco_baseline_update(ja.bco_baseline_init(), everything.astype(np.float32))
    np.testing.assert_allclose(state.mean, at_once.mean, rtol=1e-5, atol=1e-5)
    assert float(at_once.count) == float(state.count)


def test_bco_baseline_weighs_rewards_not_batches():
    state = ja.bco_baseline_update(ja.bco_baseline_init(), jnp.array([0.0, 0.0, 0.0]))
    state = ja.bco_baseline_update(state, jnp.array([4.0]))
    np.testing.assert_allclose(state.mean, 1.0, rtol=1e-6)  # a mean of batch means would be 2


def test_bco_baseline_update_under_scan_and_jit_and_with_an_empty_batch():
    batches = jnp.arange(12.0).reshape(3, 4)

    def step(state, rewards):
        state = ja.bco_baseline_update(state, rewards)
        return state, state.mean

    final, means = jax.lax.scan(step, ja.bco_baseline_init(), batches)
    np.testing.assert_allclose(means, [1.5, 3.5, 5.5], rtol=1e-6)
    np.testing.assert_allclose(final.count, 12.0)
    jitted = jax.jit(ja.bco_baseline_update)(final, jnp.array([100.0]))
    np.testing.assert_allclose(jitted.mean, (66.0 + 100.0) / 13.0, rtol=1e-6)
    unchanged = ja.bco_baseline_update(final, jnp.zeros((0,)))
    assert float(unchanged.mean) == float(final.mean) and float(unchanged.count) == 12.0


def test_shape_mismatch_errors_name_arguments():
    with pytest.raises(ValueError, match=r"ref_logps \(3,\), desirable \(2,\)"):
        ja.kto_loss(jnp.zeros(3), jnp.zeros(3), jnp.ones(2, bool), 0.0)
    with pytest.raises(ValueError, match=r"policy_logps \(2,\), ref_logps \(3,\)"):
        ja.bco_loss(jnp.zeros(2), jnp.zeros(3), jnp.ones(2, bool), 0.0)
    with pytest.raises(ValueError, match=r"policy_kl_logps \(2,\), ref_kl_logps \(1,\)"):
        ja.kto_kl_baseline(jnp.zeros(2), jnp.zeros(1))
