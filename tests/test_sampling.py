"""Tests for jaxalign.sampling: greedy = argmax chain, log-prob semantics, EOS, trace count."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import assume, given, settings

from jaxalign.models import (
    CausalLM,
    CausalLMWithValueHead,
    get_config,
    init_head_from_causal_lm,
    init_params,
)
from jaxalign.sampling.tokens import _largest_threshold, _order_keys
from jaxalign.sampling import (
    generate,
    is_stop_token,
    make_generate,
    sample_token,
    stop_ids,
)

CONFIG = get_config("tiny", scan_layers=False)
NEW = 6


@pytest.fixture(autouse=True)
def _raise_on_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(scope="module")
def lm():
    model = CausalLM(CONFIG)
    with jax.numpy_rank_promotion("raise"):
        return model, init_params(model, jax.random.key(0))


@pytest.fixture(scope="module")
def prompts():
    """Three left-padded prompts of lengths 5, 3 and 1 in a [3, 5] batch."""
    ids = np.random.default_rng(0).integers(1, CONFIG.vocab_size, (3, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


@functools.lru_cache(maxsize=None)
def _forward(model):
    return jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))


def _full_logits(model, params, prompt_ids, prompt_mask, out):
    """Logits of a full forward over prompt + completion; ``[:, P - 1 + t]`` predicts token t."""
    tokens = np.concatenate([prompt_ids, np.asarray(out.tokens)], axis=1)
    mask = np.concatenate([prompt_mask, np.asarray(out.completion_mask)], axis=1)
    logits = np.asarray(_forward(model)(params, tokens, mask))
    prompt_len = prompt_ids.shape[1]
    return logits[:, prompt_len - 1:prompt_len - 1 + out.tokens.shape[1]]


def test_greedy_equals_argmax_chain_of_full_forwards(lm, prompts):
    model, params = lm
    ids, mask = prompts
    out = generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=NEW,
                   temperature=0.0)
    assert out.tokens.shape == (3, NEW) and out.tokens.dtype == jnp.int32
    # Reference: grow the sequence one argmax at a time with full (uncached) forward passes.
    # The buffer is right-padded with mask 0, which the positions-from-mask convention allows.
    tokens = np.concatenate([ids, np.zeros((3, NEW), np.int32)], axis=1)
    full_mask = np.concatenate([mask, np.zeros((3, NEW), np.int32)], axis=1)
    for t in range(NEW):
        logits = np.asarray(_forward(model)(params, tokens, full_mask))
        tokens[:, 5 + t] = logits[:, 4 + t].argmax(-1)
        full_mask[:, 5 + t] = 1
    np.testing.assert_array_equal(out.tokens, tokens[:, 5:])
    np.testing.assert_array_equal(out.logps, 0.0)  # greedy samples from a point mass
    np.testing.assert_array_equal(out.completion_mask, 1)
    logits = _full_logits(model, params, ids, mask, out)
    expected = np.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 5:, None], -1)[..., 0]
    np.testing.assert_allclose(out.policy_logps, expected, atol=1e-5)


def test_value_head_model_samples_like_its_lm(lm, prompts):
    """``CausalLMWithValueHead`` (PPO's shared trunk) generates exactly like the plain LM."""
    model, params = lm
    ids, mask = prompts
    both = CausalLMWithValueHead(CONFIG)
    both_params = init_head_from_causal_lm(both, params, jax.random.key(1))
    run = functools.partial(generate, prompt_ids=ids, prompt_mask=mask, key=jax.random.key(2),
                            max_new_tokens=NEW, temperature=1.3, top_k=5)  # shares a compile
    expected, out = run(model, params), run(both, both_params)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_allclose(out.policy_logps, expected.policy_logps, atol=1e-6)


def test_top_k_1_equals_greedy(lm, prompts):
    model, params = lm
    ids, mask = prompts
    greedy = generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=NEW,
                      temperature=0.0)
    top1 = generate(model, params, ids, mask, jax.random.key(1), max_new_tokens=NEW,
                    temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logps, 0.0, atol=1e-6)
    np.testing.assert_allclose(top1.policy_logps, greedy.policy_logps, atol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.5)])
def test_logps_are_the_sampling_distribution(lm, prompts, temperature, top_k, top_p):
    """``logps`` = log-softmax of the tempered, filtered logits; ``policy_logps`` = raw."""
    model, params = lm
    ids, mask = prompts
    out = generate(model, params, ids, mask, jax.random.key(3), max_new_tokens=NEW,
                   temperature=temperature, top_k=top_k, top_p=top_p)
    logits = _full_logits(model, params, ids, mask, out).astype(np.float64)
    tokens = np.asarray(out.tokens)[..., None]
    scaled = logits / temperature
    keep = np.ones(scaled.shape, bool)
    if top_k:
        kth = np.sort(scaled, -1)[..., -top_k][..., None]
        keep &= scaled >= kth
    if top_p < 1.0:
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, -1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
        np.put_along_axis(keep, order, keep_sorted & np.take_along_axis(keep, order, -1), -1)
    assert np.take_along_axis(keep, tokens, -1).all()  # never samples a filtered token
    filtered = np.where(keep, scaled, -np.inf)
    log_q = filtered - np.log(np.exp(filtered - filtered.max(-1, keepdims=True)).sum(-1,
                              keepdims=True)) - filtered.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logps, np.take_along_axis(log_q, tokens, -1)[..., 0],
                               atol=1e-4)
    np.testing.assert_allclose(out.policy_logps, np.take_along_axis(log_p, tokens, -1)[..., 0],
                               atol=1e-4)
    if top_k or top_p < 1.0:
        assert np.all(np.asarray(out.logps) >= np.asarray(out.policy_logps) - 1e-5)


def test_eos_completion_mask(lm, prompts):
    model, params = lm
    ids, mask = prompts
    free = generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=NEW,
                    temperature=0.0)
    eos = int(free.tokens[0, 2])  # row 0 produces it at step 2 (maybe other rows earlier)
    pad = 255 if eos != 255 else 254
    out = generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=NEW,
                   temperature=0.0, eos_id=eos, pad_id=pad)
    free_tokens, tokens = np.asarray(free.tokens), np.asarray(out.tokens)
    completion_mask = np.asarray(out.completion_mask)
    assert completion_mask[0].tolist()[:3] == [1, 1, 1]
    for b in range(3):
        hits = np.flatnonzero(free_tokens[b] == eos)
        stop = hits[0] + 1 if hits.size else NEW  # up to and including the first EOS
        np.testing.assert_array_equal(completion_mask[b], np.arange(NEW) < stop)
        np.testing.assert_array_equal(tokens[b, :stop], free_tokens[b, :stop])
        np.testing.assert_array_equal(tokens[b, stop:], pad)
        np.testing.assert_array_equal(np.asarray(out.policy_logps)[b, stop:], 0.0)
        np.testing.assert_allclose(np.asarray(out.policy_logps)[b, :stop],
                                   np.asarray(free.policy_logps)[b, :stop], atol=1e-6)


def test_any_of_several_stop_ids_ends_a_row(lm, prompts):
    """``eos_id`` as a list (a chat model's end-of-turn and end-of-text ids): each row stops at
    the first of them; a list and a tuple of the same ids share one sampler."""
    model, params = lm
    ids, mask = prompts
    free = np.asarray(generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=NEW,
                               temperature=0.0).tokens)
    stops = (int(free[0, 3]), int(free[1, 1]))  # row 0 stops at step 3 or before, row 1 at 1
    out = generate(model, params, ids, mask, jax.random.key(0), max_new_tokens=NEW,
                   temperature=0.0, eos_id=list(stops), pad_id=0)
    for b in range(3):
        hits = np.flatnonzero(np.isin(free[b], stops))
        stop = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(np.asarray(out.completion_mask)[b], np.arange(NEW) < stop)
        np.testing.assert_array_equal(np.asarray(out.tokens)[b, :stop], free[b, :stop])
    assert make_generate(model, max_new_tokens=NEW, eos_id=list(stops)) is make_generate(
        model, max_new_tokens=NEW, eos_id=stops)
    assert stop_ids(None) == () and stop_ids(7) == (7,) and stop_ids([3, 1, 3]) == (3, 1)
    np.testing.assert_array_equal(is_stop_token(np.array([[1, 2, 3]]), [3, 1]),
                                  [[True, False, True]])


def test_compiles_once_per_shape_and_same_key_same_samples(lm, prompts):
    """Same shapes: one trace however often it is called; a new batch size retraces."""
    traces = []

    class CountingLM(CausalLM):
        def decode(self, *args, **kwargs):  # the method generate runs, traced not executed
            traces.append(1)
            return super().decode(*args, **kwargs)

    _, params = lm
    model = CountingLM(CONFIG)
    ids, mask = prompts
    run = functools.partial(generate, model, params, max_new_tokens=NEW, temperature=1.0)
    first = run(ids, mask, jax.random.key(5))
    per_trace = len(traces)
    assert per_trace > 0
    again = run(ids, mask, jax.random.key(5))
    other_key = run(ids, mask, jax.random.key(6))
    other_prompt = run(np.where(mask == 1, ids + 1, 0), mask, jax.random.key(5))
    assert len(traces) == per_trace
    np.testing.assert_array_equal(again.tokens, first.tokens)
    assert not np.array_equal(other_key.tokens, first.tokens)
    assert not np.array_equal(other_prompt.tokens, first.tokens)
    assert make_generate(model, max_new_tokens=NEW, temperature=1.0) is make_generate(
        model, max_new_tokens=NEW, temperature=1.0)
    run(ids[:2], mask[:2], jax.random.key(0))
    assert len(traces) == 2 * per_trace


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=252),
         r"prompt length 5 \(prompt_ids shape \(3, 5\)\) \+ max_new_tokens=252 = 257 exceeds"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompt_mask=np.ones((3, 4), np.int32)), r"prompt_mask has shape \(3, 4\).*\(3, 5\)"),
        (dict(prompt_ids=np.ones((5,), np.int32), prompt_mask=np.ones((5,), np.int32)),
         r"prompt_ids must be \[B, P\]; got shape \(5,\)"),
    ],
)
def test_bad_arguments_raise(lm, prompts, kwargs, match):
    model, params = lm
    ids, mask = prompts
    call = dict(prompt_ids=ids, prompt_mask=mask, max_new_tokens=NEW)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, params, key=jax.random.key(0), **call)


def test_sample_token_frequencies_match_softmax():
    """The one-uniform inverse-CDF sampler draws from softmax(logits); filtered ids never."""
    vocab, draws = 130, 4000  # 130 is not a multiple of the CDF block size
    logits = jnp.asarray(np.random.default_rng(1).normal(size=vocab) * 2, jnp.float32)
    batch = jnp.broadcast_to(logits, (draws, vocab))
    sample = jax.jit(functools.partial(sample_token, temperature=1.0))
    tokens, logps, policy = sample(batch, jax.random.key(0))
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    probs = np.asarray(jax.nn.softmax(logits))
    # Total-variation distance of the empirical distribution; ~0.06 expected at 4000 draws.
    assert 0.5 * np.abs(counts / draws - probs).sum() < 0.12
    np.testing.assert_allclose(logps, np.log(probs)[np.asarray(tokens)], atol=1e-5)
    np.testing.assert_allclose(policy, logps, atol=1e-6)
    top5 = jax.jit(functools.partial(sample_token, temperature=1.0, top_k=5))
    tokens5, _, _ = top5(batch, jax.random.key(1))
    allowed = set(np.argsort(-np.asarray(logits))[:5].tolist())
    assert set(np.asarray(tokens5).tolist()) == allowed


def test_generate_bf16_model(lm, prompts):
    """A bf16-compute model samples with float32 log-probs close to the float32 model's; and
    PPO's old log-probs (``policy_logps``) are the log-probs the same bf16 model gives the
    sampled tokens in a full (training) forward pass: the sampler rounds only the matmul
    weights, exactly as the model does, not the embedding table or norm scales."""
    model, params = lm
    ids, mask = prompts
    bf16 = CausalLM(dataclasses.replace(CONFIG, dtype=jnp.bfloat16))
    out = generate(bf16, params, ids, mask, jax.random.key(0), max_new_tokens=NEW,
                   temperature=0.0)
    assert out.policy_logps.dtype == jnp.float32
    tokens = np.asarray(out.tokens)[..., None]
    for reference, atol in ((model, 5e-2), (bf16, 1e-5)):
        logits = _full_logits(reference, params, ids, mask, out)
        expected = np.take_along_axis(jax.nn.log_softmax(logits), tokens, -1)[..., 0]
        np.testing.assert_allclose(out.policy_logps, expected, atol=atol)


_keys = jax.jit(_order_keys)
_threshold = jax.jit(_largest_threshold)  # compiled once per shape, not per example
_rows = hnp.arrays(np.float32, st.tuples(st.integers(1, 2), st.sampled_from([1, 2, 5, 33])),
                   elements=st.floats(-30, 30, width=32, allow_subnormal=False))


@settings(deadline=None)
@given(_rows)
def test_order_keys_sort_like_the_floats(x):
    keys = np.asarray(_keys(jnp.asarray(x)))
    less = x[..., :, None] < x[..., None, :]
    np.testing.assert_array_equal(keys[..., :, None] < keys[..., None, :], less)
    np.testing.assert_array_equal(keys[..., :, None] == keys[..., None, :],
                                  x[..., :, None] == x[..., None, :])


@settings(deadline=None)
@given(_rows, st.integers(1, 40))
def test_top_k_threshold_keeps_the_k_largest_and_their_ties(x, k):
    k = min(k, x.shape[1])
    keys = _keys(jnp.asarray(x))
    keep = np.asarray(keys >= _threshold(keys, jnp.ones(x.shape), float(k)))
    kth = np.sort(x, axis=-1)[:, -k][:, None]
    np.testing.assert_array_equal(keep, x >= kth)  # Hugging Face's TopKLogitsWarper rule


@settings(deadline=None)
@given(_rows, st.floats(0.05, 0.99))
def test_top_p_threshold_keeps_the_smallest_nucleus(x, top_p):
    probs = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-x, axis=-1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, -1), -1)
    assume(np.all(np.abs(cumulative - top_p) > 1e-4))  # float32 sums decide borderline sets
    weights = jnp.asarray(np.exp(x - x.max(-1, keepdims=True)))
    keys = _keys(jnp.asarray(x))
    threshold = _threshold(keys, weights, top_p * jnp.sum(weights, -1))
    keep = np.asarray(keys >= threshold)
    size = np.argmax(cumulative >= top_p, axis=-1)  # last index of the smallest prefix
    boundary = np.take_along_axis(x, np.take_along_axis(order, size[:, None], -1), -1)
    np.testing.assert_array_equal(keep, x >= boundary)  # that prefix, plus ties at its end
