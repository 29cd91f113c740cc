"""Properties every loss of the wider preference family must have, checked for each of them:
finite values and gradients at extreme log-probs (−1e4, −1e−7, empty completions at 0),
float32 results from bfloat16 inputs (float64 stays float64), gradient accumulation over equal
micro-batches, and the same numbers under ``jit`` and ``vmap``."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxalign as ja
from jaxalign import testing as jt

# Each loss as f(batch, beta) -> [B]; pairwise ones take jt.preference_logps batches, unpaired
# ones jt.unpaired_logps batches. Fixed hyperparameters other than β sit inside the lambdas;
# the NLL is the chosen log-prob over 8 tokens (a power of two, so exact in bfloat16 too).
PAIRWISE = {
    "hinge": lambda b, beta: ja.hinge_loss(**b, beta=beta),
    "robust_dpo": lambda b, beta: ja.robust_dpo_loss(**b, beta=beta, label_smoothing=0.2),
    "exo": lambda b, beta: ja.exo_loss(**b, beta=beta, label_smoothing=1e-3),
    "discopop": lambda b, beta: ja.discopop_loss(**b, beta=beta, tau=0.05),
    "rpo": lambda b, beta: ja.rpo_loss(**b, chosen_nll=-b["policy_chosen_logps"] / 8, beta=beta),
    "nca": lambda b, beta: ja.nca_loss(**b, beta=beta),
    "bco_pair": lambda b, beta: ja.bco_pair_loss(**b, beta=beta),
    "sppo_hard": lambda b, beta: ja.sppo_hard_loss(**b, beta=beta),
    "apo_zero": lambda b, beta: ja.apo_zero_loss(**b, beta=beta),
    "apo_down": lambda b, beta: ja.apo_down_loss(**b, beta=beta),
    # the reference-free ones read the policy log-probs only (as means for SimPO)
    "simpo": lambda b, beta: ja.simpo_loss(b["policy_chosen_logps"], b["policy_rejected_logps"],
                                           beta=20 * beta, gamma=0.5),
    "cpo": lambda b, beta: ja.cpo_loss(b["policy_chosen_logps"], b["policy_rejected_logps"],
                                       -b["policy_chosen_logps"] / 8, beta=beta),
}
BCO_STATE = ja.BCOBaselineState(mean=jnp.float32(0.2), count=jnp.float32(10.0))
UNPAIRED = {
    "kto": lambda b, beta: ja.kto_loss(**b, kl_baseline=jnp.float32(0.3), beta=beta,
                                       undesirable_weight=1.33),
    "bco": lambda b, beta: ja.bco_loss(**b, baseline=BCO_STATE, beta=beta),
}
LOSSES = {**PAIRWISE, **UNPAIRED}


def batches(name, size, **kwargs):
    strategy = jt.unpaired_logps if name in UNPAIRED else jt.preference_logps
    return strategy(batch_size=st.just(size), **kwargs)


def float_inputs(batch):
    """The differentiable entries of a batch (all but the ``desirable`` labels)."""
    return {k: v for k, v in batch.items() if k != "desirable"}


@functools.cache
def value_and_grads(name):
    """``jit`` of (sum of the loss, its gradients w.r.t. every log-prob input)."""
    def total(inputs, labels, beta):
        return LOSSES[name]({**inputs, **labels}, beta).sum()
    return jax.jit(jax.value_and_grad(total))


def assert_finite_with_finite_gradients(name, batch, beta):
    labels = {k: v for k, v in batch.items() if k == "desirable"}
    value, grads = value_and_grads(name)(float_inputs(batch), labels, beta)
    assert np.isfinite(value), (name, batch, beta)
    for key, grad in grads.items():
        assert np.isfinite(grad).all(), (name, key, batch, beta)


# ---------------------------------------------------------------- extreme log-probs
EXTREMES = (-1e4, -1e-7, 0.0)  # very unlikely, near-certain, and an empty completion


def every_combination_of_extremes(name):
    """One batch holding every combination of the extremes across the inputs (81 pairs)."""
    if name in UNPAIRED:
        rows = list(itertools.product(EXTREMES, EXTREMES, (True, False)))
        columns = list(zip(*rows))
        return {"policy_logps": np.array(columns[0], np.float32),
                "ref_logps": np.array(columns[1], np.float32),
                "desirable": np.array(columns[2])}
    columns = list(zip(*itertools.product(EXTREMES, repeat=4)))
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
             "ref_rejected_logps")
    return {k: np.array(c, np.float32) for k, c in zip(names, columns)}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
def test_finite_at_every_combination_of_extreme_logps(name, beta):
    assert_finite_with_finite_gradients(name, every_combination_of_extremes(name), beta)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_at_empty_completions(name):
    batch = every_combination_of_extremes(name)
    empty = {k: (np.zeros_like(v) if k != "desirable" else v) for k, v in batch.items()}
    assert_finite_with_finite_gradients(name, empty, 0.1)
    assert np.isfinite(LOSSES[name](empty, 0.1)).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
@given(data=st.data(), beta=jt.betas())
def test_finite_at_random_extreme_logps(name, data, beta):
    assert_finite_with_finite_gradients(name, data.draw(batches(name, 4, extreme=True)), beta)


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("name", sorted(LOSSES))
@given(data=st.data())
def test_bf16_inputs_give_float32_results_close_to_float32_inputs(name, data):
    batch = data.draw(batches(name, 4, min_value=-50.0))
    bf16 = {k: (jnp.asarray(v, jnp.bfloat16) if k != "desirable" else v) for k, v in batch.items()}
    rounded = {k: (np.asarray(v, np.float32) if k != "desirable" else v) for k, v in bf16.items()}
    out = LOSSES[name](bf16, 0.1)
    assert out.dtype == jnp.float32 and out.shape == (4,)
    np.testing.assert_allclose(out, LOSSES[name](rounded, 0.1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float64_inputs_stay_float64(name):
    batch = every_combination_of_extremes(name)
    with jax.enable_x64(True):
        f64 = {k: (jnp.asarray(v, jnp.float64) if k != "desirable" else v)
               for k, v in batch.items()}
        assert LOSSES[name](f64, 0.1).dtype == jnp.float64


# ---------------------------------------------------------------- reductions and transforms
@pytest.mark.parametrize("name", sorted(LOSSES))
@given(data=st.data(), beta=jt.betas())
def test_gradient_accumulation_over_equal_micro_batches(name, data, beta):
    """The batch mean (and its gradient) equals the mean over equal micro-batches of theirs."""
    batch = data.draw(batches(name, 8, min_value=-50.0))
    labels = {k: v for k, v in batch.items() if k == "desirable"}

    def mean_loss(inputs, labels):
        return jnp.mean(LOSSES[name]({**inputs, **labels}, beta))

    full, full_grads = jax.value_and_grad(mean_loss)(float_inputs(batch), labels)
    scale = max(1.0, float(jnp.abs(full)))
    for n_micro in (2, 4):
        split = lambda tree: [jax.tree.map(lambda x: x[i::n_micro], tree) for i in range(n_micro)]  # noqa: E731,B023
        parts = [jax.value_and_grad(mean_loss)(inputs, lab)
                 for inputs, lab in zip(split(float_inputs(batch)), split(labels))]
        np.testing.assert_allclose(np.mean([float(v) for v, _ in parts]), full, rtol=1e-5,
                                   atol=1e-6 * scale)
        for key, grad in full_grads.items():
            accumulated = np.empty_like(np.asarray(grad))
            for i, (_, grads) in enumerate(parts):
                accumulated[i::n_micro] = np.asarray(grads[key]) / n_micro
            np.testing.assert_allclose(accumulated, grad, rtol=1e-5, atol=1e-7 * scale)


@functools.cache
def jitted(name):
    return jax.jit(LOSSES[name])


@pytest.mark.parametrize("name", sorted(LOSSES))
@given(data=st.data(), beta=jt.betas())
def test_jit_and_vmap_give_the_same_numbers(name, data, beta):
    rows = [data.draw(batches(name, 4, min_value=-50.0)) for _ in range(3)]
    eager = np.stack([np.asarray(LOSSES[name](row, beta)) for row in rows])
    for i, row in enumerate(rows):
        np.testing.assert_allclose(jitted(name)(row, beta), eager[i], rtol=1e-6, atol=1e-6)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *rows)
    mapped = jax.vmap(lambda b: LOSSES[name](b, beta))(stacked)
    assert mapped.shape == (3, 4)
    np.testing.assert_allclose(mapped, eager, rtol=1e-6, atol=1e-6)
