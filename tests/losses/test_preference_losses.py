"""Preference losses (``jaxalign/losses/preference.py``) against closed forms, float64 NumPy
references written from the papers, and hypothesis properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from np_reference import np_log_sigmoid

import jaxalign as ja
from jaxalign import losses
from jaxalign import testing as jt


# ---------------------------------------------------------------- float64 references (numpy)
def np_dpo(pc, pr, rc, rr, beta, eps=0.0):
    h = (np.float64(pc) - rc) - (np.float64(pr) - rr)
    return -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)


def np_log_odds(mean_logp):
    # ℓ − log(1 − e^ℓ) written literally; float64 keeps ~9 digits even at ℓ = −1e−7.
    mean_logp = np.asarray(mean_logp, np.float64)
    return mean_logp - np.log(1.0 - np.exp(mean_logp))


def np_orpo(chosen_mean_logp, rejected_mean_logp, chosen_nll, lam):
    # Hong et al. 2024, eqs. 4-7, written directly: odds(y) = P / (1 - P), P = exp(mean logp).
    pw = np.exp(np.float64(chosen_mean_logp))
    pl = np.exp(np.float64(rejected_mean_logp))
    log_odds_ratio = np.log(pw / (1 - pw)) - np.log(pl / (1 - pl))
    return chosen_nll - lam * np_log_sigmoid(log_odds_ratio)


# ---------------------------------------------------------------- closed forms
def test_dpo_is_ln2_when_policy_equals_reference():
    logps = jnp.array([-3.0, -40.0, -0.5])
    for eps in (0.0, 0.1, 0.3):
        loss = ja.dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.5, label_smoothing=eps)
        np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)


def test_dpo_matches_float64_reference():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.uniform(-60, -1, 16) for _ in range(4))
    for beta, eps in ((0.1, 0.0), (0.5, 0.2), (2.0, 0.05)):
        got = ja.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        np.testing.assert_allclose(got, np_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-5, atol=1e-6)


def test_ipo_is_zero_at_its_target_margin():
    beta = 0.25
    target = 1.0 / (2 * beta)
    pc = jnp.array([-5.0, -1.0])
    loss = ja.ipo_loss(pc, pc - target, jnp.zeros(2), jnp.zeros(2), beta=beta)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    # and grows quadratically away from it
    loss = ja.ipo_loss(pc, pc - target - 1.0, jnp.zeros(2), jnp.zeros(2), beta=beta)
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_bradley_terry_antisymmetry_closed_form():
    # l(a, b) - l(b, a) = -log σ(a-b) + log σ(b-a) = b - a
    a = jnp.array([0.3, -2.0, 5.0, 0.0])
    b = jnp.array([1.1, 4.0, -3.0, 0.0])
    diff = ja.bradley_terry_loss(a, b) - ja.bradley_terry_loss(b, a)
    np.testing.assert_allclose(diff, b - a, rtol=1e-5, atol=1e-6)


def test_bradley_terry_margin_and_soft_labels():
    a, b = jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0])
    np.testing.assert_allclose(ja.bradley_terry_loss(a, b, margin=1.0), [math.log(2), -np_log_sigmoid(-1.0)], rtol=1e-6)
    per_pair = ja.bradley_terry_loss(a, b, margin=jnp.array([0.0, 2.0]))
    np.testing.assert_allclose(per_pair, -np_log_sigmoid(np.array([1.0, -2.0])), rtol=1e-6)
    # soft label p: cross-entropy p·(-log σ(d)) + (1-p)·(-log σ(-d)); p = 1/2 at d = 0 is log 2
    soft = ja.bradley_terry_loss(a, b, p_chosen=jnp.array([0.7, 0.5]))
    expected = [-(0.7 * np_log_sigmoid(1.0) + 0.3 * np_log_sigmoid(-1.0)), math.log(2)]
    np.testing.assert_allclose(soft, expected, rtol=1e-6)


def test_orpo_matches_float64_reference_from_the_paper():
    rng = np.random.default_rng(1)
    chosen = rng.uniform(-5, -0.01, 32)
    rejected = rng.uniform(-5, -0.01, 32)
    nll = -chosen
    got = ja.orpo_loss(chosen, rejected, nll, lam=0.1)
    np.testing.assert_allclose(got, np_orpo(chosen, rejected, nll, 0.1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        ja.odds_ratio_loss(chosen, rejected), np_orpo(chosen, rejected, 0.0, 1.0), rtol=1e-5
    )


def test_log1mexp_is_accurate_at_both_ends():
    x = np.array([-1e-7, -1e-3, -0.5, -0.7, -1.0, -30.0, -1e4])
    x64 = x.astype(np.float64)
    # float64 reference: log(-expm1) loses digits for x << 0, where log1p(-exp) is exact
    expected = np.where(x64 > -1.0, np.log(-np.expm1(x64)), np.log1p(-np.exp(x64)))
    np.testing.assert_allclose(ja.log1mexp(x), expected, rtol=2e-6, atol=1e-30)


def test_log_odds_matches_float64_reference_from_near_zero_to_minus_1e4():
    mean_logps = np.array([-1e-7, -1e-6, -1e-4, -1e-2, -0.5, -0.7, -1.0, -5.0, -30.0, -1e4],
                          np.float32)
    got = ja.log_odds(mean_logps)
    assert got.dtype == jnp.float32 and got.shape == mean_logps.shape
    np.testing.assert_allclose(got, np_log_odds(mean_logps), rtol=2e-6)
    # ℓ at or above the cap −1e−7 (0 included) gives the capped, finite value, about −log 1e−7
    capped = ja.log_odds(np.array([0.0, -1e-9], np.float32))
    np.testing.assert_allclose(capped, np_log_odds(-1e-7), rtol=2e-6)
    assert float(capped[0]) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_log_odds_gradients_are_finite_and_match_the_derivative():
    # d/dℓ [ℓ − log(1 − e^ℓ)] = 1 / (1 − e^ℓ): ≈ 1/|ℓ| near 0, → 1 as ℓ → −∞.
    mean_logps = jnp.array([-1e-6, -1e-4, -0.5, -1.0, -30.0, -1e4], jnp.float32)
    grads = jax.grad(lambda x: ja.log_odds(x).sum())(mean_logps)
    assert np.isfinite(grads).all()
    expected = 1.0 / -np.expm1(np.asarray(mean_logps, np.float64))
    np.testing.assert_allclose(grads, expected, rtol=1e-3)
    # above the cap the value is constant, so no gradient flows (and none is inf or nan)
    capped = jax.grad(lambda x: ja.log_odds(x).sum())(jnp.array([0.0, -1e-9], jnp.float32))
    np.testing.assert_array_equal(capped, 0.0)


def test_odds_ratio_loss_is_built_from_log_odds():
    chosen = jnp.array([-0.1, -2.0, 0.0, -1e4])
    rejected = jnp.array([-3.0, -0.2, -1e4, 0.0])
    expected = -jax.nn.log_sigmoid(ja.log_odds(chosen) - ja.log_odds(rejected))
    np.testing.assert_array_equal(ja.odds_ratio_loss(chosen, rejected), expected)


def test_ranking_pair_weights_sum_to_one_per_ranking_and_only_order_pairs():
    ranks = jnp.array([[2, 0, 1, 3], [0, 0, 1, 1], [4, 4, 4, 4]])
    weights = np.asarray(losses.ranking_pair_weights(ranks))
    assert weights.shape == (3, 4, 4) and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), [1.0, 1.0, 0.0])
    better = np.asarray(ranks)[:, :, None] < np.asarray(ranks)[:, None, :]
    np.testing.assert_array_equal(weights > 0, better)
    np.testing.assert_allclose(weights[0][better[0]], 1 / 6)  # 4 distinct ranks: C(4, 2) pairs
    np.testing.assert_allclose(weights[1][better[1]], 1 / 4)  # two ties: 2·2 ordered pairs


def test_shape_mismatch_errors_name_arguments():
    with pytest.raises(ValueError, match=r"policy_chosen_logps \(3,\).*ref_rejected_logps \(2,\)"):
        ja.dpo_loss(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"chosen_logps \(2,\), rejected_logps \(3,\)"):
        ja.odds_ratio_loss(jnp.zeros(2), jnp.zeros(3))


# ---------------------------------------------------------------- hypothesis properties
def _margin(batch):
    return (batch["policy_chosen_logps"] - batch["ref_chosen_logps"]) - (
        batch["policy_rejected_logps"] - batch["ref_rejected_logps"]
    )


def _swap(batch):
    return {
        "policy_chosen_logps": batch["policy_rejected_logps"],
        "policy_rejected_logps": batch["policy_chosen_logps"],
        "ref_chosen_logps": batch["ref_rejected_logps"],
        "ref_rejected_logps": batch["ref_chosen_logps"],
    }


@given(jt.preference_logps(), st.floats(0.01, 2.0))
def test_dpo_swap_mirrors_and_matches_reference(batch, beta):
    loss = ja.dpo_loss(**batch, beta=beta)
    swapped = ja.dpo_loss(**_swap(batch), beta=beta)
    # l(h) = -log σ(βh), l(-h) = -log σ(-βh), and l(h) - l(-h) = -βh
    np.testing.assert_allclose(loss - swapped, -beta * _margin(batch), rtol=1e-4, atol=1e-3)
    ref = np_dpo(batch["policy_chosen_logps"], batch["policy_rejected_logps"],
                 batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta)
    np.testing.assert_allclose(loss, ref, rtol=1e-4, atol=1e-4)


@given(jt.rewards((6,)), jt.rewards((6,)))
def test_bradley_terry_swap_mirrors(chosen, rejected):
    diff = ja.bradley_terry_loss(chosen, rejected) - ja.bradley_terry_loss(rejected, chosen)
    np.testing.assert_allclose(diff, rejected - chosen, rtol=1e-4, atol=1e-4)


@given(st.floats(-50, 50), st.floats(0.01, 5.0), st.floats(0.0, 0.49))
def test_dpo_and_bt_decrease_in_the_margin(h, delta, eps):
    zero = jnp.zeros(1)
    lo = ja.dpo_loss(jnp.array([h]), zero, zero, zero, beta=0.5, label_smoothing=eps)
    hi = ja.dpo_loss(jnp.array([h + delta]), zero, zero, zero, beta=0.5, label_smoothing=eps)
    # with label smoothing the loss has its minimum at βh = log((1-ε)/ε): decreasing before it
    optimum = math.log((1 - eps) / eps) / 0.5 if eps > 0 else math.inf
    if h + delta <= optimum:
        assert float(hi[0]) <= float(lo[0]) + 1e-6
    bt_lo = ja.bradley_terry_loss(jnp.array([h]), zero)
    bt_hi = ja.bradley_terry_loss(jnp.array([h + delta]), zero)
    assert float(bt_hi[0]) <= float(bt_lo[0]) + 1e-6


@given(hnp.arrays(np.int32, st.tuples(st.integers(1, 3), st.integers(2, 5)),
                  elements=st.integers(0, 3)), st.randoms())
def test_ranking_pair_weights_follow_a_permutation_of_the_responses(ranks, random):
    perm = np.arange(ranks.shape[1])
    random.shuffle(perm)
    weights = np.asarray(losses.ranking_pair_weights(ranks))
    permuted = np.asarray(losses.ranking_pair_weights(ranks[:, perm]))
    np.testing.assert_array_equal(permuted, weights[:, perm][:, :, perm])
    all_tied = (ranks == ranks[:, :1]).all(axis=1)
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), np.where(all_tied, 0.0, 1.0), rtol=1e-6)


@given(st.lists(st.floats(-1e4, 0.0, width=32), min_size=4, max_size=4) | st.sampled_from(
    [[-1e4, -1e-7, -1e4, -1e-7], [-1e-7, -1e-7, -1e4, -1e4], [0.0, -1e4, 0.0, -1e4]]))
def test_gradients_finite_at_extreme_logps(values):
    args = [jnp.array([v], jnp.float32) for v in values]
    for loss_fn in (
        lambda a, b, c, d: ja.dpo_loss(a, b, c, d, beta=0.1, label_smoothing=0.1),
        lambda a, b, c, d: ja.ipo_loss(a, b, c, d, beta=0.1),
        lambda a, b, c, d: ja.orpo_loss(a, b, -a, lam=0.1),
        lambda a, b, c, d: ja.log_odds(a) - ja.log_odds(b),
        lambda a, b, c, d: ja.bradley_terry_loss(a, b),
    ):
        value, grads = jax.value_and_grad(lambda *xs: loss_fn(*xs).sum(), argnums=(0, 1, 2, 3))(*args)
        assert np.isfinite(value), values
        assert all(np.isfinite(g).all() for g in grads), values


@given(jt.preference_logps(batch_size=st.just(4)))
def test_bf16_inputs_give_float32_results(batch):
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in batch.items()}
    rounded = {k: np.asarray(v, np.float32) for k, v in bf16.items()}
    for fn in (ja.dpo_loss, ja.ipo_loss):
        out = fn(**bf16)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, fn(**rounded), rtol=1e-5, atol=1e-5)
    out = ja.orpo_loss(bf16["policy_chosen_logps"] / 100, bf16["policy_rejected_logps"] / 100,
                       -bf16["policy_chosen_logps"] / 100)
    assert out.dtype == jnp.float32 and np.isfinite(out).all()
    assert ja.log_odds(bf16["policy_chosen_logps"] / 100).dtype == jnp.float32
    assert ja.bradley_terry_loss(bf16["policy_chosen_logps"], bf16["ref_chosen_logps"]).dtype == jnp.float32
