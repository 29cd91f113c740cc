"""bfloat16 parameters trained on float32 master weights (``train.float32_master_weights``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign import train
from jaxalign.models import CausalLM, TransformerConfig, init_params
from jaxalign.train.optim import float32_master_weights

STEPS = 20
# Tolerance of the bf16 trajectory against float32's, per step (stated in the README): bf16
# rounds every matmul input to 8 bits of mantissa, which moves a loss of ~0.7 by ~1e-3.
BF16_TOLERANCE = 5e-3


def _batch(vocab: int, rows: int = 8, length: int = 24) -> dict:
    rng = np.random.default_rng(0)
    batch = {"margin": np.zeros(rows, np.float32), "p_chosen": np.ones(rows, np.float32)}
    for side in ("chosen", "rejected"):
        completion = np.zeros((rows, length), np.int32)
        completion[:, 8:] = 1
        batch.update({f"{side}_ids": rng.integers(3, vocab, (rows, length)).astype(np.int32),
                      f"{side}_attention_mask": np.ones((rows, length), np.int32),
                      f"{side}_completion_mask": completion})
    return batch


def _dpo_losses(dtype: str) -> tuple[np.ndarray, train.TrainState]:
    config = TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                               d_ff=64, max_len=32, param_dtype=dtype, dtype=dtype)
    model = CausalLM(config)
    float32 = init_params(CausalLM(TransformerConfig(vocab_size=64, d_model=32, n_layers=1,
                                                     n_heads=2, n_kv_heads=1, d_ff=64,
                                                     max_len=32)), jax.random.key(0))
    params = jax.tree.map(lambda x: x.astype(dtype), float32)  # the same start, rounded
    optimizer = train.make_optimizer(1e-3, total_steps=STEPS, master_weights=True)
    state = train.create_train_state(params, optimizer, jax.random.key(1), ref_params=params)
    step = train.make_preference_step(model, optimizer, loss="dpo", beta=0.1)
    batch, losses = _batch(config.vocab_size), []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.asarray(losses), state


def test_bf16_dpo_follows_the_float32_trajectory():
    float32, _ = _dpo_losses("float32")
    bf16, state = _dpo_losses("bfloat16")
    assert bf16[-1] < bf16[0] - 0.3  # the loss falls (from ln 2 ≈ 0.693)
    assert np.abs(bf16 - float32).max() <= BF16_TOLERANCE
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    master = state.opt_state.master  # float32 master weights and moments
    assert {leaf.dtype for leaf in jax.tree.leaves(master)} == {jnp.dtype(jnp.float32)}
    jax.tree.map(lambda p, m: np.testing.assert_array_equal(p, m.astype(jnp.bfloat16)),
                 state.params, master)


def test_master_weights_keep_updates_bf16_rounding_would_lose():
    """SGD at lr 1e-4 on a parameter of 1 (bf16 spacing there: 2^-7 ≈ 0.0078): alone, every
    update rounds away; with master weights 100 steps reach 0.99, and the bf16 param follows."""
    params = {"w": jnp.ones((4,), jnp.bfloat16)}
    grads = {"w": jnp.ones((4,), jnp.bfloat16)}
    for wrapped, expected in ((False, 1.0), (True, float(jnp.bfloat16(0.99)))):
        optimizer = optax.sgd(1e-4)
        if wrapped:
            optimizer = float32_master_weights(optimizer)
        state, p = optimizer.init(params), params
        for _ in range(100):
            updates, state = optimizer.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        assert p["w"].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(p["w"], np.float32), expected, atol=1e-6)


def test_master_weights_are_a_no_op_for_float32_params():
    params = {"w": jnp.arange(4.0)}
    inner = optax.adamw(1e-2)
    wrapped = train.make_optimizer(1e-2, total_steps=5, master_weights=True)
    plain = train.make_optimizer(1e-2, total_steps=5)
    assert jax.tree.structure(wrapped.init(params)) == jax.tree.structure(plain.init(params))
    state = float32_master_weights(inner).init(params)
    assert jax.tree.structure(state) == jax.tree.structure(inner.init(params))
    with pytest.raises(ValueError, match="needs the params"):
        float32_master_weights(inner).update(
            {"w": jnp.ones(4, jnp.bfloat16)}, float32_master_weights(inner).init(
                {"w": jnp.ones(4, jnp.bfloat16)}))
