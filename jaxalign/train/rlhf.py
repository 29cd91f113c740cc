"""The whole RLHF iteration as one compiled function.

``step = make_rlhf_step(policy, value, reward, config, policy_optimizer=...)`` returns
``step(state, prompts, key) -> (state, metrics)``: a single ``jax.jit`` (through
:func:`jaxalign.train.compile_step`) of four named stages — ``_rollout``, ``_score``,
``_advantages``, ``_ppo_epochs`` — that

1. samples completions with the compiled KV-cache sampler,
2. scores them: policy and reference log-probs, values, and the reward model's score of each
   full sequence (or a pure ``reward_fn(completion_ids, completion_mask) -> [B]``, or a
   ``scorer(prompt_ids, prompt_mask, completion_ids, completion_mask) -> [B]`` for rewards
   that need the prompt, such as checking an answer),
3. builds per-token rewards ``−β·KL_t`` with the score added at the last completion token
   (optional missing-EOS penalty and reward whitening),
4. estimates advantages — GAE with whitening, or the critic-free ``grpo`` / ``rloo`` — and
5. runs ``ppo_epochs`` × ``num_minibatches`` PPO updates as nested ``lax.scan``s over
   shuffled minibatches, then
6. updates the adaptive KL coefficient.

Token layout: prompts are left-padded ``[B, P]``, completions ``[B, N]``; the scored sequence
is their concatenation, positions come from its attention mask. Quantities over completion
tokens are ``[B, N]`` with ``completion_mask``; logits at sequence positions ``P−1 … P+N−2``
predict the ``N`` completion tokens, and the value of completion token ``t`` is read at the
position that predicts it (TRL's convention).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.advantages import gae, group_advantages, kl_shaped_rewards
from jaxalign.kl_control import AdaptiveKLController, FixedKLController, KLControllerState
from jaxalign.logprobs import gather_logprobs
from jaxalign.losses import entropy, kl_penalty, ppo_loss
from jaxalign.masking import masked_mean, masked_whiten
from jaxalign.models import value_params_from_reward_model
from jaxalign.sampling import make_generate
from jaxalign.train.rlhf_config import RLHFConfig
from jaxalign.train.scorers import completion_scorer
from jaxalign.train.state import CompiledStep, compile_step

__all__ = ["RLHFConfig", "RLHFState", "init_rlhf_state", "kl_controller", "make_rlhf_step",
           "rlhf_state_models", "shard_rlhf_state"]


def kl_controller(config: RLHFConfig) -> AdaptiveKLController | FixedKLController:
    """The KL-coefficient controller of ``config``: fixed β unless ``kl_target`` is set."""
    if config.kl_target is None:
        return FixedKLController(coef=config.kl_coef)
    return AdaptiveKLController(init_coef=config.kl_coef, target=config.kl_target,
                                horizon=config.kl_horizon)


@flax.struct.dataclass
class RLHFState:
    """Everything an RLHF iteration carries (a pytree; donated to the step).

    ``value_params``/``value_opt_state`` are ``None`` with a shared value head or a critic-free
    estimator; ``reward_params`` is ``None`` when a ``reward_fn`` or ``scorer`` scores.
    """

    policy_params: Any
    policy_opt_state: Any
    value_params: Any
    value_opt_state: Any
    ref_params: Any
    reward_params: Any
    kl: KLControllerState
    step: jax.Array  # [] int32, iterations done


def init_rlhf_state(
    config: RLHFConfig,
    policy_params: Any,
    policy_optimizer: optax.GradientTransformation,
    *,
    reward_params: Any = None,
    value_params: Any = None,
    value_optimizer: optax.GradientTransformation | None = None,
    ref_params: Any = None,
) -> RLHFState:
    """A fresh :class:`RLHFState`.

    ``ref_params`` defaults to a copy of ``policy_params`` (the SFT model). With a separate
    critic and no ``value_params``, the value model starts from the reward model (its trunk and
    score head become the value trunk and head), as in InstructGPT.
    """
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    ref_params = copy(policy_params if ref_params is None else ref_params)
    # The step donates the state: a reward model initialised from the policy's trunk would
    # otherwise share buffers with it ("donate the same buffer twice").
    reward_params = None if reward_params is None else copy(reward_params)
    value_opt_state = None
    if config.uses_critic and not config.shared_value_head:
        if value_params is None:
            if reward_params is None:
                raise ValueError("a separate value model needs value_params or reward_params")
            value_params = value_params_from_reward_model(reward_params)
        if value_optimizer is None:
            raise ValueError("a separate value model needs value_optimizer")
        value_params = copy(value_params)
        value_opt_state = value_optimizer.init(value_params)
    else:
        value_params = None
    return RLHFState(
        policy_params=policy_params, policy_opt_state=policy_optimizer.init(policy_params),
        value_params=value_params, value_opt_state=value_opt_state, ref_params=ref_params,
        reward_params=reward_params, kl=kl_controller(config).init(),
        step=jnp.zeros((), jnp.int32),
    )


class _Forwards(NamedTuple):
    """The model passes a step makes over ``ids [B, P+N]``, sliced to the ``N`` positions that
    predict completion tokens (the prompt's hidden states never reach the LM head)."""

    policy: Callable  # (params, ids, attn, prompt_len) -> (logits / T [B, N, V], values | None)
    value: Callable  # (params, ids, attn, prompt_len) -> values [B, N]


def _forwards(policy: Any, value: Any, config: RLHFConfig) -> _Forwards:
    temperature = config.temperature if config.temperature > 0 else 1.0

    def completion_outputs(module, ids, attn, prompt_len):
        hidden, _ = module.trunk(ids, attn)
        hidden = hidden[:, prompt_len - 1:-1]
        values = module.value_head(hidden) if config.shared_value_head else None
        return module.logits(hidden), values

    def policy_forward(params, ids, attn, prompt_len):
        logits, values = policy.apply({"params": params}, ids, attn, prompt_len,
                                      method=completion_outputs)
        return logits / temperature, values

    def value_forward(params, ids, attn, prompt_len):
        return value.apply({"params": params}, ids, attn)[:, prompt_len - 1:-1]

    return _Forwards(policy_forward, value_forward)


def _rollout(generate: Callable, params: Any, prompts: dict, key: jax.Array,
             samples_per_prompt: int) -> dict[str, jax.Array]:
    """Stage 1: sample ``k`` completions per prompt with the KV-cache sampler.

    Returns ``prompt_ids``/``prompt_mask [B·k, P]``, ``completion``/``mask [B·k, N]`` and the
    scored sequence ``ids``/``attn [B·k, P+N]``.
    """
    prompt_ids = jnp.repeat(jnp.asarray(prompts["prompt_ids"], jnp.int32), samples_per_prompt, 0)
    prompt_mask = jnp.repeat(jnp.asarray(prompts["prompt_mask"], jnp.int32), samples_per_prompt,
                             0)
    out = generate(params, prompt_ids, prompt_mask, key)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion": out.tokens,
            "mask": out.completion_mask,
            "ids": jnp.concatenate([prompt_ids, out.tokens], axis=1),
            "attn": jnp.concatenate([prompt_mask, out.completion_mask], axis=1)}


def _score(forwards: _Forwards, reward: Any, config: RLHFConfig, state: RLHFState,
           rollout: dict, scorer: Any) -> dict[str, jax.Array]:
    """Stage 2: old and reference log-probs, old values, per-token KL and sequence scores
    (clipped, with the missing-EOS penalty; ``raw_scores`` before either)."""
    ids, attn, completion, mask = (rollout[k] for k in ("ids", "attn", "completion", "mask"))
    prompt_len, valid = rollout["prompt_ids"].shape[1], rollout["mask"] > 0
    logits, shared_values = forwards.policy(state.policy_params, ids, attn, prompt_len)
    old_logps = gather_logprobs(logits, completion)
    rollout_entropy = masked_mean(entropy(logits), valid)
    del logits
    ref_logits, _ = forwards.policy(state.ref_params, ids, attn, prompt_len)
    ref_logps = gather_logprobs(ref_logits, completion)
    del ref_logits
    if config.shared_value_head:
        old_values = shared_values
    elif config.uses_critic:
        old_values = forwards.value(state.value_params, ids, attn, prompt_len)
    else:
        old_values = jnp.zeros_like(old_logps)
    if scorer is not None:
        raw_scores = jnp.asarray(scorer(rollout["prompt_ids"], rollout["prompt_mask"],
                                        completion, mask), jnp.float32)
    else:
        raw_scores = reward.apply({"params": state.reward_params}, ids, attn).astype(jnp.float32)
    scores = raw_scores
    if config.score_clip is not None:
        scores = jnp.clip(scores, -config.score_clip, config.score_clip)
    has_eos = (jnp.any((completion == config.eos_id) & valid, axis=1)
               if config.eos_id is not None else jnp.ones((completion.shape[0],), bool))
    if config.missing_eos_penalty is not None:
        scores = jnp.where(has_eos, scores, scores - config.missing_eos_penalty)
    kl = jnp.where(valid, kl_penalty(old_logps, ref_logps, estimator=config.kl_estimator), 0.0)
    return {"old_logps": old_logps, "old_values": old_values, "kl": kl, "scores": scores,
            "raw_scores": raw_scores, "has_eos": has_eos, "entropy": rollout_entropy}


def _advantages(config: RLHFConfig, scored: dict, mask: jax.Array,
                kl_coef: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stage 3: ``(advantages, returns) [B, N]``: GAE on the KL-shaped per-token rewards, or
    the group estimator on ``score − β·KL`` (returns are 0 without a critic)."""
    valid = mask > 0
    if config.uses_critic:
        rewards = kl_shaped_rewards(scored["scores"], scored["kl"], mask, kl_coef=kl_coef)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, valid, shift_mean=False)
        advantages, returns = gae(rewards, scored["old_values"], valid, gamma=config.gamma,
                                  lam=config.gae_lambda)
    else:
        sequence_reward = scored["scores"] - kl_coef * jnp.sum(scored["kl"], axis=1)
        advantages = group_advantages(sequence_reward, config.samples_per_prompt,
                                      config.advantage)[:, None] * valid
        returns = jnp.zeros_like(advantages)
    if config.whiten_advantages and config.advantage != "grpo":
        advantages = masked_whiten(advantages, valid)
    return advantages, returns


def _ppo_epochs(forwards: _Forwards, config: RLHFConfig, optimizers: tuple, mesh: Mesh | None,
                state: RLHFState, rollout: dict, key: jax.Array) -> tuple[tuple, dict]:
    """Stage 4: ``ppo_epochs`` × ``num_minibatches`` PPO updates, nested ``lax.scan`` s over
    shuffled minibatches of ``rollout``; returns the new ``(policy_params, policy_opt,
    value_params, value_opt)`` and the per-update metrics ``[epochs, minibatches]``."""
    policy_optimizer, value_optimizer = optimizers
    batch, prompt_len = rollout["ids"].shape[0], rollout["prompt_len"]
    separate_value = config.uses_critic and not config.shared_value_head

    def loss_fn(policy_params, value_params, mb):
        logits, values = forwards.policy(policy_params, mb["ids"], mb["attn"], prompt_len)
        if separate_value:
            values = forwards.value(value_params, mb["ids"], mb["attn"], prompt_len)
        elif values is None:
            values = jnp.zeros_like(mb["old_values"])
        return ppo_loss(
            gather_logprobs(logits, mb["completion"]), mb["old_logps"], mb["advantages"],
            values, mb["old_values"], mb["returns"], mb["mask"], entropies=entropy(logits),
            clip_eps=config.clip_eps, value_clip=config.value_clip,
            vf_coef=config.vf_coef if config.uses_critic else 0.0, ent_coef=config.ent_coef)

    def minibatch_step(carry, mb):
        policy_params, policy_opt, value_params, value_opt = carry
        (_, metrics), (policy_grads, value_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(policy_params, value_params, mb)
        updates, policy_opt = policy_optimizer.update(policy_grads, policy_opt, policy_params)
        policy_params = optax.apply_updates(policy_params, updates)
        if value_params is not None:
            updates, value_opt = value_optimizer.update(value_grads, value_opt, value_params)
            value_params = optax.apply_updates(value_params, updates)
        metrics["grad_norm"] = optax.tree.norm(policy_grads)
        return (policy_params, policy_opt, value_params, value_opt), metrics

    arrays = {k: v for k, v in rollout.items() if k != "prompt_len"}
    mb_size = batch // config.num_minibatches

    def epoch_step(carry, epoch_key):
        order = jax.random.permutation(epoch_key, batch)
        minibatches = jax.tree.map(
            lambda x: _constrain(x[order].reshape(config.num_minibatches, mb_size, *x.shape[1:]),
                                 mesh, P(None, shd.BATCH_AXES)), arrays)
        return jax.lax.scan(minibatch_step, carry, minibatches)

    carry = (state.policy_params, state.policy_opt_state, state.value_params,
             state.value_opt_state)
    return jax.lax.scan(epoch_step, carry, jax.random.split(key, config.ppo_epochs))


def _constrain(x: jax.Array, mesh: Mesh | None, spec: P) -> jax.Array:
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _metrics(scored: dict, updates: dict, mask: jax.Array, advantages: jax.Array,
             returns: jax.Array, kl_coef: jax.Array) -> dict[str, jax.Array]:
    """The iteration's metrics (TRL/OpenRLHF names)."""
    valid = mask > 0
    mean = jnp.mean
    return {
        "score/mean": mean(scored["raw_scores"]), "score/std": jnp.std(scored["raw_scores"]),
        "kl": mean(jnp.sum(scored["kl"], axis=1)), "kl_coef": kl_coef,
        "entropy": scored["entropy"],
        "policy/clipfrac": mean(updates["clipfrac"]),
        "policy/approx_kl": mean(updates["approx_kl"]),
        "loss/policy": mean(updates["policy_loss"]), "loss/value": mean(updates["value_loss"]),
        "loss/total": mean(updates["loss"]), "value/clipfrac": mean(updates["value_clipfrac"]),
        "response_length": mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        "eos_fraction": mean(scored["has_eos"].astype(jnp.float32)),
        "return/mean": masked_mean(returns, valid),
        "advantage/mean": masked_mean(advantages, valid),
        "grad_norm": mean(updates["grad_norm"]),
    }


def _check_rewards(config: RLHFConfig, value: Any, reward: Any, reward_fn: Any,
                   scorer: Any) -> jax.tree_util.Partial | None:
    """The scorer the step is passed (``None`` with a reward model); raises on a bad mix."""
    if (reward is not None) + (reward_fn is not None) + (scorer is not None) != 1:
        raise ValueError("pass exactly one of reward (a RewardModel), reward_fn and scorer")
    if config.uses_critic and not config.shared_value_head and value is None:
        raise ValueError("advantage='gae' without shared_value_head needs a value model")
    if reward_fn is not None:
        scorer = completion_scorer(reward_fn)
    if scorer is not None and not isinstance(scorer, jax.tree_util.Partial):
        scorer = jax.tree_util.Partial(scorer)
    return scorer


def make_rlhf_step(
    policy: Any,
    value: Any,
    reward: Any,
    config: RLHFConfig,
    *,
    policy_optimizer: optax.GradientTransformation,
    value_optimizer: optax.GradientTransformation | None = None,
    reward_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    scorer: Callable[..., jax.Array] | None = None,
    mesh: Mesh | None = None,
    return_rollouts: bool = False,
) -> CompiledStep:
    """Builds the one-jit RLHF iteration (see the module docstring).

    Args:
      policy: a ``CausalLM`` (or ``CausalLMWithValueHead`` with ``config.shared_value_head``).
      value: a ``ValueModel``, or ``None`` (shared head or critic-free estimator).
      reward: a ``RewardModel``, or ``None`` when ``reward_fn`` or ``scorer`` is given.
      config: :class:`RLHFConfig`.
      policy_optimizer / value_optimizer: optax transformations (e.g. ``make_optimizer``).
      reward_fn: optional pure ``(completion_ids [B, N], completion_mask [B, N]) -> [B]``
        scoring function used instead of the reward model (rule-based, verifiable rewards).
      scorer: optional pure ``(prompt_ids [B, P], prompt_mask [B, P], completion_ids [B, N],
        completion_mask [B, N]) -> [B]`` used instead of the reward model when the reward
        depends on the prompt (the protocol of :func:`jaxalign.train.best_of_n.best_of_n`'s
        scorers; prompts are left-padded, each repeated ``samples_per_prompt`` times). A
        ``jax.tree_util.Partial`` scorer (e.g. :func:`jaxalign.train.scorers.
        reward_model_scorer`) is passed to the compiled step as an argument, its arrays
        replicated on the mesh; arrays any other callable closes over are compiled in as
        constants. A learned reward model that only reads ``prompt + completion`` is better
        passed as ``reward`` (its params then live in the state, sharded like the others).
      mesh: optional device mesh; the state is laid out by :func:`jaxalign.sharding.
        state_shardings` and prompts split over ``("data", "fsdp")``.
      return_rollouts: also return the samples, ``{"prompt_ids", "prompt_mask",
        "completion_ids", "completion_mask", "scores"}`` (``[B·k, …]``; ``scores`` before
        clipping and the missing-EOS penalty), to log or rescore them without resampling.

    Returns:
      A :class:`jaxalign.train.CompiledStep`: ``step(state, prompts, key) -> (state, metrics)``
      (``(state, metrics, rollouts)`` with ``return_rollouts``), the state donated. Prompts are
      ``{"prompt_ids", "prompt_mask"}`` ``[B, P]``, left-padded; with ``samples_per_prompt = k``
      each prompt is sampled k times.
    """
    scorer = _check_rewards(config, value, reward, reward_fn, scorer)
    generate = make_generate(
        policy, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p, eos_id=config.eos_id, pad_id=config.pad_id)
    forwards = _forwards(policy, value, config)
    controller = kl_controller(config)

    def step(state: RLHFState, prompts: dict, key: jax.Array, scorer: Any = None):
        sample_key, shuffle_key = jax.random.split(key)
        rollout = _rollout(generate, state.policy_params, prompts, sample_key,
                           config.samples_per_prompt)
        scored = _score(forwards, reward, config, state, rollout, scorer)
        advantages, returns = _advantages(config, scored, rollout["mask"], state.kl.coef)
        batch = {**{k: rollout[k] for k in ("ids", "attn", "completion", "mask")},
                 "old_logps": scored["old_logps"], "old_values": scored["old_values"],
                 "advantages": advantages, "returns": returns,
                 "prompt_len": rollout["prompt_ids"].shape[1]}
        carry, updates = _ppo_epochs(forwards, config, (policy_optimizer, value_optimizer), mesh,
                                     state, batch, shuffle_key)
        metrics = _metrics(scored, updates, rollout["mask"], advantages, returns, state.kl.coef)
        policy_params, policy_opt, value_params, value_opt = carry
        new_state = state.replace(
            policy_params=policy_params, policy_opt_state=policy_opt, value_params=value_params,
            value_opt_state=value_opt, step=state.step + 1,
            kl=controller.update(state.kl, metrics["kl"], rollout["ids"].shape[0]))
        if not return_rollouts:
            return new_state, metrics
        return new_state, metrics, {
            "prompt_ids": rollout["prompt_ids"], "prompt_mask": rollout["prompt_mask"],
            "completion_ids": rollout["completion"], "completion_mask": rollout["mask"],
            "scores": scored["raw_scores"]}

    models = rlhf_state_models(policy=policy, value=value, reward=reward)
    return compile_step(
        step, mesh=mesh, state_shardings=lambda state: shd.state_shardings(state, mesh, models),
        args=("batch", "replicated"),
        outputs=("replicated",) + (("batch",) if return_rollouts else ()), bound=(scorer,))


def rlhf_state_models(*, policy: Any, value: Any = None, reward: Any = None) -> dict[str, Any]:
    """The ``models`` mapping of :func:`jaxalign.sharding.state_shardings` for an
    :class:`RLHFState`: which model lays out each of its params fields."""
    return {"policy_params": policy, "ref_params": policy, "value_params": value,
            "reward_params": reward}


def shard_rlhf_state(state: RLHFState, mesh: Mesh, *, policy: Any, value: Any = None,
                     reward: Any = None) -> RLHFState:
    """Places ``state`` on ``mesh`` (:func:`jaxalign.sharding.shard_state`): parameters by their
    logical axes, optimiser moments like their parameters, everything else replicated."""
    return shd.shard_state(state, mesh, rlhf_state_models(policy=policy, value=value,
                                                          reward=reward))
