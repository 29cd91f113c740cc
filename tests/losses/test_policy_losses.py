"""Policy losses (``jaxalign/losses/policy.py``): PPO surrogate, value loss, entropy, KL
estimators and the combined PPO objective, against closed forms and hypothesis properties."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxalign as ja
from jaxalign import losses
from jaxalign import testing as jt


# ---------------------------------------------------------------- closed forms
def test_ppo_clip_closed_form():
    old = jnp.zeros(4)
    logps = jnp.log(jnp.array([1.5, 1.5, 0.5, 0.5]))
    adv = jnp.array([1.0, -1.0, 1.0, -1.0])
    # ratio 1.5, A>0: clipped at 1.2 → -1.2; A<0: min(-1.5, -1.2) = -1.5 → 1.5
    # ratio 0.5, A>0: min(0.5, 0.8) = 0.5 → -0.5; A<0: min(-0.5, -0.8) = -0.8 → 0.8
    np.testing.assert_allclose(ja.ppo_clip_loss(logps, old, adv), [-1.2, 1.5, -0.5, 0.8], rtol=1e-6)
    dual = ja.ppo_clip_loss(jnp.log(jnp.array([5.0])), jnp.zeros(1), jnp.array([-1.0]), dual_clip=3.0)
    np.testing.assert_allclose(dual, [3.0], rtol=1e-6)


def test_ppo_clip_gradient_vanishes_outside_trust_region():
    adv = jnp.array([1.0, -1.0])
    grad = jax.grad(lambda lp: ja.ppo_clip_loss(lp, jnp.zeros(2), adv).sum())
    g_out = grad(jnp.log(jnp.array([1.5, 0.5])))  # clipped on the side that helps: no gradient
    np.testing.assert_allclose(g_out, 0.0, atol=1e-7)
    g_in = grad(jnp.zeros(2))  # ratio 1: d/dlogp of -ρA = -A
    np.testing.assert_allclose(g_in, -adv, rtol=1e-6)


def test_value_loss_closed_form():
    values, old, returns = jnp.array([1.0, 3.0]), jnp.array([0.0, 0.0]), jnp.array([0.0, 0.0])
    np.testing.assert_allclose(ja.value_loss(values, old, returns), [0.5, 4.5])
    # clip 0.5: clipped values 0.5, 0.5 → errors 0.25 → max(1, 0.25)=1, max(9, .25)=9
    np.testing.assert_allclose(ja.value_loss(values, old, returns, clip_range=0.5), [0.5, 4.5])
    returns = jnp.array([2.0, 4.0])  # clipped values 0.5 → (1.5)², (3.5)² larger than 1², 1²
    np.testing.assert_allclose(ja.value_loss(values, old, returns, clip_range=0.5), [1.125, 6.125])


def test_entropy_closed_forms():
    uniform = jnp.zeros((3, 7))
    np.testing.assert_allclose(ja.entropy(uniform), math.log(7), rtol=1e-6)
    one_hot = jnp.array([[0.0, -jnp.inf, -jnp.inf]])
    np.testing.assert_allclose(ja.entropy(one_hot), 0.0, atol=1e-7)
    grads = jax.grad(lambda x: ja.entropy(x).sum())(jnp.array([[0.3, -jnp.inf, 1.0]]))
    assert np.isfinite(grads).all()


def test_kl_estimators_closed_forms():
    logps = jnp.array([-1.0, -2.0])
    ref = jnp.array([-2.0, -1.0])
    r = np.array([-1.0, 1.0])  # ref - logps
    np.testing.assert_allclose(ja.kl_penalty(logps, ref, estimator="k1"), -r)
    np.testing.assert_allclose(ja.kl_penalty(logps, ref, estimator="k2"), 0.5 * r**2)
    np.testing.assert_allclose(ja.kl_penalty(logps, ref, estimator="k3"), np.expm1(r) - r, rtol=1e-6)
    np.testing.assert_allclose(ja.kl_penalty(logps, ref, estimator="abs"), np.abs(r))
    with pytest.raises(ValueError, match="estimator must be one of"):
        ja.kl_penalty(logps, ref, estimator="k4")


def test_kl_estimators_lists_exactly_what_kl_penalty_accepts():
    assert losses.KL_ESTIMATORS == ("k1", "k2", "k3", "abs")
    logps = jnp.array([[-1.0, -2.0, -0.1]])
    ref = jnp.array([[-2.0, -1.0, -0.1]])
    estimates = {}
    for estimator in losses.KL_ESTIMATORS:
        estimates[estimator] = out = ja.kl_penalty(logps, ref, estimator=estimator)
        assert out.shape == logps.shape and out.dtype == jnp.float32, estimator
        # every estimator is 0 where the two log-probs agree, and they are distinct functions
        assert float(out[0, 2]) == 0.0 and float(jnp.abs(out[0, :2]).max()) > 0.0, estimator
    assert len({tuple(np.asarray(v).ravel()) for v in estimates.values()}) == len(estimates)
    for unknown in ("k4", "K1", "kl", "mse", ""):
        message = f"estimator must be one of {losses.KL_ESTIMATORS}, got {unknown!r}"
        with pytest.raises(ValueError, match=re.escape(message)):
            ja.kl_penalty(logps, ref, estimator=unknown)


def test_kl_estimators_are_unbiased_on_samples():
    # π = softmax(a), π_ref = softmax(b): k1 and k3 averaged over samples from π → KL(π‖π_ref).
    a, b = jnp.array([1.0, 0.0, -1.0, 0.5]), jnp.array([0.0, 0.5, 0.0, -0.5])
    logp, logq = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
    exact = float(jnp.sum(jnp.exp(logp) * (logp - logq)))
    samples = jax.random.categorical(jax.random.key(0), a, shape=(200_000,))
    for est in ("k1", "k3"):
        mean = float(ja.kl_penalty(logp[samples], logq[samples], estimator=est).mean())
        assert abs(mean - exact) < 0.01 * max(exact, 0.1), (est, mean, exact)


def test_ppo_loss_combines_terms_with_documented_signs():
    b, t = 2, 5
    key = jax.random.split(jax.random.key(0), 6)
    logps = -jax.random.uniform(key[0], (b, t))
    old = logps + 0.1 * jax.random.normal(key[1], (b, t))
    adv = jax.random.normal(key[2], (b, t))
    values = jax.random.normal(key[3], (b, t))
    old_values = values + 0.3 * jax.random.normal(key[4], (b, t))
    returns = jax.random.normal(key[5], (b, t))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ents = jnp.full((b, t), 2.0)
    loss, m = ja.ppo_loss(logps, old, adv, values, old_values, returns, mask, entropies=ents,
                          vf_coef=0.5, ent_coef=0.01, value_clip=0.2)
    pg = ja.masked_mean(ja.ppo_clip_loss(logps, old, adv), mask)
    vf = ja.masked_mean(ja.value_loss(values, old_values, returns, clip_range=0.2), mask)
    np.testing.assert_allclose(loss, pg + 0.5 * vf - 0.01 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(m["policy_loss"], pg, rtol=1e-6)
    np.testing.assert_allclose(m["entropy"], 2.0, rtol=1e-6)
    assert 0.0 <= float(m["clipfrac"]) <= 1.0 and float(m["approx_kl"]) >= 0.0
    # entropy bonus lowers the loss: minimising −c2·H maximises entropy
    loss_no_ent, _ = ja.ppo_loss(logps, old, adv, values, old_values, returns, mask, entropies=ents,
                                 vf_coef=0.5, ent_coef=0.0, value_clip=0.2)
    assert float(loss) < float(loss_no_ent)


def test_ppo_loss_metrics_closed_form():
    # ratios 1.5, 1.0, 0.9, 2.0 with ε = 0.2: only the first (and the masked last) are clipped.
    logps = jnp.log(jnp.array([[1.5, 1.0, 0.9, 2.0]]))
    old_logps, advantages = jnp.zeros((1, 4)), jnp.ones((1, 4))
    # value clip 0.5 around old values 0: token 0 moves to 1 and its clipped error (0.5 − 2)²
    # is the larger; token 1 moves to 3 but its clipped error is smaller; token 2 stays inside
    # the range; token 3 would use the clipped error but is masked out.
    values, returns = jnp.array([[1.0, 3.0, 0.2, -1.0]]), jnp.array([[2.0, 0.0, 5.0, -3.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    _, metrics = ja.ppo_loss(logps, old_logps, advantages, values, jnp.zeros((1, 4)), returns,
                             mask, clip_eps=0.2, value_clip=0.5)
    assert list(metrics) == ["loss", "policy_loss", "value_loss", "entropy", "clipfrac",
                             "approx_kl", "value_clipfrac"]
    assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())
    np.testing.assert_allclose(metrics["clipfrac"], 1 / 3, rtol=1e-6)
    ratio = np.array([1.5, 1.0, 0.9])
    np.testing.assert_allclose(metrics["approx_kl"], np.mean(ratio - 1 - np.log(ratio)), rtol=1e-5)
    np.testing.assert_allclose(metrics["value_clipfrac"], 1 / 3, rtol=1e-6)
    # the metric counts exactly the tokens where clipping raised value_loss
    raised = (ja.value_loss(values, jnp.zeros((1, 4)), returns, clip_range=0.5)
              > ja.value_loss(values, jnp.zeros((1, 4)), returns))
    np.testing.assert_array_equal(raised, [[True, False, False, True]])
    _, unclipped = ja.ppo_loss(logps, old_logps, advantages, values, jnp.zeros((1, 4)), returns,
                               mask, value_clip=None)
    assert float(unclipped["value_clipfrac"]) == 0.0


def test_shape_mismatch_errors_name_arguments():
    with pytest.raises(ValueError, match="old_logps"):
        ja.ppo_clip_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"values \(2, 3\), old_values \(2, 3\), returns \(3,\)"):
        ja.value_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3))


# ---------------------------------------------------------------- hypothesis properties
@given(st.lists(st.floats(-1e4, 0.0, width=32), min_size=4, max_size=4) | st.sampled_from(
    [[-1e4, -1e-7, -1e4, -1e-7], [-1e-7, -1e-7, -1e4, -1e4], [0.0, -1e4, 0.0, -1e4]]))
def test_gradients_finite_at_extreme_logps(values):
    args = [jnp.array([v], jnp.float32) for v in values]
    for loss_fn in (
        lambda a, b, c, d: ja.ppo_clip_loss(a, b, c - d),
        lambda a, b, c, d: ja.kl_penalty(a, c, estimator="k3"),
        lambda a, b, c, d: ja.kl_penalty(a, c, estimator="k2"),
    ):
        value, grads = jax.value_and_grad(lambda *xs: loss_fn(*xs).sum(), argnums=(0, 1, 2, 3))(*args)
        assert np.isfinite(value), values
        assert all(np.isfinite(g).all() for g in grads), values


@given(jt.logits((3, 5)))
def test_entropy_bounds(logits):
    h = ja.entropy(logits)
    assert (h >= -1e-6).all() and (h <= math.log(5) + 1e-5).all()
