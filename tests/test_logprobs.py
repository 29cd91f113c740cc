"""Log-prob helpers: the shift convention, masking, and float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxalign as ja
from jaxalign import testing as jt


def np_log_softmax(x):
    x = np.float64(x)
    return x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)


def test_token_logprobs_shift_convention():
    key = jax.random.key(0)
    logits = jax.random.normal(key, (2, 4, 6))
    tokens = jnp.array([[1, 2, 3, 4], [5, 0, 1, 2]])
    out = ja.token_logprobs(logits, tokens)
    ref = np_log_softmax(logits)
    assert out.shape == (2, 4)
    np.testing.assert_array_equal(out[:, 0], 0.0)
    for b in range(2):
        for t in range(1, 4):
            np.testing.assert_allclose(out[b, t], ref[b, t - 1, tokens[b, t]], rtol=1e-5)


@given(jt.logits((2, 5, 7)), st.data())
def test_sequence_logprobs_sum_and_mean(logits, data):
    tokens = np.array(data.draw(st.lists(st.integers(0, 6), min_size=10, max_size=10))).reshape(2, 5)
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], np.float32)
    per_token = np.asarray(ja.token_logprobs(logits, tokens), np.float64)
    total = ja.sequence_logprobs(logits, tokens, mask)
    mean = ja.sequence_logprobs(logits, tokens, mask, average=True)
    np.testing.assert_allclose(total, (per_token * mask).sum(-1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(mean, (per_token * mask).sum(-1) / mask.sum(-1), rtol=1e-5, atol=1e-4)


def test_masked_positions_never_change_sequence_logprobs():
    logits = jax.random.normal(jax.random.key(1), (1, 5, 7))
    tokens = jnp.array([[1, 2, 3, 4, 5]])
    mask = jnp.array([[0, 1, 1, 0, 0]])
    # changing logits that predict masked tokens (positions 2.. predict 3..) must not matter
    poisoned = logits.at[:, 2:].set(jnp.nan)
    np.testing.assert_allclose(
        ja.sequence_logprobs(poisoned, tokens, mask), ja.sequence_logprobs(logits, tokens, mask)
    )


def test_empty_completion_gives_zero_not_nan():
    logits = jnp.zeros((1, 3, 4))
    tokens = jnp.zeros((1, 3), jnp.int32)
    mask = jnp.zeros((1, 3))
    assert float(ja.sequence_logprobs(logits, tokens, mask, average=True)[0]) == 0.0
    g = jax.grad(lambda x: ja.sequence_logprobs(x, tokens, mask, average=True).sum())(logits)
    assert np.isfinite(g).all()


def test_bf16_logits_give_float32_logprobs():
    logits = jax.random.normal(jax.random.key(2), (2, 3, 5)).astype(jnp.bfloat16)
    out = ja.token_logprobs(logits, jnp.ones((2, 3), jnp.int32))
    assert out.dtype == jnp.float32


def test_shape_errors_name_the_arguments():
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) and tokens \(2, 4\)"):
        ja.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="completion_mask"):
        ja.sequence_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4)))
