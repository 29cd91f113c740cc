"""Anchored losses (``jaxalign/losses/anchored.py``: NCA, BCO-pair, SPPO-hard, APO-zero,
APO-down) against float64 NumPy references written from the papers, closed forms, and what
swapping chosen and rejected does to each."""

import math

import jax.numpy as jnp
import numpy as np
from hypothesis import given

from np_reference import log_ratios, np_log_sigmoid, np_sigmoid

import jaxalign as ja
from jaxalign import testing as jt

BATCHES = jt.preference_logps(min_value=-50.0)


# ---------------------------------------------------------------- float64 references (numpy)
def np_nca(chosen, rejected, beta):
    # Chen et al.: −Σ_i p_i log σ(r_i) − (1/K) Σ_i log σ(−r_i), K = 2, p = (1, 0), r = β·log-ratio
    rewards = beta * np.stack([chosen, rejected])
    target = np.array([1.0, 0.0])[:, None]
    return -(target * np_log_sigmoid(rewards)).sum(0) - np_log_sigmoid(-rewards).sum(0) / 2


def np_bco(reward, desirable, delta):
    # Jung et al. eq. 7: −log σ(r − δ) for thumbs-up, −log σ(−(r − δ)) for thumbs-down
    return np.where(desirable, -np_log_sigmoid(reward - delta), -np_log_sigmoid(-(reward - delta)))


def np_sppo(chosen, rejected, eta, p_chosen_wins=1.0):
    # Wu et al.: (log π/π_t (y) − η (P(y ≻ π_t) − ½))², hard P: 1 for the winner, 0 for the loser
    return ((chosen - eta * (p_chosen_wins - 0.5)) ** 2
            + (rejected - eta * ((1 - p_chosen_wins) - 0.5)) ** 2)


def np_apo_zero_paper(chosen, rejected, beta):
    # D'Oosterlinck et al. eq. 7: −σ(β r_w) + σ(β r_l)
    return -np_sigmoid(beta * chosen) + np_sigmoid(beta * rejected)


def np_apo_down_paper(chosen, rejected, beta):
    # D'Oosterlinck et al. eq. 8: σ(β r_w) − σ(β r_w − β r_l)
    return np_sigmoid(beta * chosen) - np_sigmoid(beta * chosen - beta * rejected)


def swap(batch):
    return {
        "policy_chosen_logps": batch["policy_rejected_logps"],
        "policy_rejected_logps": batch["policy_chosen_logps"],
        "ref_chosen_logps": batch["ref_rejected_logps"],
        "ref_rejected_logps": batch["ref_chosen_logps"],
    }


def at_ratios(chosen, rejected):
    """Log-probs whose log-ratios are ``chosen`` and ``rejected`` (references at 0)."""
    chosen, rejected = jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32)
    return dict(policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                ref_chosen_logps=jnp.zeros_like(chosen), ref_rejected_logps=jnp.zeros_like(chosen))


def assert_close(actual, expected, scale=1.0):
    """``actual`` equals the float64 reference to 1e-4 (relative, and absolute times ``scale``)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------- against the papers
@given(BATCHES, jt.betas())
def test_nca_matches_paper(batch, beta):
    assert_close(ja.nca_loss(**batch, beta=beta), np_nca(*log_ratios(batch), beta))


@given(BATCHES, jt.betas())
def test_bco_pair_is_bco_with_zero_shift_on_both_halves(batch, beta):
    chosen, rejected = log_ratios(batch)
    expected = np_bco(beta * chosen, True, 0.0) + np_bco(beta * rejected, False, 0.0)
    assert_close(ja.bco_pair_loss(**batch, beta=beta), expected)


@given(BATCHES, jt.betas())
def test_sppo_hard_matches_paper_with_eta_one_over_beta(batch, beta):
    expected = np_sppo(*log_ratios(batch), eta=1.0 / beta)
    assert_close(ja.sppo_hard_loss(**batch, beta=beta), expected, scale=expected.max())


@given(BATCHES, jt.betas())
def test_apo_zero_is_paper_plus_one(batch, beta):
    assert_close(ja.apo_zero_loss(**batch, beta=beta) - 1.0, np_apo_zero_paper(*log_ratios(batch), beta))


@given(BATCHES, jt.betas())
def test_apo_down_is_paper_plus_one(batch, beta):
    assert_close(ja.apo_down_loss(**batch, beta=beta) - 1.0, np_apo_down_paper(*log_ratios(batch), beta))


# ---------------------------------------------------------------- closed forms
def test_closed_forms_at_policy_equals_reference():
    logps = jnp.array([-3.0, -40.0, 0.0])
    same = dict(policy_chosen_logps=logps, policy_rejected_logps=logps - 2.0,
                ref_chosen_logps=logps, ref_rejected_logps=logps - 2.0)
    beta = 0.25
    np.testing.assert_allclose(ja.nca_loss(**same, beta=beta), 2 * math.log(2), rtol=1e-6)
    np.testing.assert_allclose(ja.bco_pair_loss(**same, beta=beta), 2 * math.log(2), rtol=1e-6)
    np.testing.assert_allclose(ja.sppo_hard_loss(**same, beta=beta), 2 / (4 * beta**2), rtol=1e-6)
    np.testing.assert_allclose(ja.apo_zero_loss(**same, beta=beta), 1.0, rtol=1e-6)
    np.testing.assert_allclose(ja.apo_down_loss(**same, beta=beta), 1.0, rtol=1e-6)


def test_sppo_hard_is_zero_at_its_targets_and_quadratic_around_them():
    beta = 0.5  # targets r_c = 1/(2β) = 1, r_r = −1
    np.testing.assert_allclose(ja.sppo_hard_loss(**at_ratios([1.0], [-1.0]), beta=beta), 0.0,
                               atol=1e-7)
    np.testing.assert_allclose(ja.sppo_hard_loss(**at_ratios([3.0], [0.0]), beta=beta), 4 + 1,
                               rtol=1e-6)


def test_apo_limits_show_what_each_variant_rewards():
    big = 60.0
    # APO-zero is minimised by chosen up, rejected down; APO-down by both down, rejected more
    np.testing.assert_allclose(ja.apo_zero_loss(**at_ratios([big], [-big]), beta=1.0), 0.0,
                               atol=1e-6)
    np.testing.assert_allclose(ja.apo_down_loss(**at_ratios([-big], [-3 * big]), beta=1.0), 0.0,
                               atol=1e-6)
    np.testing.assert_allclose(ja.apo_down_loss(**at_ratios([big], [-big]), beta=1.0), 1.0,
                               atol=1e-6)


# ---------------------------------------------------------------- swapping chosen and rejected
@given(BATCHES, jt.betas())
def test_nca_swap_differs_by_the_chosen_term_only(batch, beta):
    chosen, rejected = log_ratios(batch)
    diff = ja.nca_loss(**batch, beta=beta) - ja.nca_loss(**swap(batch), beta=beta)
    assert_close(diff, np.logaddexp(0, -beta * chosen) - np.logaddexp(0, -beta * rejected), scale=10)


@given(BATCHES, jt.betas())
def test_bco_pair_swap_differs_by_minus_beta_h_like_dpo(batch, beta):
    chosen, rejected = log_ratios(batch)
    diff = ja.bco_pair_loss(**batch, beta=beta) - ja.bco_pair_loss(**swap(batch), beta=beta)
    assert_close(diff, -beta * (chosen - rejected), scale=10)


@given(BATCHES, jt.betas())
def test_sppo_hard_swap_differs_by_minus_two_h_over_beta(batch, beta):
    chosen, rejected = log_ratios(batch)
    loss = ja.sppo_hard_loss(**batch, beta=beta)
    diff = loss - ja.sppo_hard_loss(**swap(batch), beta=beta)
    assert_close(diff, -2 * (chosen - rejected) / beta, scale=10 * float(np.max(loss)))


@given(BATCHES, jt.betas())
def test_apo_zero_and_its_swap_sum_to_two(batch, beta):
    total = ja.apo_zero_loss(**batch, beta=beta) + ja.apo_zero_loss(**swap(batch), beta=beta)
    np.testing.assert_allclose(total, 2.0, rtol=1e-6)


@given(BATCHES, jt.betas())
def test_apo_down_swap(batch, beta):
    chosen, rejected = log_ratios(batch)
    diff = ja.apo_down_loss(**batch, beta=beta) - ja.apo_down_loss(**swap(batch), beta=beta)
    expected = (np_sigmoid(beta * chosen) - np_sigmoid(beta * rejected)
                - np.tanh(beta * (chosen - rejected) / 2))
    assert_close(diff, expected)
