"""LoRA (jaxalign.models.lora, jaxalign.train.lora) against dense computations.

B = 0 is the base model bit for bit; merged equals unmerged; the adapters' matmul equals the
dense ``x (W + s A B)`` in float64 numpy; a LoRA DPO run's loss falls while the base weights
stay bit-identical and the optimiser holds state for the adapters alone.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxalign import train as steps
from flax.traverse_util import flatten_dict

from jaxalign.models import (CausalLM, RewardModel, get_config, init_cache, init_params, load_hf,
                             load_peft_adapter, lora, save_merged_hf, save_peft_adapter)
from jaxalign.models.lora_layer import LoraKernel, stored_once
from jaxalign.train.lora import lora_optimizer, trainable_opt_state

from lora_fixtures import pairs_batch, perturb_b

CONFIG = get_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                    d_ff=64, max_len=32)


@pytest.fixture(scope="module")
def base():
    model = CausalLM(CONFIG)
    return model, init_params(model, jax.random.key(0))


def _apply(model, params, tokens, **kwargs):
    return jax.jit(lambda p, t: model.apply({"params": p}, t, **kwargs))(params, tokens)


def _tokens(rows=2, length=9, seed=2):
    return jax.random.randint(jax.random.key(seed), (rows, length), 0, CONFIG.vocab_size)


def _perturb_b(params):
    """Non-zero B (as after training), so merged/unmerged differ from the base model."""
    return perturb_b(params, scale=0.05, seed=3)


def test_zero_b_is_the_base_model_exactly(base):
    model, params = base
    lora_model = lora.with_lora(model, 4, targets="all-linear")
    lora_params = lora.init_lora(lora_model, params, jax.random.key(1))
    shapes = jax.tree.map(jnp.shape, lora_params["trunk"]["layers_0"]["attn"]["o_proj"])
    assert shapes == {"kernel": (2, 16, 32), "lora_a": (2, 16, 4), "lora_b": (4, 32)}
    # r (d_in + d_out) per projection: q, k, v, o (GQA: k/v out = 16), gate, up, down
    assert lora.lora_parameter_count(lora_params) == 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32)
                                                          + 3 * (32 + 64))
    tokens = _tokens()
    np.testing.assert_array_equal(_apply(model, params, tokens),
                                  _apply(lora_model, lora_params, tokens))


def test_merged_equals_unmerged_and_adapters_off_is_base(base):
    model, params = base
    lora_model = lora.with_lora(model, 4, alpha=8.0, targets="q,v,down")
    trained = _perturb_b(lora.init_lora(lora_model, params, jax.random.key(1)))
    tokens = _tokens()
    unmerged = _apply(lora_model, trained, tokens)
    merged_params = lora.merge_lora(trained, lora_model.config)
    merged = _apply(lora.without_lora(lora_model), merged_params, tokens)
    base_logits = _apply(model, params, tokens)
    assert float(jnp.max(jnp.abs(unmerged - base_logits))) > 1e-2
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(_apply(lora_model, lora.base_params(trained), tokens),
                                  base_logits)
    back = lora.unmerge_lora(merged_params, lora.adapter_params(trained), lora_model.config)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(trained)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # the KV-cache decoder (fused q/k/v, gate/up) sees the merged kernels
    logits, _ = _apply(lora_model, trained, tokens, cache=init_cache(lora_model.config, 2, 16))
    np.testing.assert_allclose(logits, unmerged, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(rank=st.integers(1, 5), d_in=st.integers(1, 6), d_out=st.integers(1, 6),
       scale=st.floats(0.1, 4.0), seed=st.integers(0, 2**16))
def test_lora_kernel_is_the_dense_update_in_float64(rank, d_in, d_out, scale, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.normal(size=(3, 5, d_in)), rng.normal(size=(d_in, d_out))
    a, b = rng.normal(size=(d_in, rank)), rng.normal(size=(rank, d_out))
    kernel = LoraKernel(jnp.asarray(w, jnp.float32), jnp.asarray(a, jnp.float32),
                        jnp.asarray(b, jnp.float32), scale)
    got = kernel.einsum("btd,df->btf", jnp.asarray(x, jnp.float32), jnp.float32)
    np.testing.assert_allclose(got, x @ (w + scale * a @ b), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kernel.merged(), w + scale * a @ b, rtol=1e-5, atol=1e-5)


def test_stored_once_changes_no_bit_and_no_gradient():
    """The LoRA projection's ``base + scale·up`` goes through ``stored_once`` (a division by a
    parameter-derived 1.0, so XLA stores the sum instead of re-adding it in the backward
    pass): the sum comes back bit for bit, signed zeros, infinities and the extremes included
    (XLA:CPU flushes subnormals to zero in the add already), and its gradient is the
    identity, none reaching the anchor."""
    rng = np.random.default_rng(0)
    base = np.concatenate([rng.normal(size=60) * 10.0 ** rng.integers(-37, 38, 60),
                           [0.0, -0.0, -np.inf, np.inf, 3.4e38, -3.4e38, 1.0 / 3.0, 2e-38]])
    up = np.concatenate([rng.normal(size=60), [-0.0, -0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1e-38]])
    base, up = jnp.asarray(base, jnp.float32), jnp.asarray(up, jnp.float32)
    anchor = jnp.asarray([[0.3, -2.0]], jnp.float32)
    plain = jax.jit(lambda b, u: b + 0.5 * u)(base, up)
    kept = jax.jit(lambda b, u, a: stored_once(b + 0.5 * u, a))(base, up, anchor)
    np.testing.assert_array_equal(np.asarray(kept).view(np.uint32),
                                  np.asarray(plain).view(np.uint32))
    weights = jnp.arange(1.0, 11.0)
    gx, ga = jax.grad(lambda x, a: jnp.sum(weights * stored_once(x, a)), argnums=(0, 1))(
        jnp.ones(10), anchor)
    np.testing.assert_array_equal(gx, weights)
    np.testing.assert_array_equal(ga, np.zeros_like(anchor))


def test_bad_lora_settings_are_named():
    with pytest.raises(ValueError, match="lora_targets.*choose from"):
        lora.parse_lora_targets("q,lm_head")
    with pytest.raises(ValueError, match="lora_dropout"):
        get_config("tiny", lora_rank=4, lora_dropout=1.5)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        lora.with_lora(CausalLM(CONFIG), 0)
    with pytest.raises(ValueError, match="merge_lora needs the LoRA model"):
        lora.merge_lora({}, CONFIG)
    for bad, message in (({"lora_rank": -1}, "lora_rank must be at least 0, got -1"),
                         ({"lora_alpha": 0.0}, "lora_alpha must be positive, got 0.0"),
                         ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0")):
        for make in (lambda: get_config("tiny", **bad), lambda: lora.LoraConfig(**bad)):
            with pytest.raises(ValueError, match=message):  # one check, one message
                make()


def test_an_adapter_exported_beside_its_merged_model_changes_neither(base, tmp_path):
    """PEFT keeps ``adapter_model.safetensors`` apart from the model's ``model.safetensors``:
    an adapter written into a model's directory leaves its weights as they were, and each
    reads back alone (as transformers and PEFT read them)."""
    model, params = base
    lora_model = lora.with_lora(model, 4, alpha=8.0, targets="q,o,up")
    trained = _perturb_b(lora.init_lora(lora_model, params, jax.random.key(1)))
    save_merged_hf(lora_model, trained, tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    save_peft_adapter(lora_model, trained, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    _, merged = load_hf(tmp_path)
    want = flatten_dict(lora.merge_lora(trained, lora_model.config))
    assert flatten_dict(merged).keys() == want.keys()
    for path, leaf in flatten_dict(merged).items():
        np.testing.assert_array_equal(leaf, want[path], err_msg=str(path))
    loaded_model, loaded = load_peft_adapter(model, params, tmp_path)
    assert loaded_model.config == lora_model.config
    assert jax.tree.structure(loaded) == jax.tree.structure(trained)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(got, want)


def _pairs(rows=4, length=12):
    return pairs_batch(_tokens(2 * rows, length, seed=7), rows, length)


def test_lora_dpo_trains_only_the_adapters(base):
    model, params = base
    lora_model = lora.with_lora(model, 4)
    lora_params = lora.init_lora(lora_model, params, jax.random.key(1))
    optimizer = lora_optimizer(steps.make_optimizer(3e-3, total_steps=20))
    state = steps.create_train_state(jax.tree.map(jnp.copy, lora_params), optimizer,
                                     jax.random.key(4))
    assert state.ref_params is None  # the reference is the same tree with adapters off
    adapter_sizes = sorted(x.size for x in jax.tree.leaves(lora.adapter_params(lora_params)))
    moments = sorted(x.size for x in jax.tree.leaves(trainable_opt_state(state.opt_state))
                     if x.ndim)
    assert moments == sorted(adapter_sizes * 2)  # Adam's mu and nu, adapters only
    step = steps.make_preference_step(lora_model, optimizer, loss="dpo", beta=0.5)
    batch = _pairs()
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - np.log(2)) < 1e-5  # policy == reference at B = 0
    assert losses[-1] < losses[0] - 0.05
    assert int(metrics["skipped_updates"]) == 0
    trained = jax.device_get(state.params)
    for got, want in zip(jax.tree.leaves(lora.base_params(trained)),
                         jax.tree.leaves(lora.base_params(lora_params))):
        np.testing.assert_array_equal(got, want)
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(lora.adapter_params(trained)))


def test_bf16_reward_model_trains_float32_adapters_and_its_score_head():
    bf16 = dataclasses.replace(CONFIG, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    reward_model = lora.with_lora(RewardModel(bf16), 2, targets="q,v")
    reward_params = lora.init_lora(reward_model, init_params(reward_model, jax.random.key(5)),
                                   jax.random.key(6))
    mask = lora.trainable_mask(reward_params)
    assert mask["score_head"] == {"kernel": True, "bias": True}
    assert mask["trunk"]["layers_0"]["attn"]["q_proj"] == {
        "kernel": False, "lora_a": True, "lora_b": True}
    assert "lora_a" not in mask["trunk"]["layers_0"]["attn"]["k_proj"]
    q_proj = reward_params["trunk"]["layers_0"]["attn"]["q_proj"]
    assert q_proj["kernel"].dtype == jnp.bfloat16 and q_proj["lora_a"].dtype == jnp.float32
    grads = jax.jit(jax.grad(lambda p: jnp.sum(reward_model.apply({"params": p}, _tokens()))))(
        reward_params)
    assert float(jnp.abs(grads["trunk"]["embedding"]).max()) == 0.0  # frozen: stopped
    assert float(jnp.abs(grads["score_head"]["kernel"]).max()) > 0.0
    a_grad = grads["trunk"]["layers_0"]["attn"]["q_proj"]["lora_a"]
    assert a_grad.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(a_grad)))


def test_lora_dpo_on_a_mesh_equals_one_device_with_adapters_sharded_like_their_kernels():
    from jaxalign import sharding

    model = CausalLM(CONFIG)
    lora_model = lora.with_lora(model, 4)
    optimizer = lora_optimizer(steps.make_optimizer(3e-3, total_steps=4))

    def make_params(key):
        return lora.init_lora(lora_model, init_params(model, key), jax.random.fold_in(key, 1))

    def run(mesh):
        if mesh is None:
            state = steps.create_train_state(make_params(jax.random.key(0)), optimizer,
                                             jax.random.key(1))
        else:
            state = steps.create_sharded_train_state(
                make_params, optimizer, jax.random.key(1), mesh=mesh, model=lora_model,
                params_key=jax.random.key(0))
        step = steps.make_preference_step(lora_model, optimizer, loss="dpo", beta=0.5, mesh=mesh)
        history = []
        for _ in range(2):  # the second step runs on trained (non-zero) adapters
            batch = _pairs(8)
            state, metrics = step(state, batch if mesh is None
                                  else sharding.shard_batch(batch, mesh))
            history.append(jax.device_get(metrics))
        return state, history

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    (one, one_history), (sharded, sharded_history) = run(None), run(mesh)
    for got, want in zip(sharded_history, one_history):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
    attn = sharded.params["trunk"]["layers_0"]["attn"]
    assert attn["q_proj"]["lora_a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert attn["q_proj"]["lora_b"].sharding.spec[:2] == (None, "tensor")
    assert attn["o_proj"]["lora_a"].sharding.spec[:1] == ("tensor",)
    for got, want in zip(jax.tree.leaves(jax.device_get(sharded.params)),
                         jax.tree.leaves(jax.device_get(one.params))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=3e-4)


def test_lora_chunked_head_leaves_the_untied_lm_head_frozen():
    """The steps read the LM head through ``method="head"``: under LoRA its kernel gets no
    gradient (it used to, and the optimiser then zeroed the update, ∂W computed for nothing)."""
    model = CausalLM(dataclasses.replace(CONFIG, tie_embeddings=False))
    lora_model = lora.with_lora(model, 4)
    params = lora.init_lora(lora_model, init_params(model, jax.random.key(0)), jax.random.key(1))
    ids = np.asarray(_tokens(2, 12))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "completion_mask": (np.arange(12) >= 6)[None].repeat(2, 0).astype(np.int32)}
    grads = jax.jit(jax.grad(lambda p: steps.sft_loss(lora_model, p, batch)[0]))(
        _perturb_b(params))
    assert float(jnp.abs(grads["lm_head"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(grads["trunk"]["layers_0"]["mlp"]["up_proj"]["lora_a"]).max()) > 0.0


@pytest.mark.parametrize("targets", ["all-linear", "q,v,down"])
def test_plan_parameter_count_counts_the_adapters(targets):
    from jaxalign import plan

    config = dataclasses.replace(CONFIG, tie_embeddings=False)
    lora_model = lora.with_lora(CausalLM(config), 3, targets=targets)
    shapes = jax.eval_shape(lambda: lora.init_lora(
        lora_model, init_params(CausalLM(config), jax.random.key(0)), jax.random.key(1)))
    total = sum(x.size for x in jax.tree.leaves(shapes))
    assert plan.parameter_count(lora_model.config) == total
    assert plan.parameter_count(lora_model.config) - plan.parameter_count(config) == (
        lora.lora_parameter_count(shapes))
