"""The GRPO family inside the one-jit RLHF step: where the KL goes (reward or loss), β = 0
without a reference pass, whitening that applies or not (never silently), DAPO's dynamic
sampling at a fixed shape, and the estimators / aggregations / ratios learning a toy reward."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign as ja
from jaxalign import train
from jaxalign.models import CausalLM, get_config, init_params
from jaxalign.train import rlhf
from jaxalign.train.rlhf_advantages import estimate_advantages, select_groups

CFG = get_config("tiny", vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                 d_ff=64, max_len=32)
TARGET = 7


def count_target(tokens, mask):
    return jnp.sum((tokens == TARGET) * mask, axis=1).astype(jnp.float32)


def _prompts(batch=8):
    ids = np.tile(np.array([[0, 0, 3, 4], [0, 5, 6, 2]], np.int32), (batch // 2, 1))
    return {"prompt_ids": ids, "prompt_mask": (ids > 0).astype(np.int32)}


def _step(config, *, reward_fn=count_target, lr=3e-3, return_rollouts=False):
    opt = train.make_optimizer(lr, total_steps=100, skip_nonfinite=False)
    policy = CausalLM(CFG)
    state = rlhf.init_rlhf_state(config, init_params(policy, jax.random.key(0)), opt)
    step = rlhf.make_rlhf_step(policy, None, None, config, policy_optimizer=opt,
                               reward_fn=reward_fn, return_rollouts=return_rollouts)
    return step, state


def _scored(scores, kl, mask):
    return {"scores": jnp.asarray(scores, jnp.float32), "kl": jnp.asarray(kl, jnp.float32),
            "old_values": jnp.zeros(np.shape(kl), jnp.float32)}


MASK = jnp.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
KL = jnp.array([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
SCORES = jnp.array([1.0, 1.0, 0.0, 2.0])


def test_kl_in_reward_folds_it_into_the_score_kl_in_loss_leaves_it_out():
    base = rlhf.RLHFConfig(advantage="dr_grpo", samples_per_prompt=2, kl_coef=0.5)
    reward_side, _ = estimate_advantages(base, _scored(SCORES, KL, MASK), MASK, jnp.float32(0.5))
    loss_side, _ = estimate_advantages(dataclasses.replace(base, kl_in="loss"),
                                       _scored(SCORES, KL, MASK), MASK, jnp.float32(0.5))
    # kl_in=reward: group 0 rewards 1 − 0.5, 1 − 0 → ∓0.25; group 1: 0 − 1, 2 → ∓1.5
    np.testing.assert_allclose(reward_side[:, 0], [-0.25, 0.25, -1.5, 1.5], rtol=1e-6)
    # kl_in=loss: the score alone (paper GRPO); the KL enters the loss instead
    np.testing.assert_allclose(loss_side[:, 0], [0.0, 0.0, -1.0, 1.0], rtol=1e-6)
    assert (np.asarray(loss_side)[np.asarray(MASK) == 0] == 0).all()


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_whitening_applies_when_asked_and_is_off_by_default_for_group_estimators(estimator):
    config = rlhf.RLHFConfig(advantage=estimator, samples_per_prompt=2, kl_in="loss")
    plain, _ = estimate_advantages(config, _scored(SCORES, KL, MASK), MASK, jnp.float32(0.0))
    formula = ja.group_advantages(SCORES, 2, estimator)[:, None] * MASK
    np.testing.assert_allclose(plain, formula, rtol=1e-6)  # default: the paper's, unwhitened
    whitened, _ = estimate_advantages(dataclasses.replace(config, whiten_advantages=True),
                                      _scored(SCORES, KL, MASK), MASK, jnp.float32(0.0))
    np.testing.assert_allclose(whitened, ja.masked_whiten(formula, MASK > 0), rtol=1e-6)
    valid = np.asarray(whitened)[np.asarray(MASK) > 0]
    np.testing.assert_allclose([valid.mean(), valid.var(ddof=1)], [0.0, 1.0], atol=1e-5)


def test_whitening_defaults_per_estimator():
    defaults = {name: rlhf.RLHFConfig(advantage=name, samples_per_prompt=2).whitens_advantages
                for name in train.ADVANTAGE_ESTIMATORS}
    assert defaults == {"gae": True, "grpo": False, "dr_grpo": False, "rloo": False,
                        "reinforce_pp": True}


def test_reinforce_pp_is_the_whitened_kl_shaped_return():
    config = rlhf.RLHFConfig(advantage="reinforce_pp", kl_coef=0.5)
    got, returns = estimate_advantages(config, _scored(SCORES, KL, MASK), MASK, jnp.float32(0.5))
    rewards = ja.kl_shaped_rewards(SCORES, KL, MASK, kl_coef=0.5)
    np.testing.assert_allclose(got, ja.reinforce_pp_advantages(rewards, MASK), rtol=1e-6)
    assert not np.asarray(returns).any()
    plain, _ = estimate_advantages(dataclasses.replace(config, whiten_advantages=False),
                                   _scored(SCORES, KL, MASK), MASK, jnp.float32(0.5))
    # unwhitened: the return-to-go (score − β·KL to go), plain REINFORCE
    np.testing.assert_allclose(plain[0], [1 - 0.5, 1 - 0.25, 0.0], rtol=1e-6)


def test_select_groups_keeps_informative_groups_first_at_a_fixed_shape():
    config = rlhf.RLHFConfig(advantage="grpo", samples_per_prompt=2, dynamic_sampling=True,
                             oversample=2)
    raw = jnp.array([1.0, 1.0, 0.0, 1.0, 3.0, 3.0, 2.0, 5.0])  # groups: same, differ, same, differ
    rollout = {"completion": jnp.arange(8)[:, None], "mask": jnp.ones((8, 1), jnp.int32)}
    kept, rewards, stats = select_groups(config, rollout, {"raw_scores": raw}, None)
    np.testing.assert_array_equal(kept["completion"][:, 0], [2, 3, 6, 7])
    np.testing.assert_array_equal(rewards["raw_scores"], [0.0, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(stats["kept_fraction"], 0.5)
    # too few informative groups: topped up with uninformative ones, in order
    kept, _, stats = select_groups(config, rollout, {"raw_scores": jnp.array(
        [1.0, 1.0, 0.0, 0.0, 3.0, 3.0, 2.0, 5.0])}, None)
    np.testing.assert_array_equal(kept["completion"][:, 0], [6, 7, 0, 1])
    np.testing.assert_allclose(stats["kept_fraction"], 0.25)


def test_dynamic_sampling_in_the_step_trains_on_the_kept_groups():
    config = rlhf.RLHFConfig(max_new_tokens=8, advantage="grpo", samples_per_prompt=4,
                             kl_coef=0.0, dynamic_sampling=True, oversample=2, ppo_epochs=1,
                             num_minibatches=2)
    step, state = _step(config, return_rollouts=True)
    _, metrics, rollouts = jax.device_get(step(state, _prompts(8), jax.random.key(0)))
    assert rollouts["completion_ids"].shape == (4 * 4, 8)  # 8 prompts sampled, 4 trained
    informative = np.ptp(rollouts["scores"].reshape(4, 4), axis=1) > 0
    kept = metrics["dynamic_sampling/kept_fraction"]
    np.testing.assert_allclose(kept, 1.0 - metrics["frac_reward_zero_std"], rtol=1e-6)
    assert informative.sum() == min(4, round(kept * 8))  # informative groups fill the batch
    assert informative[:informative.sum()].all()


def test_beta_zero_drops_the_reference_forward_pass():
    """A fixed β = 0 keeps no reference params and compiles one model pass fewer."""
    def dots(config):
        step, state = _step(config)
        text = step.jitted.lower(state, _prompts(8), jax.random.key(0), *step.bound).as_text()
        return state, len(re.findall(r"dot_general", text))

    config = rlhf.RLHFConfig(max_new_tokens=8, advantage="grpo", samples_per_prompt=2,
                             kl_in="loss", kl_coef=0.04)
    with_ref_state, with_ref = dots(config)
    without_state, without = dots(dataclasses.replace(config, kl_coef=0.0))
    assert with_ref_state.ref_params is not None and without_state.ref_params is None
    assert without < with_ref, (without, with_ref)
    assert rlhf.RLHFConfig(kl_coef=0.0, kl_target=6.0).uses_reference  # adaptive β needs it


def test_kl_in_the_loss_is_beta_times_k3_of_the_current_policy():
    config = rlhf.RLHFConfig(max_new_tokens=8, advantage="grpo", samples_per_prompt=2,
                             kl_in="loss", kl_coef=0.5, ppo_epochs=2, num_minibatches=1)
    step, state = _step(config)
    metrics = jax.device_get(step(state, _prompts(8), jax.random.key(0))[1])
    assert config.kl_estimator_used == "k3"
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert metrics["loss/kl"] > 0  # ... and has moved away by the second epoch
    np.testing.assert_allclose(metrics["loss/total"], metrics["loss/policy"]
                               + 0.5 * metrics["loss/kl"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"advantage": "grpo", "kl_in": "loss", "kl_coef": 0.04, "loss_agg": "sequence_mean"},
    {"advantage": "dr_grpo", "loss_agg": "token_sum_norm", "kl_coef": 0.0},
    {"advantage": "rloo", "importance_sampling_level": "sequence", "clip_eps": 3e-3,
     "clip_eps_high": 4e-3},
    {"advantage": "grpo", "clip_eps_high": 0.28, "dynamic_sampling": True, "oversample": 2,
     "kl_coef": 0.0},
    {"advantage": "reinforce_pp", "samples_per_prompt": 1, "kl_coef": 0.01},
])
def test_grpo_family_learns_the_toy_reward(options):
    config = rlhf.RLHFConfig(**{"max_new_tokens": 12, "samples_per_prompt": 4, "ppo_epochs": 2,
                                "num_minibatches": 2, **options})
    step, state = _step(config)
    scores = []
    for i in range(15):
        state, metrics = step(state, _prompts(16), jax.random.key(100 + i))
        scores.append(float(metrics["score/mean"]))
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 1.0, scores
    for name in ("completions/mean_length", "completions/clipped_ratio", "policy/clipfrac_low",
                 "policy/clipfrac_high"):
        assert np.isfinite(metrics[name]), name
    assert step.jitted._cache_size() == 1


def test_bad_grpo_family_configurations_are_named():
    cases = [({"dynamic_sampling": True}, "dynamic_sampling filters prompt groups"),
             ({"advantage": "grpo", "samples_per_prompt": 2, "oversample": 2},
              "oversample > 1 needs dynamic_sampling"),
             ({"kl_in": "loss"}, "kl_in='loss' is for the critic-free"),
             ({"loss_agg": "mean"}, "loss_agg must be one of"),
             ({"dual_clip": 1.0}, "dual_clip must be > 1"),
             ({"advantage": "dr_grpo"}, "samples_per_prompt >= 2")]
    for options, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            rlhf.RLHFConfig(**options)


def test_grpo_config_has_the_papers_defaults():
    config = rlhf.GRPOConfig()
    assert (config.advantage, config.samples_per_prompt, config.kl_in, config.kl_coef,
            config.ppo_epochs, config.num_minibatches, config.loss_agg) == (
        "grpo", 8, "loss", 0.0, 1, 1, "token_mean")
    assert not config.uses_reference and not config.whitens_advantages
    assert isinstance(config, rlhf.RLHFConfig)
    field = rlhf.GRPOConfig.__dataclass_fields__["kl_in"]
    assert field.metadata["help"] == rlhf.RLHFConfig.__dataclass_fields__["kl_in"].metadata["help"]
