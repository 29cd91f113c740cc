"""Reference-free losses (``jaxalign/losses/reference_free.py``: SimPO, CPO) against float64
NumPy references written from the papers and from TRL's CPOTrainer, closed forms, and swaps."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from np_reference import np_log_sigmoid

import jaxalign as ja
from jaxalign import testing as jt


@st.composite
def completions(draw, size=st.integers(1, 8)):
    """Summed log-probs and lengths of chosen and rejected completions, and their means."""
    n = draw(size)
    lengths = {k: draw(hnp.arrays(np.int32, (n,), elements=st.integers(1, 40)))
               for k in ("chosen", "rejected")}
    means = {k: draw(jt.logps((n,), min_value=-5.0)) for k in ("chosen", "rejected")}
    sums = {k: (means[k].astype(np.float64) * lengths[k]) for k in means}
    return means, sums, lengths


def np_simpo_paper(chosen_sum, chosen_len, rejected_sum, rejected_len, beta, gamma):
    # Meng et al. eq. 6: −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ)
    return -np_log_sigmoid(beta / chosen_len * chosen_sum - beta / rejected_len * rejected_sum
                           - gamma)


def np_simpo_trl(chosen_mean, rejected_mean, beta, simpo_gamma):
    # TRL 1.16 CPOTrainer.cpo_loss, loss_type="simpo", label_smoothing 0:
    # logits = (ℓ_c − ℓ_r) − simpo_gamma / β;  −logsigmoid(β · logits)
    logits = (np.float64(chosen_mean) - rejected_mean) - simpo_gamma / beta
    return -np_log_sigmoid(beta * logits)


def np_cpo(chosen, rejected, nll, beta, alpha):
    # Xu et al.: L_prefer = −log σ(β log π(y_w|x) − β log π(y_l|x)), plus the NLL, weighted α
    chosen, rejected = np.float64(chosen), np.float64(rejected)
    return -np_log_sigmoid(beta * chosen - beta * rejected) + alpha * np.float64(nll)


@given(completions(), st.floats(0.5, 10.0), st.floats(0.0, 3.0))
def test_simpo_matches_paper_on_length_normalised_rewards(batch, beta, gamma):
    means, sums, lengths = batch
    got = ja.simpo_loss(means["chosen"], means["rejected"], beta=beta, gamma=gamma)
    expected = np_simpo_paper(sums["chosen"], lengths["chosen"], sums["rejected"],
                              lengths["rejected"], beta, gamma)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@given(completions(), st.floats(0.5, 10.0), st.floats(0.0, 3.0))
def test_trl_simpo_gamma_is_our_gamma(batch, beta, gamma):
    means, _, _ = batch
    got = ja.simpo_loss(means["chosen"], means["rejected"], beta=beta, gamma=gamma)
    np.testing.assert_allclose(got, np_simpo_trl(means["chosen"], means["rejected"], beta, gamma),
                               rtol=1e-4, atol=1e-4)
    # γ/β in TRL's role would be a different loss (unless β = 1 or γ = 0)
    if abs(beta - 1) > 0.1 and gamma > 0.1:
        wrong = np_simpo_trl(means["chosen"], means["rejected"], beta, gamma / beta)
        assert not np.allclose(got, wrong, rtol=1e-3)


@given(jt.preference_logps(min_value=-50.0), jt.betas(), st.floats(0.0, 2.0))
def test_cpo_matches_paper(batch, beta, alpha):
    chosen, rejected = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    nll = -chosen / 7.0
    got = ja.cpo_loss(chosen, rejected, nll, beta=beta, alpha=alpha)
    np.testing.assert_allclose(got, np_cpo(chosen, rejected, nll, beta, alpha),
                               rtol=1e-4, atol=1e-4)


def test_closed_forms():
    logps = jnp.array([-0.3, -2.0, 0.0])
    for gamma in (0.0, 0.5, 1.6):
        np.testing.assert_allclose(ja.simpo_loss(logps, logps, beta=2.5, gamma=gamma),
                                   math.log1p(math.exp(gamma)), rtol=1e-6)
    nll = jnp.array([0.5, 1.0, 2.0])
    np.testing.assert_allclose(ja.cpo_loss(logps, logps, nll, beta=0.1, alpha=0.7),
                               math.log(2) + 0.7 * np.asarray(nll), rtol=1e-6)
    np.testing.assert_allclose(ja.cpo_loss(logps, logps, nll, alpha=0.0), math.log(2), rtol=1e-6)


@given(jt.preference_logps(min_value=-50.0), st.floats(0.5, 10.0), st.floats(-2.0, 2.0))
def test_simpo_swap_with_negated_margin(batch, beta, gamma):
    # l(c, r; γ) − l(r, c; −γ) = softplus(x) − softplus(−x) with x = γ − βΔ, which is x
    chosen, rejected = batch["policy_chosen_logps"] / 20, batch["policy_rejected_logps"] / 20
    diff = (ja.simpo_loss(chosen, rejected, beta=beta, gamma=gamma)
            - ja.simpo_loss(rejected, chosen, beta=beta, gamma=-gamma))
    expected = gamma - beta * (np.float64(chosen) - rejected)
    np.testing.assert_allclose(diff, expected, rtol=1e-4, atol=1e-3)


@given(jt.preference_logps(min_value=-50.0), jt.betas(), st.floats(0.0, 2.0))
def test_cpo_swap_with_the_same_nll_differs_by_minus_beta_delta(batch, beta, alpha):
    chosen, rejected = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    nll = np.full_like(chosen, 1.5)
    diff = (ja.cpo_loss(chosen, rejected, nll, beta=beta, alpha=alpha)
            - ja.cpo_loss(rejected, chosen, nll, beta=beta, alpha=alpha))
    np.testing.assert_allclose(diff, -beta * (np.float64(chosen) - rejected), rtol=1e-4, atol=1e-3)


def test_shape_mismatch_errors_name_arguments():
    with pytest.raises(ValueError, match=r"chosen_logps \(2,\), rejected_logps \(3,\)"):
        ja.simpo_loss(jnp.zeros(2), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"chosen_nll \(4,\)"):
        ja.cpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(4))
