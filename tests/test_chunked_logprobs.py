"""The chunked LM head (token_logprobs_from_hidden, logprobs_at) against dense references.

The references build the full ``[N, V]`` logits with plain ``jnp`` (autodiff gradients) or in
float64 NumPy; the chunked primitive must give the same log-probs, entropies and gradients (in
the hidden states and the head) to 1e-5 for every drawn shape, chunk size (dividing N and V or
not), mask, head layout (an untied ``[D, V]`` kernel or a tied ``[V, D]`` embedding), soft-cap
and logit scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxalign import logprobs as LP
from jaxalign.chunked_logprobs import token_logprobs_from_hidden


def dense_outputs(hidden, weight, targets, mask, *, layout, cap, scale):
    """log-probs and entropies from the full [N, V] logits (the old, dense computation)."""
    raw = hidden @ weight if layout == "dv" else hidden @ weight.T
    logits = scale * (raw if cap is None else cap * jnp.tanh(raw / cap))
    log_p = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_p, targets[:, None], axis=1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return picked * mask, entropy * mask


def _draw_problem(data):
    rows = data.draw(st.sampled_from([None, 2, 3]), label="rows")  # None: hidden [N, D]
    n = data.draw(st.integers(1, 8 if rows else 24), label="N") * (rows or 1)
    d = data.draw(st.integers(1, 6), label="D")
    v = data.draw(st.integers(2, 40), label="V")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    layout = data.draw(st.sampled_from(["dv", "vd"]), label="layout")
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    weight = rng.normal(size=(d, v) if layout == "dv" else (v, d)).astype(np.float32)
    targets = rng.integers(0, v, size=n).astype(np.int32)
    mask = (rng.random(n) < data.draw(st.sampled_from([0.0, 0.5, 1.0]), label="p")).astype(
        np.float32)
    cotangents = rng.normal(size=(2, n)).astype(np.float32)
    options = {
        "chunk_size": data.draw(st.integers(1, n + 3), label="chunk"),
        "vocab_chunk_size": data.draw(st.one_of(st.none(), st.integers(1, v + 2)), label="vc"),
        "soft_cap": data.draw(st.sampled_from([None, 2.5]), label="cap"),
        "logit_scale": data.draw(st.sampled_from([1.0, 0.7]), label="scale"),
    }
    options["lead"] = (n,) if rows is None else (rows, n // rows)
    return (hidden, weight, targets, mask, cotangents, layout), options


@settings(max_examples=10, deadline=None)  # every example is a new shape: two compiles
@given(st.data())
def test_chunked_equals_dense_values_and_gradients(data):
    (hidden, weight, targets, mask, cot, layout), options = _draw_problem(data)
    cap, scale, lead = options["soft_cap"], options["logit_scale"], options.pop("lead")

    def chunked(h, w):  # [R, K, D] rows (chunked along K) or [N, D]
        logps, entropy = token_logprobs_from_hidden(
            h.reshape(*lead, -1), w, targets.reshape(lead), mask.reshape(lead), with_entropy=True,
            weight_layout=layout, **options)
        logps, entropy = logps.reshape(-1), entropy.reshape(-1)
        return jnp.sum(cot[0] * logps) + jnp.sum(cot[1] * entropy), (logps, entropy)

    def dense(h, w):
        logps, entropy = dense_outputs(h, w, targets, mask, layout=layout, cap=cap, scale=scale)
        return jnp.sum(cot[0] * logps) + jnp.sum(cot[1] * entropy), (logps, entropy)

    (_, got), got_grads = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(
        hidden, weight)
    (_, want), want_grads = jax.value_and_grad(dense, (0, 1), has_aux=True)(hidden, weight)
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_log_probs_match_float64_numpy_with_a_vocabulary_chunk_that_does_not_divide_v():
    rng = np.random.default_rng(0)
    hidden, weight = rng.normal(size=(13, 5)), rng.normal(size=(5, 29))
    targets = rng.integers(0, 29, 13)
    logits = hidden @ weight
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
    p = np.exp(logits - lse[:, None])
    want = logits[np.arange(13), targets] - lse
    got, entropy = token_logprobs_from_hidden(
        hidden.astype(np.float32), weight.astype(np.float32), targets, chunk_size=4,
        vocab_chunk_size=8, with_entropy=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-5)


def test_masked_positions_give_zero_and_no_gradient():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(6, 3)).astype(np.float32)
    weight = rng.normal(size=(3, 11)).astype(np.float32)
    mask = np.array([1, 0, 1, 0, 0, 0], np.float32)

    def total(h):
        return jnp.sum(token_logprobs_from_hidden(h, weight, np.arange(6), mask, chunk_size=2))

    values = token_logprobs_from_hidden(hidden, weight, np.arange(6), mask, chunk_size=2)
    grads = jax.grad(total)(hidden)
    assert np.all(values[mask == 0] == 0) and np.all(values[mask == 1] < 0)
    assert np.all(grads[mask == 0] == 0) and np.all(np.abs(grads[mask == 1]).sum(-1) > 0)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_a_frozen_weight_gets_no_weight_gradient_computed(with_entropy):
    """A stop_gradient-ed head (LoRA's) is not perturbed: the backward skips its ∂W matmul
    (one dot fewer per chunk in the compiled gradient), and ∂hidden is unchanged."""
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    targets = rng.integers(0, 11, (2, 7))

    def total(h, w, frozen):
        w = jax.lax.stop_gradient(w) if frozen else w
        out = token_logprobs_from_hidden(h, w, targets, chunk_size=4, vocab_chunk_size=5,
                                         with_entropy=with_entropy)
        return jnp.sum(out[0]) if with_entropy else jnp.sum(out)

    grad = jax.jit(jax.grad(total, (0, 1)), static_argnums=2)
    (g_h, g_w), (f_h, f_w) = grad(hidden, weight, False), grad(hidden, weight, True)
    np.testing.assert_array_equal(f_h, g_h)
    assert float(jnp.abs(g_w).max()) > 0 and float(jnp.abs(f_w).max()) == 0
    dots = [grad.lower(hidden, weight, frozen).compile().as_text().count(" dot(")
            for frozen in (False, True)]
    assert dots[1] == dots[0] - 1, dots


def test_bfloat16_inputs_give_finite_float32_outputs_close_to_float32():
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(10, 8)).astype(np.float32)
    weight = (0.3 * rng.normal(size=(8, 50))).astype(np.float32)
    targets = rng.integers(0, 50, 10)

    def run(h, w):
        logps, entropy = token_logprobs_from_hidden(h, w, targets, chunk_size=3,
                                                    vocab_chunk_size=16, with_entropy=True,
                                                    soft_cap=5.0)
        return jnp.sum(logps) + jnp.sum(entropy), (logps, entropy)

    (_, (lp16, ent16)), (gh, gw) = jax.value_and_grad(run, (0, 1), has_aux=True)(
        hidden.astype(jnp.bfloat16), weight.astype(jnp.bfloat16))
    _, (lp32, ent32) = run(hidden, weight)
    assert lp16.dtype == jnp.float32 and gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in (lp16, ent16, gh, gw))
    np.testing.assert_allclose(lp16, lp32, atol=0.1)
    np.testing.assert_allclose(ent16, ent32, atol=0.1)


def test_logprobs_at_reads_only_the_target_slots_of_each_row():
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(2, 5, 4)).astype(np.float32)
    weight = rng.normal(size=(4, 9)).astype(np.float32)
    source = np.array([[0, 3, 4], [2, 2, 0]], np.int32)
    token = np.array([[1, 8, 2], [0, 5, 7]], np.int32)
    valid = np.array([[1, 1, 0], [1, 1, 1]], bool)
    got = LP.logprobs_at(hidden, LP.HeadWeight(weight), source, token, valid, chunk_size=2)
    log_p = jax.nn.log_softmax(hidden @ weight, axis=-1)
    for r in range(2):
        for k in range(3):
            want = log_p[r, source[r, k], token[r, k]] if valid[r, k] else 0.0
            np.testing.assert_allclose(got[r, k], want, rtol=1e-5, atol=1e-6)


def test_group_sums_and_completion_mask_targets():
    tokens = np.array([[5, 6, 7, 8], [1, 2, 3, 4]], np.int32)
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 0]], np.int32)
    targets = LP.targets_from_completion_mask(tokens, mask, row_groups=np.array([1, 0]))
    np.testing.assert_array_equal(targets.source, [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(targets.token, [[6, 7, 8], [2, 3, 4]])
    np.testing.assert_array_equal(targets.group, [[-1, 1, 1], [0, 0, -1]])
    values = np.array([[10.0, 1.0, 2.0], [3.0, 4.0, 20.0]], np.float32)
    np.testing.assert_allclose(LP.group_sums(values, targets.group, 3), [7.0, 3.0, 0.0])


@pytest.mark.parametrize("bad, match", [
    (dict(weight=np.zeros((4, 3, 2))), "weight must be 2-D"),
    (dict(targets=np.zeros((5,), np.int32)), "disagree"),
    (dict(mask=np.ones((2,))), "mask has shape"),
    (dict(chunk_size=0), "chunk_size must be at least 1"),
])
def test_bad_arguments_name_what_is_wrong(bad, match):
    args = dict(hidden=np.zeros((3, 4), np.float32), weight=np.zeros((4, 7), np.float32),
                targets=np.zeros((3,), np.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        token_logprobs_from_hidden(**args)


def test_readme_example_runs_and_equals_the_dense_head():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Log-probs without [B, T, V] logits\n", 1)[1].split("\n## ", 1)[0]
    namespace = {}
    exec(re.findall(r"```python\n(.*?)```", section, flags=re.S)[0], namespace)  # noqa: S102
    hidden, kernel = namespace["hidden"], namespace["kernel"]
    logits = 30.0 * jnp.tanh(hidden[0] @ kernel / 30.0)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(namespace["logps"], log_p[jnp.arange(7), jnp.arange(7)],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(namespace["entropy"], -jnp.sum(jnp.exp(log_p) * log_p, -1),
                               rtol=1e-5, atol=1e-6)
    plain = jax.nn.log_softmax(hidden @ kernel, axis=-1)
    np.testing.assert_allclose(namespace["at"][1, :2], [plain[1, 5, 4], plain[1, 6, 5]],
                               rtol=1e-5, atol=1e-6)
    assert namespace["at"][1, 2] == 0
