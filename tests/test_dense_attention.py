"""Dense attention's hand-written gradient (probabilities recomputed from the saved row maximum
and normaliser, transposed) equals plain autodiff of masked softmax attention, and so does its
value: grouped-query heads, soft-capping, padding rows that may attend to nothing, bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign.models.attention import MASKED_SCORE, _dense_attention, soft_cap


def _plain(q, k, v, allowed, scale, cap):
    """The formula, differentiated by JAX: ``softmax(mask(cap(q kᵀ · scale))) v``."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None, None], soft_cap(scores * scale, cap), MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v, preferred_element_type=jnp.float32)


def _inputs(seed, batch, kv_heads, groups, length, head_dim, dtype):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, kv_heads, groups, length, head_dim))
    k, v = (rng.normal(size=(batch, kv_heads, length, head_dim)) for _ in range(2))
    causal = np.tril(np.ones((length, length), bool))
    real = rng.integers(0, length + 1, batch)  # left padding; row 0 of a padded row is empty
    allowed = np.stack([causal & (np.arange(length) >= length - r)[None, :] for r in real])
    allowed[0, 0] = False  # a query that may attend to nothing
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jnp.asarray(allowed), jnp.asarray(rng.normal(
        size=(batch, kv_heads, groups, length, head_dim)), jnp.float32)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 2), kv_heads=st.integers(1, 2),
       groups=st.integers(1, 3), length=st.sampled_from([1, 5, 12]),
       cap=st.sampled_from([None, 1.5]))
def test_value_and_gradients_equal_autodiff_of_the_formula(seed, batch, kv_heads, groups,
                                                            length, cap):
    q, k, v, allowed, cotangent = _inputs(seed, batch, kv_heads, groups, length, 8, jnp.float32)
    scale = 8**-0.5

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, allowed, scale, cap) * cotangent)

    ours = jax.value_and_grad(lambda *a: loss(_dense_attention, *a), argnums=(0, 1, 2))(q, k, v)
    plain = jax.value_and_grad(lambda *a: loss(_plain, *a), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", ours[1], plain[1]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
    np.testing.assert_allclose(_dense_attention(q, k, v, allowed, scale, cap),
                               _plain(q, k, v, allowed, scale, cap), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cap", [None, 1.5])
def test_bfloat16_gradients_are_finite_and_follow_float32(cap):
    q, k, v, allowed, cotangent = _inputs(3, 2, 2, 2, 9, 8, jnp.bfloat16)
    loss = lambda *a: jnp.sum(_dense_attention(*a, allowed, 8**-0.5, cap) * cotangent)  # noqa: E731
    grads16 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    grads32 = jax.grad(loss, argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (q, k, v)))
    for got, want in zip(grads16, grads32):
        assert got.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(got)))
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.1, atol=0.05)
