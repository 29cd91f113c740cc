"""Blockwise attention equals dense masked softmax attention, forward and backward, and never
builds a ``T × T`` array; the implementation choice (dense / blockwise / cuDNN) is right.

The reference is the dense path (``[B, Hkv, G, T, T]`` scores masked by
``layout.allowed_mask``) with fully masked query rows zeroed, as the kernel defines them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign.models import attention as attention_module
from jaxalign.models import get_config
from jaxalign.models.attention import (
    AUTO_BLOCKWISE_MIN_LENGTH, _dense_attention, cudnn_applies, resolve_attention,
)
from jaxalign.models.blockwise import blockwise_attention
from jaxalign.models.layout import SequenceLayout, allowed_mask, layout_from_mask
from jaxalign.models.transformer import Transformer


def _dense(q, k, v, layout, scale, cap, window):
    allowed = allowed_mask(layout, window)
    out = _dense_attention(q, k, v, allowed, scale, cap)
    return out * jnp.any(allowed, axis=-1)[:, None, None, :, None]


def _random_layout(rng, batch, length):
    """Rows of packed segments (some with chosen/rejected branches) or left/right padding."""
    positions, segments, branches = (np.zeros((batch, length), np.int32) for _ in range(3))
    for b in range(batch):
        if rng.random() < 0.3:  # an ordinary left- or right-padded row
            real, mask = int(rng.integers(1, length + 1)), np.zeros(length, np.int32)
            mask[length - real:] = 1
            mask = mask if rng.random() < 0.5 else mask[::-1]
            segments[b], positions[b] = mask, np.maximum(np.cumsum(mask) - 1, 0)
            continue
        slot, segment = 0, 0
        while slot < length - 1:
            segment += 1
            parts = rng.integers(1, 5, 3 if rng.random() < 0.5 else 1)
            start = slot
            for branch, n in enumerate(parts):
                n = min(int(n), length - slot)
                positions[b, slot:slot + n] = (slot - start if branch == 0 else parts[0]) + np.arange(n)
                segments[b, slot:slot + n] = segment
                branches[b, slot:slot + n] = branch
                slot += n
    return SequenceLayout(*(jnp.asarray(a) for a in (positions, segments, branches)))


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), groups=st.integers(1, 3),
       length=st.integers(1, 19), head_dim=st.sampled_from([4, 8]), block=st.integers(1, 22),
       cap=st.sampled_from([None, 2.0]), window=st.sampled_from([None, 1, 3]),
       seed=st.integers(0, 2**16))
def test_blockwise_equals_dense_forward_and_backward(batch, kv_heads, groups, length,
                                                     head_dim, block, cap, window, seed):
    rng = np.random.default_rng(seed)
    layout = _random_layout(rng, batch, length)
    q = jnp.asarray(rng.normal(size=(batch, kv_heads, groups, length, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, kv_heads, length, head_dim)), jnp.float32)
            for _ in range(2))
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    kwargs = dict(scale=0.7, soft_cap=cap, window=window, block_size=block)

    def both(q, k, v):  # one compilation per drawn shape
        blockwise = lambda q, k, v: blockwise_attention(q, k, v, layout, **kwargs)  # noqa: E731
        dense = lambda q, k, v: _dense(q, k, v, layout, 0.7, cap, window)  # noqa: E731
        return [(fn(q, k, v), jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent),
                                       argnums=(0, 1, 2))(q, k, v))
                for fn in (blockwise, dense)]

    (out, grads), (expected_out, expected_grads) = jax.jit(both)(q, k, v)
    np.testing.assert_allclose(out, expected_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _shapes(inner)


def test_the_gradient_never_builds_a_t_by_t_array():
    length, block = 96, 16  # every other dimension is smaller than T
    layout = layout_from_mask(jnp.ones((2, length), jnp.int32))
    q = jnp.ones((2, 2, 2, length, 8))
    k = v = jnp.ones((2, 2, length, 8))

    def loss(q, k, v):
        return jnp.sum(blockwise_attention(q, k, v, layout, scale=0.3, block_size=block))

    shapes = list(_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr))
    assert shapes and not [s for s in shapes if sum(d >= length for d in s) >= 2]
    dense_shapes = _shapes(jax.make_jaxpr(jax.grad(
        lambda q, k, v: jnp.sum(_dense(q, k, v, layout, 0.3, None, None)), argnums=(0, 1, 2)))(
            q, k, v).jaxpr)
    assert any(sum(d >= length for d in s) >= 2 for s in dense_shapes)  # the check can fail


CONFIG = dataclasses.replace(
    get_config("tiny", vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48),
    attn_logit_softcap=4.0, query_pre_attn_scalar=10.0, sliding_window=4,
    layer_types=("sliding_attention", "full_attention"))


def test_blockwise_model_equals_dense_model_with_padding_and_gradients():
    """Whole trunk, padded rows (no layout; one full, one left-, one right-padded row):
    hidden states on real tokens and the gradient of a masked loss agree between dense and
    blockwise (block size not dividing T), with GQA, soft-capping and a sliding window."""
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(1, 64, (3, 21)), jnp.int32)
    slots = np.arange(21)
    mask = jnp.asarray(np.stack([slots >= 0, slots >= 8, slots < 6]).astype(np.int32))
    dense_model = Transformer(dataclasses.replace(CONFIG, attention_impl="dense"))
    block_model = Transformer(dataclasses.replace(CONFIG, attention_impl="blockwise",
                                                  attention_block=8))
    params = jax.jit(dense_model.init)(jax.random.key(0), tokens, mask)
    weights = jnp.asarray(rng.normal(size=(3, 21, 32)), jnp.float32) * mask[..., None]

    def run(model):
        def loss(p):
            hidden = model.apply(p, tokens, mask)[0]
            return jnp.sum(hidden * weights), hidden
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    ((_, dense_hidden), dense_grad), ((_, block_hidden), block_grad) = (
        run(dense_model), run(block_model))
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(block_hidden)[real], np.asarray(dense_hidden)[real],
                               atol=1e-5, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(block_grad), jax.tree.leaves(dense_grad)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_resolve_attention_picks_by_setting_backend_and_length():
    bf16 = dataclasses.replace(get_config("tiny"), dtype="bfloat16", attention_impl="auto")
    capped = dataclasses.replace(bf16, attn_logit_softcap=30.0)
    long, short = AUTO_BLOCKWISE_MIN_LENGTH, AUTO_BLOCKWISE_MIN_LENGTH - 1
    assert resolve_attention(bf16, long, cached=False, backend="cpu") == "blockwise"
    assert resolve_attention(bf16, short, cached=False, backend="cpu") == "dense"
    assert resolve_attention(bf16, long, cached=False, backend="tpu") == "blockwise"
    assert resolve_attention(bf16, short, cached=False, backend="gpu") == "cudnn"
    assert resolve_attention(capped, long, cached=False, backend="gpu") == "blockwise"
    assert resolve_attention(bf16, long, cached=True, backend="gpu") == "dense"
    f32 = dataclasses.replace(bf16, dtype="float32")
    assert not cudnn_applies(f32) and cudnn_applies(bf16) and not cudnn_applies(capped)
    assert resolve_attention(f32, short, cached=False, backend="gpu") == "dense"
    for impl in ("dense", "blockwise"):
        fixed = dataclasses.replace(bf16, attention_impl=impl)
        assert resolve_attention(fixed, long, cached=False, backend="gpu") == impl
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        dataclasses.replace(bf16, attention_impl="flash")


def test_cpu_never_takes_the_cudnn_path(monkeypatch):
    assert jax.default_backend() == "cpu"

    def refuse(*args, **kwargs):
        raise AssertionError("jax.nn.dot_product_attention called on CPU")

    monkeypatch.setattr(jax.nn, "dot_product_attention", refuse)
    config = dataclasses.replace(get_config("tiny", n_layers=1), dtype="bfloat16",
                                 attention_impl="auto")
    assert attention_module.resolve_attention(config, AUTO_BLOCKWISE_MIN_LENGTH,
                                              cached=False) == "blockwise"
    tokens = jnp.ones((1, AUTO_BLOCKWISE_MIN_LENGTH), jnp.int32)
    shapes = jax.eval_shape(lambda: Transformer(config).init_with_output(
        jax.random.key(0), tokens)[0][0])
    assert shapes.shape == (1, AUTO_BLOCKWISE_MIN_LENGTH, config.d_model)


def test_bad_shapes_are_refused_by_name():
    q = jnp.ones((1, 2, 2, 5, 4))
    with pytest.raises(ValueError, match=r"k and v must be \[B, Hkv, T, Dh\] = \(1, 2, 5, 4\)"):
        blockwise_attention(q, jnp.ones((1, 2, 6, 4)), jnp.ones((1, 2, 6, 4)),
                            layout_from_mask(jnp.ones((1, 5), jnp.int32)), scale=1.0)
