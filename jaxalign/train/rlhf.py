"""The whole RLHF iteration as one compiled function.

``step = make_rlhf_step(policy, value, reward, config, policy_optimizer=...)`` returns
``step(state, prompts, key) -> (state, metrics)``: a single ``jax.jit`` (through
:func:`jaxalign.train.compile_step`) of four named stages — ``_rollout``, ``_score``,
``_advantages``, ``_ppo_epochs`` — that

1. samples completions with the compiled KV-cache sampler,
2. scores them: the reward model's score of each full sequence (or a pure
   ``reward_fn(completion_ids, completion_mask) -> [B]``, or a ``scorer(prompt_ids,
   prompt_mask, completion_ids, completion_mask) -> [B]`` for rewards that need the prompt, or
   Python ``reward_fns`` on the decoded text through ``jax.pure_callback``, see
   :mod:`jaxalign.train.text_rewards`); with DAPO's dynamic sampling it keeps the prompt
   groups whose rewards differ; then policy and reference log-probs and values,
3. builds per-token rewards ``−β·KL_t`` with the score added at the last completion token
   (optional missing-EOS penalty and reward whitening), or leaves the KL to the loss
   (``kl_in="loss"``, the GRPO paper),
4. estimates advantages — GAE, the critic-free ``grpo`` / ``dr_grpo`` / ``rloo``, or
   ``reinforce_pp`` (:mod:`jaxalign.train.rlhf_advantages`) — and
5. runs ``ppo_epochs`` × ``num_minibatches`` clipped policy-gradient updates (per-token or
   GSPO's per-sequence ratio, asymmetric and dual clip, the loss aggregated by token mean,
   sequence mean or Dr. GRPO's constant) as nested ``lax.scan``s over shuffled minibatches,
6. updates the adaptive KL coefficient.

Token layout: prompts are left-padded ``[B, P]``, completions ``[B, N]``; the scored sequence
is their concatenation, positions come from its attention mask. Quantities over completion
tokens are ``[B, N]`` with ``completion_mask``; logits at sequence positions ``P−1 … P+N−2``
predict the ``N`` completion tokens, and the value of completion token ``t`` is read at the
position that predicts it (TRL's convention).

Rewards: a ``RewardModel`` (its params in the state, sharded like the others); a pure
``reward_fn(completion_ids [B, N], completion_mask [B, N]) -> [B]``; a pure ``scorer(prompt_ids
[B, P], prompt_mask [B, P], completion_ids, completion_mask) -> [B]`` when the reward depends on
the prompt (the protocol of :func:`jaxalign.train.best_of_n.best_of_n`'s scorers; prompts are
left-padded, each repeated ``samples_per_prompt`` times) — a ``jax.tree_util.Partial`` scorer
(e.g. :func:`jaxalign.train.scorers.reward_model_scorer`) is passed to the compiled step as an
argument, its arrays replicated on the mesh, while arrays any other callable closes over are
compiled in as constants; or ``reward_fns``, Python functions on text with TRL's signature
``f(prompts, completions, **columns) -> list[float | None]`` (e.g.
:func:`jaxalign.rewards.math_answer`), run on the host through one ``jax.pure_callback`` per
step (per device shard on a mesh; see :mod:`jaxalign.train.text_rewards`): the score is
``Σ_f w_f r_f`` over the functions that returned a value, each function's mean and std logged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign.kl_control import AdaptiveKLController, FixedKLController, KLControllerState
from jaxalign.logprobs import logprobs_at
from jaxalign.losses import kl_penalty
from jaxalign.masking import masked_mean
from jaxalign.models import value_params_from_reward_model
from jaxalign.models.lora import has_adapters, reference_params
from jaxalign.sampling import is_stop_token, make_generate
from jaxalign.train import rlhf_advantages as stages
from jaxalign.train.completion import dropout_rngs
from jaxalign.train.rlhf_config import GRPOConfig, RLHFConfig
from jaxalign.train.rlhf_metrics import rlhf_metrics
from jaxalign.train.rlhf_update import ppo_epochs
from jaxalign.train.scorers import completion_scorer
from jaxalign.train.state import CompiledStep, compile_step
from jaxalign.train.text_rewards import sharded_score, text_rewards

__all__ = ["GRPOConfig", "RLHFConfig", "RLHFState", "init_rlhf_state", "kl_controller", "make_rlhf_step",
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
    estimator; ``reward_params`` is ``None`` when a ``reward_fn``, ``scorer`` or ``reward_fns``
    score; ``ref_params`` is ``None`` when the config needs no reference (fixed β = 0).
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

    ``ref_params`` defaults to a copy of ``policy_params`` (the SFT model); none is kept when
    ``config.uses_reference`` is false (a fixed β of 0). With a separate critic and no
    ``value_params``, the value model starts from the reward model (its trunk and score head
    become the value trunk and head), as in InstructGPT.
    """
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    ref_params = (copy(policy_params if ref_params is None else ref_params)
                  if config.uses_reference and (ref_params is not None
                                                or not has_adapters(policy_params)) else None)
    # (A LoRA policy keeps no reference copy: its reference is the tree with adapters off.)
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
    """The model passes a step makes over ``ids [B, P+N]``: only the ``N`` hidden states that
    predict completion tokens reach the LM head, chunked (no ``[B, N, V]`` logits)."""

    # (params, ids, attn, prompt_len, completion, mask, with_entropy) ->
    #   (logps [B, N], entropies [B, N] | None, values [B, N] | None); logits scaled by 1/T
    policy: Callable
    value: Callable  # (params, ids, attn, prompt_len) -> values [B, N]


def _forwards(policy: Any, value: Any, config: RLHFConfig) -> _Forwards:
    temperature = config.temperature if config.temperature > 0 else 1.0

    def completion_outputs(module, ids, attn, prompt_len, completion, mask, with_entropy):
        hidden = module.hidden(ids, attn)
        width = completion.shape[1]
        values = (module.value_head(hidden[:, prompt_len - 1:-1])
                  if config.shared_value_head else None)
        source = jnp.broadcast_to(prompt_len - 1 + jnp.arange(width, dtype=jnp.int32),
                                  completion.shape)
        out = logprobs_at(hidden, module.head(), source, completion, mask,
                          chunk_size=module.config.logprob_chunk,
                          logit_scale=1.0 / temperature, with_entropy=with_entropy)
        logps, entropies = out if with_entropy else (out, None)
        return logps, entropies, values

    def policy_forward(params, ids, attn, prompt_len, completion, mask, with_entropy=True,
                       dropout_key=None):
        return policy.apply({"params": params}, ids, attn, prompt_len, completion, mask,
                            with_entropy, method=completion_outputs,
                            rngs=dropout_rngs(dropout_key))

    def value_forward(params, ids, attn, prompt_len, dropout_key=None):
        return value.apply({"params": params}, ids, attn,
                           rngs=dropout_rngs(dropout_key))[:, prompt_len - 1:-1]

    return _Forwards(policy_forward, value_forward)


def _rollout(generate: Callable, params: Any, prompts: dict, key: jax.Array,
             samples_per_prompt: int) -> dict[str, jax.Array]:
    """Stage 1: sample ``k`` completions per prompt with the KV-cache sampler.

    Returns ``prompt_ids``/``prompt_mask [B·k, P]``, ``completion``/``mask [B·k, N]``, the
    scored sequence ``ids``/``attn [B·k, P+N]`` and each row's dataset ``index [B·k]`` (the
    prompts' ``"index"``, 0 when they have none).
    """
    repeat = lambda x: jnp.repeat(jnp.asarray(x, jnp.int32), samples_per_prompt, 0)  # noqa: E731
    prompt_ids, prompt_mask = repeat(prompts["prompt_ids"]), repeat(prompts["prompt_mask"])
    index = prompts.get("index", jnp.zeros(jnp.shape(prompts["prompt_ids"])[:1], jnp.int32))
    out = generate(params, prompt_ids, prompt_mask, key)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion": out.tokens,
            "mask": out.completion_mask, "index": repeat(index),
            "ids": jnp.concatenate([prompt_ids, out.tokens], axis=1),
            "attn": jnp.concatenate([prompt_mask, out.completion_mask], axis=1)}


def _has_eos(config: RLHFConfig, completion: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B]`` bool: the completion ended with a stop token (all true without one)."""
    if config.eos_id is None:
        return jnp.ones((completion.shape[0],), bool)
    return jnp.any(is_stop_token(completion, config.eos_id) & (mask > 0), axis=1)


def _score(forwards: _Forwards, config: RLHFConfig, state: RLHFState, rollout: dict,
           rewards: dict) -> dict[str, jax.Array]:
    """Stage 2: old and reference log-probs, old values, per-token KL and sequence scores
    (clipped, with the missing-EOS penalty; ``raw_scores`` before either). Without a reference
    (fixed β = 0) there is no reference pass and the KL is 0."""
    ids, attn, completion, mask = (rollout[k] for k in ("ids", "attn", "completion", "mask"))
    prompt_len, valid = rollout["prompt_ids"].shape[1], rollout["mask"] > 0
    old_logps, entropies, shared_values = forwards.policy(state.policy_params, ids, attn,
                                                         prompt_len, completion, mask)
    rollout_entropy = masked_mean(entropies, valid)
    if config.uses_reference:
        ref = reference_params(state.ref_params, state.policy_params)  # LoRA: adapters off
        ref_logps, _, _ = forwards.policy(ref, ids, attn, prompt_len, completion,
                                          mask, with_entropy=False)
        kl = jnp.where(valid, kl_penalty(old_logps, ref_logps,
                                         estimator=config.kl_estimator_used), 0.0)
    else:
        ref_logps, kl = old_logps, jnp.zeros_like(old_logps)
    if config.shared_value_head:
        old_values = shared_values
    elif config.uses_critic:
        old_values = forwards.value(state.value_params, ids, attn, prompt_len)
    else:
        old_values = jnp.zeros_like(old_logps)
    has_eos = _has_eos(config, completion, mask)
    scores = stages.shaped_scores(config, rewards["raw_scores"], has_eos)
    return {"old_logps": old_logps, "ref_logps": ref_logps, "old_values": old_values, "kl": kl,
            "scores": scores, "raw_scores": rewards["raw_scores"], "has_eos": has_eos,
            "entropy": rollout_entropy}


def _check_rewards(config: RLHFConfig, value: Any, reward: Any, reward_fn: Any, scorer: Any,
                   reward_fns: Any) -> jax.tree_util.Partial | None:
    """The scorer the step is passed (``None`` with a reward model or Python rewards); raises
    on a bad mix."""
    given = (reward is not None) + (reward_fn is not None) + (scorer is not None) + (
        reward_fns is not None)
    if given != 1:
        raise ValueError("pass exactly one of reward (a RewardModel), reward_fn, scorer and"
                         " reward_fns")
    if config.uses_critic and not config.shared_value_head and value is None:
        raise ValueError("advantage='gae' without shared_value_head needs a value model")
    if reward_fn is not None:
        scorer = completion_scorer(reward_fn)
    if scorer is not None and not isinstance(scorer, jax.tree_util.Partial):
        scorer = jax.tree_util.Partial(scorer)
    return scorer


def _iteration(config: RLHFConfig, generate: Callable, forwards: _Forwards, controller: Any,
               reward: Any, text: Any, text_score: Any, optimizers: tuple, mesh: Mesh | None,
               return_rollouts: bool) -> Callable:
    """The uncompiled iteration ``step(state, prompts, key, scorer)``: rollout, rewards
    (dynamic sampling), scores, advantages, PPO epochs, KL controller."""
    policy_optimizer, value_optimizer = optimizers

    def step(state: RLHFState, prompts: dict, key: jax.Array, scorer: Any = None):
        if text is not None and text.columns and "index" not in prompts:
            raise ValueError("reward_columns need each prompt's dataset row: pass"
                             " prompts['index'] [B]")
        sample_key, shuffle_key = jax.random.split(key)
        rollout = _rollout(generate, state.policy_params, prompts, sample_key,
                           config.samples_per_prompt)
        rewards = stages.sequence_rewards(reward, state.reward_params, rollout, scorer,
                                          text_score, text)
        sampled, sampled_rewards, selection = rollout, rewards, None
        if config.dynamic_sampling:
            rollout, rewards, selection = stages.select_groups(config, rollout, rewards, mesh)
        scored = _score(forwards, config, state, rollout, rewards)
        advantages, returns = stages.estimate_advantages(config, scored, rollout["mask"],
                                                         state.kl.coef)
        carry, updates = ppo_epochs(forwards, config, (policy_optimizer, value_optimizer), mesh,
                                    state, _update_batch(rollout, scored, advantages, returns),
                                    shuffle_key)
        metrics = rlhf_metrics(config, scored, updates, rollout["mask"], advantages, returns,
                               state.kl.coef, sampled_rewards=sampled_rewards,
                               sampled_has_eos=_has_eos(config, sampled["completion"],
                                                        sampled["mask"]),
                               sampled_lengths=jnp.sum(sampled["mask"], axis=1),
                               text=text, selection=selection)
        policy_params, policy_opt, value_params, value_opt = carry
        new_state = state.replace(
            policy_params=policy_params, policy_opt_state=policy_opt, value_params=value_params,
            value_opt_state=value_opt, step=state.step + 1,
            kl=controller.update(state.kl, metrics["kl"], rollout["ids"].shape[0]))
        if not return_rollouts:
            return new_state, metrics
        return new_state, metrics, _rollouts_out(rollout, scored)

    return step


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
    reward_fns: Sequence[Callable[..., Sequence[float | None]]] | None = None,
    reward_weights: Sequence[float] | None = None,
    tokenizer: Any = None,
    reward_columns: Mapping[str, Sequence[Any]] | None = None,
    mesh: Mesh | None = None,
    return_rollouts: bool = False,
) -> CompiledStep:
    """Builds the one-jit RLHF iteration (see the module docstring).

    Args:
      policy / value: a ``CausalLM`` (``CausalLMWithValueHead`` with a shared value head) and
        a ``ValueModel`` (``None`` with a shared head or a critic-free estimator).
      reward / reward_fn / scorer / reward_fns: exactly one reward source (see "Rewards" in
        the module docstring); ``reward_weights`` weigh ``reward_fns`` (default 1 each),
        ``tokenizer`` decodes for them, ``reward_columns`` ``{name: [value per dataset row]}``
        are passed to them as keyword arguments (prompts then carry ``"index" [B]``).
      config: :class:`RLHFConfig` (:class:`GRPOConfig` has GRPO's defaults).
      policy_optimizer / value_optimizer: optax transformations (e.g. ``make_optimizer``).
      mesh: optional device mesh (state by :func:`jaxalign.sharding.state_shardings`, prompts
        split over ``("data", "fsdp")``).
      return_rollouts: also return the samples ``{"prompt_ids", "prompt_mask",
        "completion_ids", "completion_mask", "scores"}`` (``[B·k, …]``, raw scores; with
        dynamic sampling the kept groups), to log or rescore them without resampling.

    Returns:
      A :class:`jaxalign.train.CompiledStep`: ``step(state, prompts, key) -> (state, metrics)``
      (``(state, metrics, rollouts)`` with ``return_rollouts``), the state donated. Prompts are
      ``{"prompt_ids", "prompt_mask"}`` ``[B, P]`` (plus ``"index" [B]`` with
      ``reward_columns``), left-padded; with ``samples_per_prompt = k`` each prompt is sampled
      k times, and with ``dynamic_sampling`` the step trains on ``B / oversample`` of them.
    """
    scorer = _check_rewards(config, value, reward, reward_fn, scorer, reward_fns)
    text = None if reward_fns is None else text_rewards(
        reward_fns, tokenizer, weights=reward_weights, columns=reward_columns)
    text_score = None if text is None else sharded_score(text, mesh)
    generate = make_generate(
        policy, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p, eos_id=config.eos_id, pad_id=config.pad_id)

    step = _iteration(config, generate, _forwards(policy, value, config), kl_controller(config),
                      reward, text, text_score, (policy_optimizer, value_optimizer), mesh,
                      return_rollouts)
    models = rlhf_state_models(policy=policy, value=value, reward=reward)
    return compile_step(
        step, mesh=mesh, state_shardings=lambda state: shd.state_shardings(state, mesh, models),
        args=("batch", "replicated"),
        outputs=("replicated",) + (("batch",) if return_rollouts else ()), bound=(scorer,))


def _update_batch(rollout: dict, scored: dict, advantages: jax.Array,
                  returns: jax.Array) -> dict[str, Any]:
    """What the PPO epochs train on: the sequences, their rollout-time quantities and targets."""
    return {**{k: rollout[k] for k in ("ids", "attn", "completion", "mask")},
            "old_logps": scored["old_logps"], "ref_logps": scored["ref_logps"],
            "old_values": scored["old_values"], "advantages": advantages, "returns": returns,
            "prompt_len": rollout["prompt_ids"].shape[1]}


def _rollouts_out(rollout: dict, scored: dict) -> dict[str, jax.Array]:
    """The samples ``return_rollouts`` gives back (scores before clipping and penalties)."""
    return {"prompt_ids": rollout["prompt_ids"], "prompt_mask": rollout["prompt_mask"],
            "completion_ids": rollout["completion"], "completion_mask": rollout["mask"],
            "scores": scored["raw_scores"]}


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
