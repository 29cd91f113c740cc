"""Every step that reads log-probs, now through the chunked head, against the old dense path.

The dense references here run the model's full ``[B, T, V]`` logits (``model.apply``) through
``jaxalign.token_logprobs`` / ``log_softmax`` and the layer-1 losses, as the steps did before
the chunked head; the steps (loss, metrics, gradients, updated parameters after one SGD
update) must agree to float32 tolerance, with an untied head and with tied embeddings plus a
final-logit soft-cap, and a chunk size that divides neither the token count nor V.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxalign as ja
from jaxalign import train
from jaxalign.models import CausalLM, CausalLMWithValueHead, init_params
from jaxalign.models.config import TransformerConfig

CONFIGS = {
    "untied": TransformerConfig(vocab_size=53, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                d_ff=24, max_len=32, logprob_chunk=7),
    "tied_softcap": TransformerConfig(vocab_size=53, d_model=16, n_layers=1, n_heads=2,
                                      n_kv_heads=1, d_ff=24, max_len=32, logprob_chunk=5,
                                      tie_embeddings=True, final_logit_softcap=4.0),
}
LR = 0.5


def _rows(seed, prompt_lens, completion_lens, length=12):
    """Right-padded [prompt | completion | pad] rows and their masks."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 53, (len(prompt_lens), length)).astype(np.int32)
    slots = np.arange(length)
    ends = np.array(prompt_lens) + np.array(completion_lens)
    attention = (slots[None] < ends[:, None]).astype(np.int32)
    completion = ((slots[None] >= np.array(prompt_lens)[:, None]) & (attention > 0)).astype(
        np.int32)
    return np.where(attention > 0, ids, 0), attention, completion


def _pairs(seed=0):
    c = _rows(seed, [3, 2, 4], [4, 6, 1])
    r = _rows(seed + 1, [3, 2, 4], [2, 5, 7])
    return {f"{side}_{name}": value for side, arrays in (("chosen", c), ("rejected", r))
            for name, value in zip(("ids", "attention_mask", "completion_mask"), arrays)}


def _dense_sums(model, params, ids, attention, completion):
    """(sums, counts) from the full logits: the pre-chunking computation."""
    per_token = ja.token_logprobs(model.apply({"params": params}, ids, attention), ids)
    return jnp.sum(per_token * completion, -1), jnp.sum(completion, -1).astype(jnp.float32)


def _dense_preference(model, params, ref_params, batch, loss):
    pc, cc = _dense_sums(model, params, batch["chosen_ids"], batch["chosen_attention_mask"],
                         batch["chosen_completion_mask"])
    pr, cr = _dense_sums(model, params, batch["rejected_ids"],
                         batch["rejected_attention_mask"], batch["rejected_completion_mask"])
    rc, _ = _dense_sums(model, ref_params, batch["chosen_ids"], batch["chosen_attention_mask"],
                        batch["chosen_completion_mask"])
    rr, _ = _dense_sums(model, ref_params, batch["rejected_ids"],
                        batch["rejected_attention_mask"], batch["rejected_completion_mask"])
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    if loss == "dpo":
        return jnp.mean(ja.dpo_loss(pc, pr, rc, rr, beta=0.3))
    if loss == "ipo":
        return jnp.mean(ja.ipo_loss(pc / cc, pr / cr, rc / cc, rr / cr, beta=0.3))
    return jnp.mean(ja.orpo_loss(pc / cc, pr / cr, -pc / cc, lam=0.1))


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _sgd_step(params, grads):
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


@pytest.mark.parametrize("name, loss", [("untied", "dpo"), ("tied_softcap", "dpo"),
                                        ("untied", "ipo"), ("tied_softcap", "orpo")])
def test_preference_step_equals_the_dense_computation(name, loss):
    model = CausalLM(CONFIGS[name])
    params = init_params(model, jax.random.key(0))
    ref_params = jax.tree.map(lambda x: x + 0.01, params)
    batch = _pairs()
    # jitted (one compile instead of op-by-op dispatch); still the dense [B, T, V] computation
    want_loss, want_grads = jax.jit(jax.value_and_grad(_dense_preference, 1),
                                    static_argnums=(0, 4))(model, params, ref_params, batch, loss)
    # the step's updated params are params - LR * grads: they compare the gradients too
    state = train.create_train_state(jax.tree.map(jnp.copy, params), optax.sgd(LR),
                                     jax.random.key(1), ref_params=ref_params)
    step = train.make_preference_step(model, optax.sgd(LR), loss=loss, beta=0.3)
    new_state, metrics = step(state, batch)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    _assert_trees_close(new_state.params, _sgd_step(params, want_grads))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sft_step_equals_the_dense_computation(name):
    model = CausalLM(CONFIGS[name])
    params = init_params(model, jax.random.key(2))
    ids, attention, completion = _rows(5, [2, 5, 1, 3], [7, 3, 0, 9])
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}

    def dense(p):
        sums, counts = _dense_sums(model, p, ids, attention, completion)
        return -jnp.sum(sums) / jnp.sum(counts)

    want_loss, want_grads = jax.jit(jax.value_and_grad(dense))(params)
    state = train.create_train_state(jax.tree.map(jnp.copy, params), optax.sgd(LR),
                                     jax.random.key(1))
    new_state, metrics = train.make_sft_step(model, optax.sgd(LR))(state, batch)
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    assert metrics["tokens"] == completion.sum()
    _assert_trees_close(new_state.params, _sgd_step(params, want_grads))


def test_sequence_kl_and_unpaired_logps_equal_dense_sums():
    model = CausalLM(CONFIGS["tied_softcap"])
    params = init_params(model, jax.random.key(3))
    ids, attention, completion = _rows(7, [2, 4], [5, 3])
    want, _ = jax.jit(_dense_sums, static_argnums=0)(model, params, ids, attention, completion)
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    np.testing.assert_allclose(train.completion_logps(model, params, batch), want, rtol=1e-5)


@pytest.mark.parametrize("name", ["tied_softcap"])
def test_rlhf_policy_logps_and_entropy_equal_the_dense_logits_at_temperature(name):
    """The RLHF step's policy pass (chunked, logits / T inside the head) against the full
    logits divided by T: log-probs, entropies and their gradients."""
    from jaxalign.train.rlhf import _forwards
    from jaxalign.train.rlhf_config import RLHFConfig

    config = RLHFConfig(temperature=0.7, shared_value_head=True)
    model = CausalLMWithValueHead(CONFIGS[name])
    params = init_params(model, jax.random.key(4))
    prompt_len, ids, _, _ = 4, *_rows(9, [4, 4, 4], [6, 3, 8])
    attention = np.ones_like(ids)
    completion = ids[:, prompt_len:]
    mask = (np.arange(8)[None] < np.array([[6], [3], [8]])).astype(np.int32)
    weights = np.random.default_rng(0).normal(size=(2,) + completion.shape).astype(np.float32)
    forwards = _forwards(model, None, config)

    def chunked(p):
        logps, entropies, _ = forwards.policy(p, ids, attention, prompt_len, completion, mask)
        return jnp.sum(weights[0] * logps) + jnp.sum(weights[1] * entropies), (logps, entropies)

    def dense(p):
        logits = model.apply({"params": p}, ids, attention)[0][:, prompt_len - 1:-1] / 0.7
        logps = ja.gather_logprobs(logits, completion) * mask
        entropies = ja.losses.entropy(logits) * mask
        return jnp.sum(weights[0] * logps) + jnp.sum(weights[1] * entropies), (logps, entropies)

    (_, got), got_grads = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    (_, want), want_grads = jax.jit(jax.value_and_grad(dense, has_aux=True))(params)
    _assert_trees_close(got, want, atol=1e-5)
    _assert_trees_close(got_grads, want_grads, atol=1e-5)


def test_logprob_chunk_flag_reaches_the_model_config_and_is_checked():
    from jaxalign import cli

    _, config = cli.parse_args(["dpo", "--data", "x.jsonl", "--out", "o", "--logprob-chunk",
                                "256"])
    assert config.compute.overrides() == {"logprob_chunk": 256}
    _, config = cli.parse_args(["sft", "--data", "x.jsonl", "--out", "o"])
    assert "logprob_chunk" not in config.compute.overrides()  # the model's own, 1024
    assert TransformerConfig().logprob_chunk == 1024
    with pytest.raises(ValueError, match="logprob_chunk must be at least 1, got 0"):
        TransformerConfig(logprob_chunk=0)
