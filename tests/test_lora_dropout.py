"""LoRA dropout (PEFT's ``lora_dropout``) in the training steps.

The adapters' path is ``((x · mask) / (1 − p)) @ A @ B · scale`` for the mask drawn from the
pass's ``"dropout"`` rng (checked in float64 numpy), the base path is untouched; the steps draw
that rng from the state (:func:`jaxalign.train.state.train_dropout_key`), so a replayed step is
identical and the next step draws new masks; p = 0 is bit for bit the step without an rng; the
reference pass never drops; a LoRA DPO run with p = 0.1 still learns.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxalign import train as steps
from jaxalign.models import CausalLM, RewardModel, get_config, init_params, lora
from jaxalign.models.lora_layer import LoraKernel
from jaxalign.train import preference, reward, sft
from jaxalign.train.lora import lora_optimizer
from jaxalign.train.state import train_dropout_key

from lora_fixtures import pairs_batch, perturb_b

CONFIG = get_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                    d_ff=64, max_len=32)
BETA = 0.5


@settings(max_examples=10, deadline=None)
@given(p=st.floats(0.05, 0.9), rank=st.integers(1, 4), d_in=st.integers(1, 6),
       d_out=st.integers(1, 6), scale=st.floats(0.1, 4.0), seed=st.integers(0, 2**16))
def test_dropped_adapter_path_is_the_closed_form(p, rank, d_in, d_out, scale, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=(3, 5, d_in)), rng.normal(size=(d_in, d_out))
    a, b = rng.normal(size=(d_in, rank)), rng.normal(size=(rank, d_out))
    key = jax.random.key(seed)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    kernel = LoraKernel(f32(w), f32(a), f32(b), scale, dropout=p, key=key)
    got = kernel.einsum("btd,df->btf", f32(x), jnp.float32)
    mask = np.asarray(jax.random.bernoulli(key, 1.0 - p, x.shape), np.float64)
    np.testing.assert_allclose(got, x @ w + scale * ((x * mask) / (1 - p)) @ a @ b,
                               rtol=1e-4, atol=1e-4)
    # the base path alone (A = 0): dropout does not touch it
    base_only = LoraKernel(f32(w), f32(np.zeros_like(a)), f32(b), scale, dropout=p, key=key)
    np.testing.assert_allclose(base_only.einsum("btd,df->btf", f32(x), jnp.float32), x @ w,
                               rtol=1e-5, atol=1e-5)


def _lora(p, model_cls=CausalLM, targets="all-linear"):
    model = model_cls(CONFIG)
    lora_model = lora.with_lora(model, 4, targets=targets, dropout=p)
    params = lora.init_lora(lora_model, init_params(model, jax.random.key(0)), jax.random.key(1))
    return lora_model, perturb_b(params, scale=0.3, seed=3)  # the adapters' dropout shows


def _pairs(rows=4, length=12):
    ids = jax.random.randint(jax.random.key(7), (2 * rows, length), 0, 64)
    return pairs_batch(ids, rows, length)


def _state(params, optimizer, ref_params=None, step=0):
    state = steps.create_train_state(jax.tree.map(jnp.copy, params), optimizer,
                                     jax.random.key(4), ref_params=ref_params)
    return state.replace(step=jnp.asarray(step, jnp.int32))


def _run(step, state, batch):
    new, metrics = step(jax.tree.map(jnp.copy, state), batch)
    return jax.device_get(new.params), jax.device_get(metrics)


def test_zero_dropout_step_is_bit_identical_to_the_step_without_an_rng(monkeypatch):
    model, params = _lora(0.0)
    optimizer = lora_optimizer(steps.make_optimizer(1e-2, total_steps=4))
    state, batch = _state(params, optimizer), _pairs()
    with_rng = _run(steps.make_preference_step(model, optimizer, loss="dpo", beta=BETA),
                    state, batch)
    monkeypatch.setattr(preference, "train_dropout_key", lambda state: None)
    without = _run(steps.make_preference_step(model, optimizer, loss="dpo", beta=BETA),
                   state, batch)
    for got, want in zip(jax.tree.leaves(with_rng), jax.tree.leaves(without)):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def dpo():
    """A LoRA model with dropout 0.1 and its DPO step, compiled once for the tests below (a
    state with ``ref_params``: both give it a LoRA tree)."""
    model, params = _lora(0.1)
    optimizer = lora_optimizer(steps.make_optimizer(3e-3, total_steps=20))
    return model, params, optimizer, steps.make_preference_step(model, optimizer, loss="dpo",
                                                                beta=BETA)


def test_dpo_step_dropout_is_deterministic_per_step_and_spares_the_reference(dpo):
    model, params, optimizer, step = dpo
    batch = _pairs()
    # a reference that has adapters itself, so a dropped reference pass would show
    state = _state(params, optimizer, ref_params=params)
    first, again = _run(step, state, batch), _run(step, state, batch)
    for got, want in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(got, want)
    metrics = first[1]
    # the policy pass used the step's key: logps/chosen is the dropped model's ...
    # jitted, one compile each, instead of op-by-op eager dispatch of the LoRA model
    logps = jax.jit(lambda p, b, key: preference.pair_logps(model, p, b, average=False,
                                                            dropout_key=key))
    dropped = logps(params, batch, train_dropout_key(state))
    clean = logps(params, batch, None)
    np.testing.assert_allclose(metrics["logps/chosen"], np.mean(dropped[0]), rtol=1e-5)
    assert abs(float(np.mean(dropped[0]) - np.mean(clean[0]))) > 1e-3
    # ... and the reference is the deterministic one: rewards = β (π_dropped − ref_clean)
    np.testing.assert_allclose(metrics["rewards/chosen"],
                               BETA * np.mean(dropped[0] - clean[0]), rtol=1e-4, atol=1e-6)
    later = _run(step, state.replace(step=jnp.asarray(1, jnp.int32)), batch)[1]
    assert abs(float(later["loss"] - metrics["loss"])) > 1e-5  # the next step: new masks


@pytest.mark.parametrize("kind", ["sft", "reward"])
def test_sft_and_reward_steps_drop_deterministically(kind):
    model, params = _lora(0.5, RewardModel if kind == "reward" else CausalLM)
    optimizer = lora_optimizer(steps.make_optimizer(1e-2, total_steps=4))
    pairs = _pairs()
    if kind == "sft":
        batch = {"input_ids": pairs["chosen_ids"], "attention_mask": pairs["chosen_attention_mask"],
                 "completion_mask": pairs["chosen_completion_mask"]}
        step, loss = steps.make_sft_step(model, optimizer), sft.sft_loss
    else:
        batch = {k: v for k, v in pairs.items() if "completion" not in k}
        step, loss = steps.make_reward_step(model, optimizer), reward.reward_loss
    state = _state(params, optimizer)
    (_, first), (_, again) = _run(step, state, batch), _run(step, state, batch)
    assert first["loss"] == again["loss"]
    loss_at = jax.jit(lambda p, b, key: loss(model, p, b, dropout_key=key)[0])  # not eager
    dropped = float(loss_at(params, batch, train_dropout_key(state)))
    np.testing.assert_allclose(first["loss"], dropped, rtol=1e-5)
    assert abs(dropped - float(loss_at(params, batch, None))) > 1e-4


def test_lora_dpo_with_dropout_still_lowers_the_loss(dpo):
    model, _, optimizer, step = dpo
    params = lora.init_lora(model, init_params(CausalLM(CONFIG), jax.random.key(0)),
                            jax.random.key(1))  # B = 0, the reference as it starts
    state, batch = _state(params, optimizer, ref_params=params), _pairs()
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - np.log(2)) < 1e-5  # B = 0: the dropped adapters add nothing yet
    assert losses[-1] < losses[0] - 0.05


def test_lora_config_carries_dropout_to_the_model():
    model = lora.LoraConfig(lora_rank=4, lora_dropout=0.05).apply(CausalLM(CONFIG))
    assert model.config.lora_dropout == 0.05
    assert lora.LoraConfig(lora_rank=4).apply(CausalLM(CONFIG)).config.lora_dropout == 0.0
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        lora.LoraConfig(lora_rank=4, lora_dropout=1.0)


def test_ppo_update_loss_drops_the_policy_pass_when_given_a_key():
    from jaxalign.train.rlhf import _forwards
    from jaxalign.train.rlhf_config import GRPOConfig
    from jaxalign.train.rlhf_update import policy_loss_fn

    model, params = _lora(0.5)
    config = GRPOConfig()
    forwards = _forwards(model, None, config)
    ids = np.asarray(jax.random.randint(jax.random.key(8), (2, 10), 0, 64))
    completion, mask = ids[:, 4:], np.ones((2, 6), np.int32)
    old, _, _ = jax.jit(forwards.policy, static_argnums=3)(params, ids, np.ones_like(ids), 4,
                                                          completion, mask)
    mb = {"ids": ids, "attn": np.ones_like(ids), "completion": completion, "mask": mask,
          "old_logps": old, "advantages": np.array([[1.0] * 6, [-1.0] * 6], np.float32),
          "old_values": np.zeros((2, 6), np.float32), "returns": np.zeros((2, 6), np.float32),
          "ref_logps": old}
    loss_fn = jax.jit(policy_loss_fn(forwards, config, False, 4))
    key = jax.random.key(9)
    clean = float(loss_fn(params, None, mb, 0.0)[0])
    dropped, again = (float(loss_fn(params, None, mb, 0.0, key)[0]) for _ in range(2))
    assert dropped == again and abs(dropped - clean) > 1e-6
