"""Tests for jaxalign.models: config presets, padding invariance, KV cache, dtypes, heads.

Compilation dominates the cost on CPU, so the tests share one set of tiny-model parameters
and one input shape ``[3, 12]`` wherever they can, and run with rank promotion set to "raise".
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.logprobs import token_logprobs
from jaxalign.models import (
    LOGICAL_AXIS_NAMES,
    PRESETS,
    CausalLM,
    CausalLMWithValueHead,
    RewardModel,
    TransformerConfig,
    ValueModel,
    get_config,
    init_cache,
    causal_lm_params,
    init_head_from_causal_lm,
    init_params,
    last_token_index,
    logical_axes,
    value_params_from_reward_model,
)
from jaxalign.models.transformer import stack_layer_params, unstack_layer_params

TINY = get_config("tiny")
SCANNED = dataclasses.replace(TINY, scan_layers=True)
SHAPE = (3, 12)


@pytest.fixture(autouse=True)
def _raise_on_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(scope="module")
def params():
    with jax.numpy_rank_promotion("raise"):
        return init_params(CausalLM(TINY), jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(1, TINY.vocab_size, SHAPE).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _jitted_forward(model):
    return jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))


def _forward(model):
    """One jitted forward per model (compiled once per input shape); mask defaults to ones."""
    forward = _jitted_forward(model)
    return lambda p, t, m=None: forward(p, t, np.ones(np.shape(t), np.int32) if m is None else m)


def _pad(tokens, lengths, *, left: bool, pad_id: int = 0):
    """Rows ``tokens[b, :lengths[b]]`` packed into ``tokens.shape`` with left or right padding."""
    out = np.full(tokens.shape, pad_id, np.int32)
    mask = np.zeros(tokens.shape, np.int32)
    width = tokens.shape[1]
    for b, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        out[b, cols], mask[b, cols] = tokens[b, :n], 1
    return out, mask


def test_presets_and_replace():
    bench = get_config("bench")
    assert (bench.vocab_size, bench.d_model, bench.n_layers, bench.n_heads) == (4096, 256, 4, 8)
    assert (bench.n_kv_heads, bench.d_ff, bench.tie_embeddings) == (4, 688, False)
    assert TINY.resolved_head_dim == 16 and TINY.group_size == 2
    wider = dataclasses.replace(TINY, d_model=128)
    assert wider.resolved_head_dim == 32 and wider.n_layers == TINY.n_layers
    assert get_config("tiny", remat=True).remat and not PRESETS["tiny"].remat
    assert get_config("small").d_model == 128
    assert get_config("tiny", dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="name='huge'"):
        get_config("huge")
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="remat_policy must be 'nothing' or 'dots', got 'some'"):
        TransformerConfig(remat=True, remat_policy="some")


def test_params_carry_logical_axis_names(params):
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    for config in (TINY, SCANNED):
        model = CausalLM(config)
        specs = jax.tree.leaves(logical_axes(model), is_leaf=is_spec)
        shapes = jax.tree.leaves(jax.eval_shape(lambda m=model: init_params(m, jax.random.key(0))))
        assert len(specs) == len(shapes)
        for spec, shape in zip(specs, shapes):
            assert len(spec) == len(shape.shape) and set(spec) <= set(LOGICAL_AXIS_NAMES)
        assert ("layers" in {n for spec in specs for n in spec}) == config.scan_layers
    q_spec = logical_axes(CausalLM(SCANNED))["trunk"]["layers"]["attn"]["q_proj"]["kernel"]
    assert tuple(q_spec) == ("layers", "embed", "heads", "head_dim")
    q_spec = logical_axes(CausalLM(TINY))["trunk"]["layers_0"]["attn"]["q_proj"]["kernel"]
    assert tuple(q_spec) == ("embed", "heads", "head_dim")
    # model.init returns the same tree boxed with those names.
    boxed = jax.eval_shape(CausalLM(TINY).init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
    leaf = boxed["params"]["trunk"]["embedding"]
    assert isinstance(leaf, nn.LogicallyPartitioned) and leaf.names == ("vocab", "embed")
    assert nn.meta.unbox(leaf).shape == params["trunk"]["embedding"].shape


def test_padding_invariance(params, tokens):
    """Left-padded, right-padded and unpadded rows give the same per-token log-probs.

    The unpadded reference for a row of length n is the first n positions of the unpadded
    full-width row (the model is causal), so every run has the shape [3, 12].
    """
    forward = _forward(CausalLM(TINY))
    reference = np.asarray(token_logprobs(forward(params, tokens), tokens))
    lengths = [12, 5, 8]
    for left in (True, False):
        padded, mask = _pad(tokens, lengths, left=left, pad_id=7)
        logps = np.asarray(token_logprobs(forward(params, padded, mask), padded))
        for b, n in enumerate(lengths):
            # Skip each row's first real token: it has no prediction (its entry is computed
            # from whatever precedes it, padding on the left).
            np.testing.assert_allclose(logps[b][mask[b] == 1][1:], reference[b, 1:n], atol=1e-5)


@pytest.mark.parametrize("config", [SCANNED, TINY], ids=["scan", "unrolled"])
def test_kv_cache_decode_matches_full_forward(params, tokens, config):
    """Prefill a left-padded prompt, then feed tokens one at a time: same logits as one pass."""
    model = CausalLM(config)
    params = stack_layer_params(params, config.n_layers) if config.scan_layers else params
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # row 1 has 3 tokens of left padding
    full = np.asarray(_forward(model)(params, tokens, mask))
    step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, cache=c))
    logits, cache = step(params, tokens[:, :8], mask[:, :8], init_cache(config, 3, 14))
    outs = [np.asarray(logits)]
    for t in range(8, 12):
        logits, cache = step(params, tokens[:, t:t + 1], mask[:, t:t + 1], cache)
        outs.append(np.asarray(logits))
    decoded = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(decoded[mask == 1], full[mask == 1], atol=1e-5)
    assert int(cache.index) == 12 and int(cache.mask.sum()) == int(mask.sum())
    assert len(cache.keys) == config.n_layers and cache.keys[0].shape == (3, 2, 14, 16)


def test_scan_and_unrolled_layouts_agree(params, tokens):
    stacked = stack_layer_params(params, TINY.n_layers)
    assert "layers" in stacked["trunk"] and "layers_0" not in stacked["trunk"]
    assert stacked["trunk"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 172)
    jax.tree.map(np.testing.assert_array_equal,
                 unstack_layer_params(stacked, TINY.n_layers), params)
    np.testing.assert_allclose(_forward(CausalLM(SCANNED))(stacked, tokens),
                               _forward(CausalLM(TINY))(params, tokens), atol=1e-5)


def test_bf16_compute_gives_f32_logits_close_to_f32(params, tokens):
    logits32 = _forward(CausalLM(TINY))(params, tokens)
    logits16 = _forward(CausalLM(dataclasses.replace(TINY, dtype=jnp.bfloat16)))(params, tokens)
    assert logits16.dtype == jnp.float32 and logits32.dtype == jnp.float32
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    lp32, lp16 = (np.asarray(jax.nn.log_softmax(x)) for x in (logits32, logits16))
    np.testing.assert_allclose(lp16, lp32, atol=2e-2)
    assert not np.array_equal(lp16, lp32)  # bf16 really ran


def test_remat_gives_same_logits_and_grads(params, tokens):
    def value_and_grad(config):
        model = CausalLM(config)
        weights = stack_layer_params(params, 2) if config.scan_layers else params

        def loss(p):
            return -token_logprobs(model.apply({"params": p}, tokens), tokens).mean()

        return jax.jit(jax.value_and_grad(loss))(weights)

    value, grads = value_and_grad(TINY)
    assert float(jnp.abs(grads["trunk"]["layers_1"]["mlp"]["up_proj"]["kernel"]).sum()) > 0
    for config in (dataclasses.replace(TINY, remat=True), dataclasses.replace(SCANNED, remat=True),
                   dataclasses.replace(TINY, remat=True, remat_policy="dots")):
        value_r, grads_r = value_and_grad(config)
        np.testing.assert_allclose(value_r, value, rtol=1e-6)
        grads_r = unstack_layer_params(grads_r, TINY.n_layers)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_r, grads)


def test_value_and_reward_models(params, tokens):
    value_model, reward_model = ValueModel(TINY), RewardModel(TINY)
    reward_params = init_head_from_causal_lm(reward_model, params, jax.random.key(6))
    assert set(reward_params) == {"trunk", "score_head"}
    assert reward_params["trunk"] is params["trunk"]
    value_params = init_head_from_causal_lm(value_model, params, jax.random.key(5))
    assert set(value_params) == {"trunk", "value_head"}
    from_rm = value_params_from_reward_model(reward_params)
    assert from_rm["trunk"] is params["trunk"]
    assert from_rm["value_head"] is reward_params["score_head"]
    # The same head as a per-token value model gives the score at every position.
    per_token = _forward(value_model)(
        {"trunk": params["trunk"], "value_head": reward_params["score_head"]}, tokens)
    assert per_token.shape == SHAPE and per_token.dtype == jnp.float32

    lengths = [12, 4, 7]
    rewards = {}
    for left in (True, False):
        for pad_id in (0, 99):
            padded, mask = _pad(tokens, lengths, left=left, pad_id=pad_id)
            rewards[left, pad_id] = np.asarray(_forward(reward_model)(reward_params, padded, mask))
    first = rewards[True, 0]
    assert first.shape == (3,) and first.dtype == np.float32
    for other in rewards.values():  # padding side and padding contents never matter
        np.testing.assert_allclose(other, first, atol=1e-5)
    # ... because the reward is the head at each row's last real token.
    np.testing.assert_allclose(first, np.asarray(per_token)[[0, 1, 2], [11, 3, 6]], atol=1e-5)


def test_last_token_index():
    mask = jnp.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(last_token_index(mask), [1, 3, 3, 0])


def test_causal_lm_with_value_head_shares_trunk(params, tokens):
    both = CausalLMWithValueHead(TINY)
    both_params = init_head_from_causal_lm(both, params, jax.random.key(7))
    assert set(both_params) == {"trunk", "lm_head", "value_head"}
    logits, values = _forward(both)(both_params, tokens)
    np.testing.assert_allclose(logits, _forward(CausalLM(TINY))(params, tokens), atol=1e-6)
    hidden = jax.jit(lambda p, t: CausalLM(TINY).apply(
        {"params": p}, t, method=lambda m, t: m.trunk(t)[0]))(params, tokens)
    head = both_params["value_head"]
    np.testing.assert_allclose(values, hidden @ head["kernel"] + head["bias"], atol=1e-5)
    back = causal_lm_params(both_params)  # the inverse: the causal LM's own params again
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_tied_embeddings_and_qkv_bias(params, tokens):
    """A tied model equals an untied one whose LM head is the embedding transposed."""
    rng = np.random.default_rng(8)
    trunk = jax.tree.map(lambda x: x, params["trunk"])
    for layer in range(TINY.n_layers):
        for name, heads in (("q_proj", 4), ("k_proj", 2), ("v_proj", 2)):
            bias = rng.normal(size=(heads, 16)).astype(np.float32)
            trunk[f"layers_{layer}"]["attn"][name]["bias"] = jnp.asarray(bias)
    untied = {"trunk": trunk, "lm_head": {"kernel": trunk["embedding"].T}}
    biased = dataclasses.replace(TINY, qkv_bias=True)
    tied_logits = _forward(CausalLM(dataclasses.replace(biased, tie_embeddings=True)))(
        {"trunk": trunk}, tokens)
    np.testing.assert_allclose(tied_logits, _forward(CausalLM(biased))(untied, tokens), atol=1e-5)
    without_bias = _forward(CausalLM(TINY))({**untied, "trunk": params["trunk"]}, tokens)
    assert np.abs(np.asarray(tied_logits) - np.asarray(without_bias)).max() > 1e-3
