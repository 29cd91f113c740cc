"""Losses against closed forms, float64 NumPy references written from the papers, and
hypothesis properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxalign as ja
from jaxalign import testing as jt


# ---------------------------------------------------------------- float64 references (numpy)
def np_log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, beta, eps=0.0):
    h = (np.float64(pc) - rc) - (np.float64(pr) - rr)
    return -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)


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


def test_shape_mismatch_errors_name_arguments():
    with pytest.raises(ValueError, match=r"policy_chosen_logps \(3,\).*ref_rejected_logps \(2,\)"):
        ja.dpo_loss(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), jnp.zeros(2))
    with pytest.raises(ValueError, match="old_logps"):
        ja.ppo_clip_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros((2, 3)))


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


@given(st.lists(st.floats(-1e4, 0.0, width=32), min_size=4, max_size=4) | st.sampled_from(
    [[-1e4, -1e-7, -1e4, -1e-7], [-1e-7, -1e-7, -1e4, -1e4], [0.0, -1e4, 0.0, -1e4]]))
def test_gradients_finite_at_extreme_logps(values):
    args = [jnp.array([v], jnp.float32) for v in values]
    for loss_fn in (
        lambda a, b, c, d: ja.dpo_loss(a, b, c, d, beta=0.1, label_smoothing=0.1),
        lambda a, b, c, d: ja.ipo_loss(a, b, c, d, beta=0.1),
        lambda a, b, c, d: ja.orpo_loss(a, b, -a, lam=0.1),
        lambda a, b, c, d: ja.bradley_terry_loss(a, b),
        lambda a, b, c, d: ja.ppo_clip_loss(a, b, c - d),
        lambda a, b, c, d: ja.kl_penalty(a, c, estimator="k3"),
        lambda a, b, c, d: ja.kl_penalty(a, c, estimator="k2"),
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
    assert ja.bradley_terry_loss(bf16["policy_chosen_logps"], bf16["ref_chosen_logps"]).dtype == jnp.float32


@given(jt.logits((3, 5)))
def test_entropy_bounds(logits):
    h = ja.entropy(logits)
    assert (h >= -1e-6).all() and (h <= math.log(5) + 1e-5).all()
