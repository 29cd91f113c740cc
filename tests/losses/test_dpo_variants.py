"""Margin losses (``jaxalign/losses/dpo_variants.py``: hinge, robust DPO, EXO, DiscoPOP, RPO)
against float64 NumPy references written from the papers, closed forms, and what swapping
chosen and rejected does to each."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from np_reference import log_ratios, np_log_sigmoid, np_sigmoid

import jaxalign as ja
from jaxalign import testing as jt

# Paper-scale log-probs: sums of a few dozen tokens, where float32 keeps ~6 digits of h.
BATCHES = jt.preference_logps(min_value=-50.0)


# ---------------------------------------------------------------- float64 references (numpy)
def np_dpo(chosen, rejected, beta):
    return -np_log_sigmoid(beta * (chosen - rejected))


def np_slic_calibration(chosen, rejected, delta):
    # SLiC-HF: max(0, δ − log P(y+|x) + log P(y−|x)), here on reference-normalised log-probs.
    return np.maximum(0.0, delta - chosen + rejected)


def np_robust(chosen, rejected, beta, eps):
    # Chowdhury et al.: [(1 − ε) l(θ; y_w, y_l) − ε l(θ; y_l, y_w)] / (1 − 2ε), l the DPO loss.
    return ((1 - eps) * np_dpo(chosen, rejected, beta) - eps * np_dpo(rejected, chosen, beta)) / (
        1 - 2 * eps)


def np_exo(chosen, rejected, beta, eps):
    # Ji et al. eq. 16, K = 2: KL(p_θ ‖ p_label), p_θ = softmax(β r) over {y_w, y_l}.
    rewards = np.stack([beta * chosen, beta * rejected])
    log_p_theta = rewards - np.logaddexp(rewards[0], rewards[1])
    log_p_label = np.log(np.array([1 - eps, eps]))[:, None]
    return np.sum(np.exp(log_p_theta) * (log_p_theta - log_p_label), axis=0)


def np_discopop(chosen, rejected, beta, tau):
    # Lu et al. eq. 5: (1 − σ(βρ/τ))·f_dpo(βρ) + σ(βρ/τ)·f_exp(βρ), ρ the log-ratio difference.
    rho = beta * (chosen - rejected)
    weight = np_sigmoid(rho / tau)
    return (1 - weight) * -np_log_sigmoid(rho) + weight * np.exp(-rho)


def np_rpo(chosen, rejected, nll, beta, alpha):
    # Pang et al.: L_DPO + α L_NLL.
    return np_dpo(chosen, rejected, beta) + alpha * np.asarray(nll, np.float64)


def swap(batch):
    return {
        "policy_chosen_logps": batch["policy_rejected_logps"],
        "policy_rejected_logps": batch["policy_chosen_logps"],
        "ref_chosen_logps": batch["ref_rejected_logps"],
        "ref_rejected_logps": batch["ref_chosen_logps"],
    }


def margin(batch):
    chosen, rejected = log_ratios(batch)
    return chosen - rejected


def at_margin(h):
    """Log-probs whose DPO margin is ``h`` (policy chosen = h, everything else 0)."""
    h = jnp.asarray(h, jnp.float32)
    zero = jnp.zeros_like(h)
    return dict(policy_chosen_logps=h, policy_rejected_logps=zero, ref_chosen_logps=zero,
                ref_rejected_logps=zero)


# ---------------------------------------------------------------- against the papers
@given(BATCHES, jt.betas())
def test_hinge_is_beta_times_slic_calibration_with_margin_one_over_beta(batch, beta):
    chosen, rejected = log_ratios(batch)
    expected = beta * np_slic_calibration(chosen, rejected, delta=1.0 / beta)
    np.testing.assert_allclose(ja.hinge_loss(**batch, beta=beta), expected, rtol=1e-4, atol=1e-4)


@given(BATCHES, jt.betas(), st.floats(0.0, 0.45))
def test_robust_dpo_matches_paper(batch, beta, eps):
    got = ja.robust_dpo_loss(**batch, beta=beta, label_smoothing=eps)
    np.testing.assert_allclose(got, np_robust(*log_ratios(batch), beta, eps), rtol=1e-4, atol=1e-3)


@given(BATCHES, jt.betas(), st.sampled_from([1e-3, 0.01, 0.1, 0.3]))
def test_exo_matches_paper(batch, beta, eps):
    got = ja.exo_loss(**batch, beta=beta, label_smoothing=eps)
    np.testing.assert_allclose(got, np_exo(*log_ratios(batch), beta, eps), rtol=1e-4, atol=1e-4)


@given(BATCHES, jt.betas(), st.sampled_from([0.05, 0.2, 1.0]))
def test_discopop_matches_paper(batch, beta, tau):
    got = ja.discopop_loss(**batch, beta=beta, tau=tau)
    with np.errstate(over="ignore"):
        expected = np_discopop(*log_ratios(batch), beta, tau)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)


@given(BATCHES, jt.betas(), st.floats(0.0, 2.0))
def test_rpo_matches_paper(batch, beta, alpha):
    nll = -batch["policy_chosen_logps"] / 5.0  # a per-token mean over 5 tokens
    got = ja.rpo_loss(**batch, chosen_nll=nll, beta=beta, alpha=alpha)
    np.testing.assert_allclose(got, np_rpo(*log_ratios(batch), nll, beta, alpha),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- closed forms
def test_hinge_closed_forms():
    beta = 0.25
    got = ja.hinge_loss(**at_margin([0.0, 4.0, 10.0, -2.0]), beta=beta)
    # 1 at h = 0, 0 at and beyond the margin 1/β = 4, 1 + β·2 at h = −2
    np.testing.assert_allclose(got, [1.0, 0.0, 0.0, 1.5], rtol=1e-6)


def test_robust_dpo_with_no_noise_is_dpo_and_is_ln2_at_zero_margin():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.uniform(-40, -1, 8).astype(np.float32) for _ in range(4))
    np.testing.assert_array_equal(ja.robust_dpo_loss(pc, pr, rc, rr, beta=0.3),
                                  ja.dpo_loss(pc, pr, rc, rr, beta=0.3))
    for eps in (0.1, 0.3, 0.45):
        got = ja.robust_dpo_loss(**at_margin([0.0]), beta=0.3, label_smoothing=eps)
        np.testing.assert_allclose(got, math.log(2.0), rtol=1e-5)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_dpo_rejects_flip_rates_of_one_half_or_more(eps):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        ja.robust_dpo_loss(**at_margin([1.0]), label_smoothing=eps)


def test_exo_closed_forms():
    for eps in (1e-3, 0.1, 0.3):
        at_zero = ja.exo_loss(**at_margin([0.0]), beta=0.5, label_smoothing=eps)
        np.testing.assert_allclose(at_zero, -math.log(2) - 0.5 * math.log(eps * (1 - eps)),
                                   rtol=1e-5)
        # the KL is 0 where the policy's pair distribution equals the labels: βh = log((1−ε)/ε)
        h_star = math.log((1 - eps) / eps) / 0.5
        at_optimum = ja.exo_loss(**at_margin([h_star]), beta=0.5, label_smoothing=eps)
        np.testing.assert_allclose(at_optimum, 0.0, atol=1e-6)
        off = ja.exo_loss(**at_margin([h_star - 1.0, h_star + 1.0]), beta=0.5, label_smoothing=eps)
        assert (np.asarray(off) > 1e-5).all()  # ≈ ½ q(1−q)(βΔh)², ≈ 1e−4 at ε = 1e−3


@pytest.mark.parametrize("eps", [0.0, 0.5, 0.6])
def test_exo_rejects_label_smoothing_outside_open_interval(eps):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \(0, 0.5\)"):
        ja.exo_loss(**at_margin([1.0]), label_smoothing=eps)


def test_discopop_closed_forms():
    got = ja.discopop_loss(**at_margin([0.0, 2.0, -2.0]), beta=1.0, tau=0.05)
    # h = 0: m = ½, so (log 2 + 1)/2; z = 2: m = σ(40) ≈ 1, exp(−2); z = −2: m ≈ 0, softplus(2)
    expected = [(1 + math.log(2)) / 2, math.exp(-2.0), math.log1p(math.exp(2.0))]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_rpo_with_alpha_zero_is_dpo_and_adds_alpha_nll():
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.uniform(-40, -1, 8).astype(np.float32) for _ in range(4))
    nll = rng.uniform(0.1, 3.0, 8).astype(np.float32)
    dpo = ja.dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1)
    np.testing.assert_array_equal(
        ja.rpo_loss(pc, pr, rc, rr, nll, beta=0.2, alpha=0.0, label_smoothing=0.1), dpo)
    np.testing.assert_allclose(ja.rpo_loss(pc, pr, rc, rr, nll, beta=0.2, alpha=0.5,
                                           label_smoothing=0.1), dpo + 0.5 * nll, rtol=1e-6)


def test_rpo_checks_the_nll_shape():
    with pytest.raises(ValueError, match=r"policy_chosen_logps \(3,\), chosen_nll \(2,\)"):
        ja.rpo_loss(*(jnp.zeros(3),) * 4, jnp.zeros(2))


# ---------------------------------------------------------------- swapping chosen and rejected
@given(BATCHES, jt.betas())
def test_hinge_swapped_is_relu_one_plus_beta_h(batch, beta):
    np.testing.assert_allclose(ja.hinge_loss(**swap(batch), beta=beta),
                               np.maximum(0.0, 1.0 + beta * margin(batch)), rtol=1e-4, atol=1e-4)


@given(BATCHES, jt.betas(), st.floats(0.0, 0.45))
def test_robust_dpo_swap_differs_by_minus_beta_h_over_one_minus_two_eps(batch, beta, eps):
    diff = (ja.robust_dpo_loss(**batch, beta=beta, label_smoothing=eps)
            - ja.robust_dpo_loss(**swap(batch), beta=beta, label_smoothing=eps))
    np.testing.assert_allclose(diff, -beta * margin(batch) / (1 - 2 * eps), rtol=1e-4, atol=2e-3)


@given(BATCHES, jt.betas(), st.sampled_from([1e-3, 0.1, 0.3]))
def test_exo_swap_differs_by_tanh_times_label_log_odds(batch, beta, eps):
    # (q_w − q_l)(log ε − log(1 − ε)) with q_w − q_l = tanh(βh/2)
    diff = (ja.exo_loss(**batch, beta=beta, label_smoothing=eps)
            - ja.exo_loss(**swap(batch), beta=beta, label_smoothing=eps))
    expected = -np.tanh(beta * margin(batch) / 2) * math.log((1 - eps) / eps)
    np.testing.assert_allclose(diff, expected, rtol=1e-4, atol=1e-4)


@given(BATCHES, jt.betas())
def test_discopop_depends_on_the_margin_only_so_swapping_negates_it(batch, beta):
    swapped = ja.discopop_loss(**swap(batch), beta=beta)
    np.testing.assert_allclose(swapped, ja.discopop_loss(**at_margin(-margin(batch)), beta=beta),
                               rtol=1e-4, atol=1e-4)
    # and it is not symmetric: the exponential side is the one with h > 0
    assert not np.allclose(ja.discopop_loss(**at_margin([3.0]), beta=1.0),
                           ja.discopop_loss(**at_margin([-3.0]), beta=1.0))


@given(BATCHES, jt.betas(), st.floats(0.0, 2.0))
def test_rpo_swap_with_the_other_nll(batch, beta, alpha):
    nll_c, nll_r = -batch["policy_chosen_logps"] / 5.0, -batch["policy_rejected_logps"] / 5.0
    diff = (ja.rpo_loss(**swap(batch), chosen_nll=nll_r, beta=beta, alpha=alpha)
            - ja.rpo_loss(**batch, chosen_nll=nll_c, beta=beta, alpha=alpha))
    expected = beta * margin(batch) + alpha * (np.float64(nll_r) - nll_c)
    np.testing.assert_allclose(diff, expected, rtol=1e-4, atol=1e-3)
