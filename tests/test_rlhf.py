"""The one-jit RLHF step: learning on a toy reward, critic-free estimators, shared value head,
and equality of sharded and single-device runs on 8 forced CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import sharding, train
from jaxalign.train import rlhf
from jaxalign.models import (CausalLM, CausalLMWithValueHead, RewardModel, ValueModel, get_config,
                             init_head_from_causal_lm, init_params)

CFG = get_config("tiny", vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                 d_ff=64, max_len=32)
TARGET = 7
BATCH = 16


def count_target(tokens, mask):
    """Toy verifiable reward: how many times the target token appears in the completion."""
    return jnp.sum((tokens == TARGET) * mask, axis=1).astype(jnp.float32)


def _prompts(batch=BATCH):
    ids = np.tile(np.array([[0, 0, 3, 4], [0, 5, 6, 2]], np.int32), (batch // 2, 1))
    mask = (ids > 0).astype(np.int32)
    return {"prompt_ids": ids, "prompt_mask": mask}


def _setup(config, *, shared=False, with_reward_model=False, seed=0):
    opt = train.make_optimizer(3e-3, total_steps=100, skip_nonfinite=False)
    policy = (CausalLMWithValueHead if shared else CausalLM)(CFG)
    lm_params = init_params(CausalLM(CFG), jax.random.key(seed))
    policy_params = (init_head_from_causal_lm(policy, lm_params, jax.random.key(seed + 1))
                     if shared else lm_params)
    value = ValueModel(CFG) if config.uses_critic and not shared else None
    reward = RewardModel(CFG) if with_reward_model else None
    reward_params = init_params(reward, jax.random.key(seed + 2)) if with_reward_model else None
    value_params = (init_params(value, jax.random.key(seed + 3))
                    if value is not None and not with_reward_model else None)
    state = rlhf.init_rlhf_state(
        config, policy_params, opt, reward_params=reward_params, value_params=value_params,
        value_optimizer=opt if value is not None else None)
    models = dict(policy=policy, value=value, reward=reward)
    return state, models, opt


def _build(config, *, mesh=None, setup_kwargs=None, **step_kwargs):
    """``(step, state, prompts)``: a fresh state (steps donate theirs), its step and the prompts,
    placed on ``mesh``. The reward is the reward model with ``with_reward_model``, else
    ``step_kwargs`` (default ``reward_fn=count_target``)."""
    state, models, opt = _setup(config, **(setup_kwargs or {}))
    if models["reward"] is None and not step_kwargs.keys() & {"reward_fn", "scorer"}:
        step_kwargs["reward_fn"] = count_target
    step = rlhf.make_rlhf_step(
        models["policy"], models["value"], models["reward"], config, policy_optimizer=opt,
        value_optimizer=opt if models["value"] is not None else None, mesh=mesh, **step_kwargs)
    prompts = _prompts()
    if mesh is not None:
        state = rlhf.shard_rlhf_state(state, mesh, **models)
        prompts = sharding.shard_batch(prompts, mesh)
    return step, state, prompts


def _step_once(config, key, **build_kwargs):
    """The outputs after the new state of one iteration: ``(metrics,)`` or ``(metrics,
    rollouts)``, on the host."""
    step, state, prompts = _build(config, **build_kwargs)
    return jax.device_get(step(state, prompts, jax.random.key(key))[1:])


def _run(config, iterations, *, mesh=None, **setup_kwargs):
    step, state, prompts = _build(config, mesh=mesh, setup_kwargs=setup_kwargs)
    history = []
    for i in range(iterations):
        state, metrics = step(state, prompts, jax.random.key(100 + i))
        history.append(jax.device_get(metrics))
    return state, history, step


def test_ppo_raises_a_toy_reward_with_bounded_kl():
    config = rlhf.RLHFConfig(max_new_tokens=12, kl_coef=0.05, kl_target=4.0, kl_horizon=200)
    _, hist, step = _run(config, 30)
    first = np.mean([h["score/mean"] for h in hist[:3]])
    last = np.mean([h["score/mean"] for h in hist[-3:]])
    assert last > first + 2.0, (first, last)  # 12 tokens, ~0.4 targets at the start
    assert max(h["kl"] for h in hist) < 30.0
    assert hist[-1]["kl_coef"] > hist[0]["kl_coef"]  # the controller reacted to KL > target
    for name in ("score/std", "entropy", "policy/clipfrac", "policy/approx_kl", "loss/policy",
                 "loss/value", "value/clipfrac", "response_length", "eos_fraction", "return/mean"):
        assert np.isfinite(hist[-1][name]), name
    assert step.jitted._cache_size() == 1  # one compilation for all 30 iterations


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_critic_free_estimators_learn(estimator):
    config = rlhf.RLHFConfig(max_new_tokens=12, advantage=estimator, samples_per_prompt=4,
                             kl_coef=0.01, kl_target=None, ppo_epochs=1)
    state, hist, _ = _run(config, 15)
    assert state.value_params is None
    assert np.mean([h["score/mean"] for h in hist[-3:]]) > np.mean([h["score/mean"] for h in hist[:3]]) + 1.0


def test_shared_value_head_and_reward_model_paths_run():
    config = rlhf.RLHFConfig(max_new_tokens=8, shared_value_head=True, eos_id=1,
                             missing_eos_penalty=1.0)
    state, hist, _ = _run(config, 2, shared=True, with_reward_model=True)
    assert state.value_params is None and "value_head" in state.policy_params
    assert all(np.isfinite(v) for v in hist[-1].values())
    # value model initialised from the reward model, as in InstructGPT
    config = rlhf.RLHFConfig(max_new_tokens=8)
    state, _, _ = _setup(config, with_reward_model=True)
    np.testing.assert_array_equal(state.value_params["value_head"]["kernel"],
                                  state.reward_params["score_head"]["kernel"])


def test_scorer_sees_the_prompt_and_matches_reward_fn():
    """A prompt-aware scorer gets the (repeated, left-padded) prompts; wrapping reward_fn as a
    scorer gives the same iteration bit for bit."""
    from jaxalign.train.scorers import completion_scorer

    config = rlhf.RLHFConfig(max_new_tokens=8, advantage="rloo", samples_per_prompt=2)
    prompts = _prompts()

    def run(**reward):
        return _step_once(config, 0, **reward)[0]

    prompt_sum = lambda p_ids, p_mask, c_ids, c_mask: jnp.sum(p_ids * p_mask, axis=1) * 1.0  # noqa: E731
    metrics = run(scorer=prompt_sum)
    expected = (prompts["prompt_ids"] * prompts["prompt_mask"]).sum(1)  # [3+4, 5+6+2] alternating
    np.testing.assert_allclose(metrics["score/mean"], expected.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["score/std"], expected.std(), rtol=1e-5)
    via_fn, via_scorer = run(reward_fn=count_target), run(scorer=completion_scorer(count_target))
    assert via_fn.keys() == via_scorer.keys()
    for name in via_fn:
        np.testing.assert_array_equal(via_fn[name], via_scorer[name], err_msg=name)


@pytest.mark.parametrize("layout", [None, {"data": 2, "fsdp": 2}])
def test_reward_model_scorer_equals_the_reward_model_and_is_an_argument(layout):
    """scorer=reward_model_scorer(rm, params) gives the iteration reward=rm gives with those
    params in the state (bit for bit on one device); its params enter the step as an argument (no constants),
    so the jitted step's lowered program is as small as the reward-model path's."""
    from jaxalign.train.scorers import reward_model_scorer

    config = rlhf.RLHFConfig(max_new_tokens=8, advantage="rloo", samples_per_prompt=2)
    mesh = None if layout is None else sharding.make_mesh(**layout, devices=jax.devices()[:4])

    rm = RewardModel(CFG)
    rm_params = init_params(rm, jax.random.key(2))  # the reward params _setup gives (seed + 2)

    def run(use_scorer):
        if use_scorer:
            step, state, prompts = _build(config, mesh=mesh,
                                          scorer=reward_model_scorer(rm, rm_params))
        else:
            step, state, prompts = _build(config, mesh=mesh,
                                          setup_kwargs={"with_reward_model": True})
        metrics = jax.device_get(step(state, prompts, jax.random.key(0))[1])
        return metrics, len(step.jitted.lower(state, prompts, jax.random.key(0),
                                              *step.bound).as_text())

    (via_reward, reward_hlo), (via_scorer, scorer_hlo) = run(False), run(True)
    for name in via_reward:  # on the mesh the reward params are sharded in one, replicated in
        # the other, so reductions may round differently
        np.testing.assert_allclose(via_reward[name], via_scorer[name], err_msg=name,
                                   rtol=0 if mesh is None else 1e-5,
                                   atol=0 if mesh is None else 1e-6)
    assert scorer_hlo < 1.1 * reward_hlo, (scorer_hlo, reward_hlo)  # constants: 1.24x here


@pytest.mark.parametrize("layout", [None, {"data": 8}])
def test_rollouts_are_the_scored_samples(layout):
    """return_rollouts hands back the iteration's own samples: their scores are the reward of
    those completions, and the metrics are those of a step without rollouts."""
    config = rlhf.RLHFConfig(max_new_tokens=8, advantage="rloo", samples_per_prompt=2)
    mesh = None if layout is None else sharding.make_mesh(**layout)

    def run(return_rollouts):
        return _step_once(config, 3, mesh=mesh, return_rollouts=return_rollouts)

    (metrics,) = run(False)
    metrics_r, rollouts = run(True)
    assert rollouts["completion_ids"].shape == (2 * BATCH, 8)
    np.testing.assert_array_equal(rollouts["prompt_ids"], np.repeat(_prompts()["prompt_ids"], 2, 0))
    np.testing.assert_array_equal(
        rollouts["scores"], count_target(rollouts["completion_ids"], rollouts["completion_mask"]))
    assert rollouts["scores"].std() > 0  # the policy sampled different completions
    np.testing.assert_allclose(metrics_r["score/mean"], rollouts["scores"].mean(), rtol=1e-6)
    for name in metrics:
        np.testing.assert_array_equal(metrics[name], metrics_r[name], err_msg=name)


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        rlhf.RLHFConfig(advantage="grpo")
    with pytest.raises(ValueError, match="advantage must be one of"):
        rlhf.RLHFConfig(advantage="vtrace")
    with pytest.raises(ValueError, match="exactly one of reward"):
        rlhf.make_rlhf_step(CausalLM(CFG), ValueModel(CFG), None, rlhf.RLHFConfig(),
                            policy_optimizer=train.make_optimizer(1e-3))


def _param_digest(state):
    return jax.device_get(jax.tree.map(lambda x: np.asarray(x, np.float64), state.policy_params))


SHARD_CONFIG = rlhf.RLHFConfig(max_new_tokens=8, kl_coef=0.05)


@pytest.fixture(scope="module")
def single_device_run():
    state, hist, _ = _run(SHARD_CONFIG, 2, mesh=sharding.make_mesh(data=1, devices=jax.devices()[:1]))
    return _param_digest(state), hist


@pytest.mark.parametrize("layout", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_step_equals_single_device(layout, single_device_run):
    config = SHARD_CONFIG
    single_params, single_hist = single_device_run
    mesh = sharding.make_mesh(**layout)
    state, hist, step = _run(config, 2, mesh=mesh)
    for a, b in zip(single_hist, hist):
        for name in a:
            # clip fractions count tokens past a threshold: float rounding may flip one of
            # the 128 tokens (1/128 ≈ 0.008), so they get a count-sized tolerance
            atol = 0.02 if "clipfrac" in name else 2e-5
            np.testing.assert_allclose(a[name], b[name], rtol=2e-4, atol=atol, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 single_params, _param_digest(state))
    # parameters are really laid out on the mesh
    embedding = state.policy_params["trunk"]["embedding"]
    spec = embedding.sharding.spec
    if layout.get("fsdp", 1) > 1:
        assert "fsdp" in jax.tree.leaves(tuple(spec)), spec
        assert len(embedding.addressable_shards) == 8
        assert embedding.addressable_shards[0].data.shape[1] == CFG.d_model // layout["fsdp"]
    if layout.get("tensor", 1) > 1:
        assert "tensor" in jax.tree.leaves(tuple(spec)), spec
    assert step.jitted._cache_size() == 1
