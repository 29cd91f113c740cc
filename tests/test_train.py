"""Compiled SFT, reward and preference steps on a tiny model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxalign as ja
from jaxalign import train
from jaxalign.models import CausalLM, RewardModel, get_config, init_params

CFG = get_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                 max_len=32)
B, L, P = 4, 12, 4  # pairs, sequence length, prompt length


def _pref_batch(seed=0):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, CFG.vocab_size, (B, P))
    lengths = rng.integers(2, L - P + 1, (B, 2))

    def side(col, offset):
        ids = np.zeros((B, L), np.int32)
        attn = np.zeros((B, L), np.int32)
        comp = np.zeros((B, L), np.int32)
        for b in range(B):
            n = lengths[b, col]
            ids[b, :P] = prompt[b]
            ids[b, P:P + n] = (np.arange(n) * 7 + offset + b) % (CFG.vocab_size - 3) + 3
            attn[b, :P + n] = 1
            comp[b, P:P + n] = 1
        return ids, attn, comp

    c, r = side(0, 1), side(1, 30)
    return {
        "chosen_ids": c[0], "chosen_attention_mask": c[1], "chosen_completion_mask": c[2],
        "rejected_ids": r[0], "rejected_attention_mask": r[1], "rejected_completion_mask": r[2],
        "margin": np.zeros(B, np.float32), "p_chosen": np.ones(B, np.float32),
    }


def _sft_batch():
    pref = _pref_batch()
    return {"input_ids": pref["chosen_ids"], "attention_mask": pref["chosen_attention_mask"],
            "completion_mask": pref["chosen_completion_mask"]}


@pytest.fixture
def lm_params():
    # a fresh tree per test: steps donate the state, which consumes the arrays given to it
    return init_params(CausalLM(CFG), jax.random.key(0))


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _run(step, state, batch, n):
    history = []
    for _ in range(n):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def test_sft_loss_falls_and_step_compiles_once(lm_params):
    opt = train.make_optimizer(1e-2, total_steps=30)
    step = train.make_sft_step(CausalLM(CFG), opt)
    state = train.create_train_state(lm_params, opt, jax.random.key(1))
    state, hist = _run(step, state, _sft_batch(), 30)
    assert hist[-1]["nll"] < 0.5 * hist[0]["nll"], (hist[0]["nll"], hist[-1]["nll"])
    np.testing.assert_allclose(hist[0]["nll"], math.log(CFG.vocab_size), rtol=0.1)
    assert int(state.step) == 30
    assert step.jitted._cache_size() == 1


def test_sft_include_prompt_counts_more_tokens(lm_params):
    batch = _sft_batch()
    _, with_prompt = train.sft_loss(CausalLM(CFG), lm_params, batch, include_prompt=True)
    _, completion_only = train.sft_loss(CausalLM(CFG), lm_params, batch)
    assert int(with_prompt["tokens"]) == int(batch["attention_mask"].sum()) - B
    assert int(completion_only["tokens"]) == int(batch["completion_mask"].sum())


def test_dpo_starts_at_ln2_and_learns_the_preference(lm_params):
    opt = train.make_optimizer(3e-3, total_steps=25)
    step = train.make_preference_step(CausalLM(CFG), opt, loss="dpo", beta=0.5)
    state = train.create_train_state(lm_params, opt, jax.random.key(1), ref_params=lm_params)
    state, hist = _run(step, state, _pref_batch(), 25)
    np.testing.assert_allclose(hist[0]["loss"], math.log(2), rtol=1e-5)
    np.testing.assert_allclose(hist[0]["rewards/margins"], 0.0, atol=1e-6)
    assert hist[-1]["loss"] < 0.3 and hist[-1]["rewards/accuracies"] == 1.0
    assert hist[-1]["rewards/chosen"] > hist[-1]["rewards/rejected"]


def test_precomputed_reference_equals_in_step_reference(lm_params):
    model = CausalLM(CFG)
    batch = _pref_batch(3)
    ref_params = jax.tree.map(lambda x: x + 0.01, lm_params)
    for loss in ("dpo", "ipo"):
        opt = train.make_optimizer(1e-3, total_steps=5)
        step = train.make_preference_step(model, opt, loss=loss, beta=0.2)
        state_a = train.create_train_state(_copy(lm_params), opt, jax.random.key(0), ref_params=ref_params)
        state_a, metrics_a = step(state_a, batch)
        ref = train.make_reference_logps_fn(model)(ref_params, batch)  # sums serve both
        state_b = train.create_train_state(_copy(lm_params), opt, jax.random.key(0))
        state_b, metrics_b = step(state_b, {**batch, **ref})
        for k in metrics_a:
            np.testing.assert_allclose(metrics_a[k], metrics_b[k], rtol=2e-5, atol=1e-6, err_msg=k)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), state_a.params,
                     state_b.params)


@pytest.mark.parametrize("loss", ["ipo", "orpo"])
def test_ipo_and_orpo_learn_the_preference(lm_params, loss):
    opt = train.make_optimizer(3e-3, total_steps=25)
    step = train.make_preference_step(CausalLM(CFG), opt, loss=loss, beta=0.5, orpo_lambda=0.5)
    state = train.create_train_state(lm_params, opt, jax.random.key(1), ref_params=lm_params)
    state, hist = _run(step, state, _pref_batch(), 25)
    # ORPO's loss is dominated by the chosen NLL, which falls more slowly than the pair term
    assert hist[-1]["loss"] < (0.5 if loss == "ipo" else 0.8) * hist[0]["loss"]
    assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"]
    if loss == "orpo":
        assert {"nll", "log_odds_ratio"} <= set(hist[-1])
        assert hist[-1]["log_odds_ratio"] > hist[0]["log_odds_ratio"]


def test_dpo_without_reference_is_a_clear_error(lm_params):
    opt = train.make_optimizer(1e-3, total_steps=5)
    step = train.make_preference_step(CausalLM(CFG), opt, loss="dpo")
    state = train.create_train_state(lm_params, opt, jax.random.key(1))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        step(state, _pref_batch())


def test_nonfinite_update_is_skipped_and_counted(lm_params):
    opt = train.make_optimizer(1e-3, total_steps=5)
    step = train.make_preference_step(CausalLM(CFG), opt, loss="dpo")
    state = train.create_train_state(lm_params, opt, jax.random.key(1))
    ref = {"ref_chosen_logps": np.zeros(B, np.float32), "ref_rejected_logps": np.zeros(B, np.float32)}
    bad = {**_pref_batch(), **ref, "p_chosen": np.full(B, np.nan, np.float32)}
    before = jax.device_get(state.params)
    state, metrics = step(state, bad)
    assert int(metrics["skipped_updates"]) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))
    state, metrics = step(state, {**_pref_batch(), **ref})
    assert int(metrics["skipped_updates"]) == 1
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.params))
    assert any(jax.tree.leaves(changed))


def test_gradient_accumulation_equals_the_full_batch(lm_params):
    model = CausalLM(CFG)
    batch = _pref_batch(5)
    full_opt = train.make_optimizer(1e-2, total_steps=1)
    accum_opt = train.make_optimizer(1e-2, total_steps=1, grad_accum_steps=2)
    full = train.create_train_state(_copy(lm_params), full_opt, jax.random.key(0), ref_params=lm_params)
    full, _ = train.make_preference_step(model, full_opt)(full, batch)
    acc_step = train.make_preference_step(model, accum_opt)
    acc = train.create_train_state(_copy(lm_params), accum_opt, jax.random.key(0), ref_params=lm_params)
    halves = [jax.tree.map(lambda x, i=i: x[i * B // 2:(i + 1) * B // 2], batch) for i in range(2)]
    acc, _ = acc_step(acc, halves[0])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(lm_params), jax.device_get(acc.params))
    acc, _ = acc_step(acc, halves[1])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6), full.params, acc.params)


def _rm_batch(seed=0):
    """Preference pairs where the chosen completion contains token 5 and the rejected does not."""
    pref = _pref_batch(seed)
    pref["chosen_ids"] = np.where(pref["chosen_completion_mask"] > 0, 5, pref["chosen_ids"])
    return pref


def test_reward_step_learns_pairs():
    model = RewardModel(CFG)
    params = init_params(model, jax.random.key(2))
    opt = train.make_optimizer(3e-3, total_steps=40)
    step = train.make_reward_step(model, opt, center_coef=0.01)
    state = train.create_train_state(params, opt, jax.random.key(0))
    state, hist = _run(step, state, _rm_batch(), 40)
    assert hist[-1]["accuracy"] == 1.0 and hist[-1]["bt_loss"] < 0.2
    assert abs(hist[-1]["rewards/chosen"] + hist[-1]["rewards/rejected"]) < 2.0


def test_ranking_pair_weights_closed_form():
    w = np.asarray(train.ranking_pair_weights(jnp.array([[0, 1, 2], [0, 0, 1], [1, 1, 1]])))
    np.testing.assert_allclose(w[0], np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]]) / 3)
    np.testing.assert_allclose(w[1], np.array([[0, 0, 1], [0, 0, 1], [0, 0, 0]]) / 2)
    np.testing.assert_allclose(w[2], 0.0)


def test_ranking_of_two_equals_the_pair_loss():
    model = RewardModel(CFG)
    params = init_params(model, jax.random.key(3))
    pair = _rm_batch(1)
    ranking = {
        "ids": np.stack([pair["rejected_ids"], pair["chosen_ids"]], 1),
        "attention_mask": np.stack([pair["rejected_attention_mask"], pair["chosen_attention_mask"]], 1),
        "completion_mask": np.stack([pair["rejected_completion_mask"], pair["chosen_completion_mask"]], 1),
        "ranks": np.array([[1, 0]] * B, np.int32),
    }
    loss_pair, m_pair = train.reward_loss(model, params, pair)
    loss_rank, m_rank = train.reward_loss(model, params, ranking)
    np.testing.assert_allclose(loss_rank, loss_pair, rtol=1e-5)
    np.testing.assert_allclose(m_rank["accuracy"], m_pair["accuracy"])


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="loss must be one of"):
        train.make_preference_step(CausalLM(CFG), optax.sgd(0.1), loss="bogus")
    with pytest.raises(ValueError, match="trains on unpaired data"):
        train.make_preference_step(CausalLM(CFG), optax.sgd(0.1), loss="kto")
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2 losses"):
        train.PreferenceConfig(loss="dpo,sft", loss_weights=(1.0,))
    with pytest.raises(ValueError, match="label_smoothing"):
        train.make_preference_step(CausalLM(CFG), optax.sgd(0.1), label_smoothing=0.7)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train.make_optimizer(1e-3, grad_accum_steps=0)
