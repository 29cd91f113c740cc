"""The whole RLHF iteration as one compiled function.

``step = make_rlhf_step(policy, value, reward, config, policy_optimizer=...)`` returns
``step(state, prompts, key) -> (state, metrics)``: a single ``jax.jit`` that

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

import dataclasses
from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.control import AdaptiveKLController, FixedKLController, KLControllerState
from jaxalign.advantages import gae
from jaxalign.best_of_n import completion_scorer
from jaxalign.logprobs import gather_logprobs
from jaxalign.losses import entropy, kl_penalty, ppo_loss
from jaxalign.masking import masked_mean, masked_whiten
from jaxalign.sampling import make_generate

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo")


@dataclasses.dataclass(frozen=True)
class RLHFConfig:
    """Hyperparameters of one RLHF iteration (names follow TRL/OpenRLHF where they exist).

    Sampling: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``eos_id``, ``pad_id``.
    Rewards: ``kl_coef`` (initial β), ``kl_target`` (``None`` = fixed β, else adaptive towards
    this sequence KL with ``kl_horizon``), ``kl_estimator`` (``k1``/``k3``/``abs``),
    ``missing_eos_penalty`` (subtracted from the score of completions without EOS),
    ``whiten_rewards``, ``score_clip``. Advantages: ``advantage`` (``gae``/``grpo``/``rloo``),
    ``samples_per_prompt`` (k completions per prompt; ≥ 2 for grpo/rloo), ``gamma``, ``lam``,
    ``whiten_advantages``. Update: ``ppo_epochs``, ``num_minibatches``, ``clip_eps``,
    ``value_clip``, ``vf_coef``, ``ent_coef``. ``shared_value_head``: the policy is a
    ``CausalLMWithValueHead`` and there is no separate value model.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    pad_id: int = 0
    kl_coef: float = 0.05
    kl_target: float | None = 6.0
    kl_horizon: float = 10_000.0
    kl_estimator: str = "k1"
    missing_eos_penalty: float | None = None
    whiten_rewards: bool = False
    score_clip: float | None = None
    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    samples_per_prompt: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    ppo_epochs: int = 2
    num_minibatches: int = 2
    clip_eps: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    shared_value_head: bool = False

    def __post_init__(self):
        if self.advantage not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage must be one of {ADVANTAGE_ESTIMATORS}, got {self.advantage!r}")
        if self.advantage != "gae" and self.samples_per_prompt < 2:
            raise ValueError(
                f"advantage={self.advantage!r} needs samples_per_prompt >= 2, got "
                f"{self.samples_per_prompt}"
            )
        if self.kl_estimator not in ("k1", "k3", "abs"):
            raise ValueError(f"kl_estimator must be k1, k3 or abs, got {self.kl_estimator!r}")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError(
                f"ppo_epochs={self.ppo_epochs} and num_minibatches={self.num_minibatches} "
                "must be >= 1"
            )

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    def kl_controller(self) -> AdaptiveKLController | FixedKLController:
        if self.kl_target is None:
            return FixedKLController(coef=self.kl_coef)
        return AdaptiveKLController(init_coef=self.kl_coef, target=self.kl_target,
                                    horizon=self.kl_horizon)


@flax.struct.dataclass
class RLHFState:
    """Everything an RLHF iteration carries (a pytree; donated to the step).

    ``value_params``/``value_opt_state`` are ``None`` with a shared value head or a critic-free
    estimator; ``reward_params`` is ``None`` when a ``reward_fn`` scores completions.
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
    critic and no ``value_params``, the value model starts from the reward model (trunk and
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
            value_params = {"trunk": reward_params["trunk"], "value_head": reward_params["score_head"]}
        if value_optimizer is None:
            raise ValueError("a separate value model needs value_optimizer")
        value_params = copy(value_params)
        value_opt_state = value_optimizer.init(value_params)
    else:
        value_params = None
    return RLHFState(
        policy_params=policy_params,
        policy_opt_state=policy_optimizer.init(policy_params),
        value_params=value_params,
        value_opt_state=value_opt_state,
        ref_params=ref_params,
        reward_params=reward_params,
        kl=config.kl_controller().init(),
        step=jnp.zeros((), jnp.int32),
    )


def group_advantages(scores: jax.Array, group_size: int, estimator: str) -> jax.Array:
    """Critic-free sequence advantages from ``scores [B·k]`` grouped ``k`` per prompt.

    ``grpo``: ``(s − mean_g) / (std_g + 1e−6)`` (Shao et al. 2024, arXiv:2402.03300);
    ``rloo``: ``s_i − mean_{j≠i} s_j`` (Ahmadian et al. 2024, arXiv:2402.14740).
    """
    grouped = scores.reshape(-1, group_size)
    mean = jnp.mean(grouped, axis=1, keepdims=True)
    if estimator == "grpo":
        std = jnp.std(grouped, axis=1, keepdims=True, ddof=1)
        adv = (grouped - mean) / (std + 1e-6)
    elif estimator == "rloo":
        adv = (grouped - mean) * group_size / (group_size - 1)
    else:
        raise ValueError(f"estimator must be grpo or rloo, got {estimator!r}")
    return adv.reshape(-1)


class CompiledRLHFStep:
    """``step(state, prompts, key) -> (state, metrics)`` (``(state, metrics, rollouts)`` with
    ``return_rollouts``), jitted on first call with the state's shardings (when a mesh is
    given) and the state donated. ``.jitted`` is the jitted function,
    ``jitted(state, prompts, key, scorer)``: the scorer (a ``jax.tree_util.Partial``, or
    ``None``) is an argument, so the arrays it carries are inputs, not compiled-in constants."""

    def __init__(self, fn, state_shardings_fn, mesh: Mesh | None, return_rollouts: bool = False,
                 scorer: jax.tree_util.Partial | None = None):
        self._fn, self._state_shardings_fn, self._mesh = fn, state_shardings_fn, mesh
        self._return_rollouts = return_rollouts
        if mesh is None:
            self.jitted = jax.jit(fn, donate_argnums=(0,))
            self._scorer = jax.device_put(scorer)  # placed once, not transferred every step
        else:
            # Replicated once here; an argument placed elsewhere would be copied to every
            # device on every call. Multi-process: through the host, as in shard_rlhf_state.
            self.jitted = None
            if jax.process_count() > 1:
                scorer = jax.device_get(scorer)
            self._scorer = jax.device_put(scorer, shd.replicated(mesh))

    def __call__(self, state: RLHFState, prompts: dict, key: jax.Array):
        if self.jitted is None:
            state_sh = self._state_shardings_fn(state)
            repl = shd.replicated(self._mesh)
            self.jitted = jax.jit(
                self._fn, donate_argnums=(0,),
                in_shardings=(state_sh, shd.batch_sharding(self._mesh), repl, repl),
                out_shardings=(state_sh, repl) + (
                    (shd.batch_sharding(self._mesh),) if self._return_rollouts else ()),
            )
        return self.jitted(state, prompts, key, self._scorer)


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
) -> CompiledRLHFStep:
    """Builds the one-jit RLHF iteration (see the module docstring).

    Args:
      policy: a ``CausalLM`` (or ``CausalLMWithValueHead`` with ``config.shared_value_head``).
      value: a ``ValueModel``, or ``None`` (shared head or critic-free estimator).
      reward: a ``RewardModel``, or ``None`` when ``reward_fn`` is given.
      config: :class:`RLHFConfig`.
      policy_optimizer / value_optimizer: optax transformations (e.g. ``make_optimizer``).
      reward_fn: optional pure ``(completion_ids [B, N], completion_mask [B, N]) -> [B]``
        scoring function used instead of the reward model (rule-based, verifiable rewards).
      scorer: optional pure ``(prompt_ids [B, P], prompt_mask [B, P], completion_ids [B, N],
        completion_mask [B, N]) -> [B]`` used instead of the reward model when the reward
        depends on the prompt (the protocol of :func:`jaxalign.best_of_n.best_of_n`'s scorers;
        prompts are left-padded, each repeated ``samples_per_prompt`` times). A
        ``jax.tree_util.Partial`` scorer (e.g. :func:`jaxalign.best_of_n.reward_model_scorer`)
        is passed to the compiled step as an argument, its arrays replicated on the mesh;
        arrays any other callable closes over are compiled in as constants. A learned reward
        model that only reads ``prompt + completion`` is better passed as ``reward`` (its
        params then live in the state, sharded like the others).
      mesh: optional device mesh; the state is then laid out by
        :func:`rlhf_state_shardings` and prompts split over ``("data", "fsdp")``.
      return_rollouts: also return the iteration's samples, ``{"prompt_ids", "prompt_mask",
        "completion_ids", "completion_mask", "scores"}`` (``[B·k, …]``; ``scores`` before
        clipping and the missing-EOS penalty), to log them or score them with another reward
        without sampling again.

    Returns:
      A :class:`CompiledRLHFStep`. Prompts are ``{"prompt_ids", "prompt_mask"}`` ``[B, P]``,
      left-padded; with ``samples_per_prompt = k`` each prompt is sampled k times.
    """
    if (reward is not None) + (reward_fn is not None) + (scorer is not None) != 1:
        raise ValueError("pass exactly one of reward (a RewardModel), reward_fn and scorer")
    if reward_fn is not None:
        scorer = completion_scorer(reward_fn)
    if scorer is not None and not isinstance(scorer, jax.tree_util.Partial):
        scorer = jax.tree_util.Partial(scorer)
    if config.uses_critic and not config.shared_value_head and value is None:
        raise ValueError("advantage='gae' without shared_value_head needs a value model")
    if config.shared_value_head and not config.uses_critic:
        raise ValueError("shared_value_head needs advantage='gae'")
    generate = make_generate(
        policy, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p, eos_id=config.eos_id, pad_id=config.pad_id,
    )
    temperature = config.temperature if config.temperature > 0 else 1.0
    controller = config.kl_controller()
    k = config.samples_per_prompt

    def completion_outputs(module, ids, attn, prompt_len):
        # Slice the [B, T, D] hidden states to the positions that predict completion tokens
        # before the LM head, so no [B, T, V] logits are computed for the prompt (or copied).
        hidden, _ = module.trunk(ids, attn)
        hidden = hidden[:, prompt_len - 1:-1]
        logits = module.logits(hidden)
        values = module.value_head(hidden) if config.shared_value_head else None
        return logits, values

    def policy_forward(params, ids, attn, prompt_len):
        logits, values = policy.apply({"params": params}, ids, attn, prompt_len,
                                      method=completion_outputs)
        return logits / temperature, values

    def value_forward(params, ids, attn, prompt_len):
        return value.apply({"params": params}, ids, attn)[:, prompt_len - 1:-1]

    def constrain(x, spec):
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def step(state: RLHFState, prompts: dict, key: jax.Array, scorer: Any = None):
        prompt_ids = jnp.repeat(jnp.asarray(prompts["prompt_ids"], jnp.int32), k, axis=0)
        prompt_mask = jnp.repeat(jnp.asarray(prompts["prompt_mask"], jnp.int32), k, axis=0)
        batch, prompt_len = prompt_ids.shape
        sample_key, shuffle_key = jax.random.split(key)

        # 1. sample
        out = generate(state.policy_params, prompt_ids, prompt_mask, sample_key)
        completion, mask = out.tokens, out.completion_mask
        ids = jnp.concatenate([prompt_ids, completion], axis=1)
        attn = jnp.concatenate([prompt_mask, mask], axis=1)
        valid = mask > 0

        # 2. score: old and reference log-probs, values, rewards
        logits, shared_values = policy_forward(state.policy_params, ids, attn, prompt_len)
        old_logps = gather_logprobs(logits, completion)
        rollout_entropy = masked_mean(entropy(logits), valid)
        del logits
        ref_logits, _ = policy_forward(state.ref_params, ids, attn, prompt_len)
        ref_logps = gather_logprobs(ref_logits, completion)
        del ref_logits
        if config.shared_value_head:
            old_values = shared_values
        elif config.uses_critic:
            old_values = value_forward(state.value_params, ids, attn, prompt_len)
        else:
            old_values = jnp.zeros_like(old_logps)
        if scorer is not None:
            scores = jnp.asarray(scorer(prompt_ids, prompt_mask, completion, mask), jnp.float32)
        else:
            scores = reward.apply({"params": state.reward_params}, ids, attn).astype(jnp.float32)
        raw_scores = scores
        if config.score_clip is not None:
            scores = jnp.clip(scores, -config.score_clip, config.score_clip)
        has_eos = (jnp.any((completion == config.eos_id) & valid, axis=1)
                   if config.eos_id is not None else jnp.ones((batch,), bool))
        if config.missing_eos_penalty is not None:
            scores = jnp.where(has_eos, scores, scores - config.missing_eos_penalty)

        # 3. per-token rewards: −β·KL_t, plus the score at the last completion token
        kl = jnp.where(valid, kl_penalty(old_logps, ref_logps, estimator=config.kl_estimator), 0.0)
        sequence_kl = jnp.sum(kl, axis=1)
        kl_coef = state.kl.coef
        lengths = jnp.sum(mask, axis=1)
        last = jax.nn.one_hot(jnp.maximum(lengths - 1, 0), completion.shape[1], dtype=jnp.float32)

        # 4. advantages
        if config.uses_critic:
            rewards = -kl_coef * kl + last * scores[:, None]
            if config.whiten_rewards:
                rewards = masked_whiten(rewards, valid, shift_mean=False)
            advantages, returns = gae(rewards, old_values, valid, gamma=config.gamma, lam=config.lam)
        else:
            sequence_reward = scores - kl_coef * sequence_kl
            advantages = group_advantages(sequence_reward, k, config.advantage)[:, None] * valid
            returns = jnp.zeros_like(advantages)
        if config.whiten_advantages and config.advantage != "grpo":
            advantages = masked_whiten(advantages, valid)

        # 5. PPO epochs × minibatches
        rollout = {"ids": ids, "attn": attn, "completion": completion, "mask": mask,
                   "old_logps": old_logps, "old_values": old_values,
                   "advantages": advantages, "returns": returns}
        mb_size = batch // config.num_minibatches

        def minibatch_step(carry, mb):
            policy_params, policy_opt, value_params, value_opt = carry

            def loss_fn(policy_params, value_params):
                logits, values = policy_forward(policy_params, mb["ids"], mb["attn"], prompt_len)
                if config.uses_critic and not config.shared_value_head:
                    values = value_forward(value_params, mb["ids"], mb["attn"], prompt_len)
                elif values is None:
                    values = jnp.zeros_like(mb["old_values"])
                logps = gather_logprobs(logits, mb["completion"])
                return ppo_loss(
                    logps, mb["old_logps"], mb["advantages"], values, mb["old_values"],
                    mb["returns"], mb["mask"], entropies=entropy(logits),
                    clip_eps=config.clip_eps, value_clip=config.value_clip,
                    vf_coef=config.vf_coef if config.uses_critic else 0.0,
                    ent_coef=config.ent_coef,
                )

            (_, metrics), (policy_grads, value_grads) = jax.value_and_grad(
                loss_fn, argnums=(0, 1), has_aux=True)(policy_params, value_params)
            updates, policy_opt = policy_optimizer.update(policy_grads, policy_opt, policy_params)
            policy_params = optax.apply_updates(policy_params, updates)
            if value_params is not None:
                updates, value_opt = value_optimizer.update(value_grads, value_opt, value_params)
                value_params = optax.apply_updates(value_params, updates)
            metrics["grad_norm"] = optax.tree.norm(policy_grads)
            return (policy_params, policy_opt, value_params, value_opt), metrics

        def epoch_step(carry, epoch_key):
            order = jax.random.permutation(epoch_key, batch)
            minibatches = jax.tree.map(
                lambda x: constrain(
                    x[order].reshape(config.num_minibatches, mb_size, *x.shape[1:]),
                    P(None, shd.BATCH_AXES)),
                rollout)
            return jax.lax.scan(minibatch_step, carry, minibatches)

        carry = (state.policy_params, state.policy_opt_state, state.value_params,
                 state.value_opt_state)
        epoch_keys = jax.random.split(shuffle_key, config.ppo_epochs)
        carry, update_metrics = jax.lax.scan(epoch_step, carry, epoch_keys)
        policy_params, policy_opt, value_params, value_opt = carry

        # 6. KL controller
        mean_kl = jnp.mean(sequence_kl)
        kl_state = controller.update(state.kl, mean_kl, batch)

        mean = lambda x: jnp.mean(x)  # noqa: E731
        metrics = {
            "score/mean": mean(raw_scores),
            "score/std": jnp.std(raw_scores),
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "entropy": rollout_entropy,
            "policy/clipfrac": mean(update_metrics["clipfrac"]),
            "policy/approx_kl": mean(update_metrics["approx_kl"]),
            "loss/policy": mean(update_metrics["policy_loss"]),
            "loss/value": mean(update_metrics["value_loss"]),
            "loss/total": mean(update_metrics["loss"]),
            "value/clipfrac": mean(update_metrics["value_clipfrac"]),
            "response_length": mean(lengths.astype(jnp.float32)),
            "eos_fraction": mean(has_eos.astype(jnp.float32)),
            "return/mean": masked_mean(returns, valid),
            "advantage/mean": masked_mean(advantages, valid),
            "grad_norm": mean(update_metrics["grad_norm"]),
        }
        new_state = state.replace(
            policy_params=policy_params, policy_opt_state=policy_opt,
            value_params=value_params, value_opt_state=value_opt,
            kl=kl_state, step=state.step + 1,
        )
        if return_rollouts:
            rollouts = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                        "completion_ids": completion, "completion_mask": mask,
                        "scores": raw_scores}
            return new_state, metrics, rollouts
        return new_state, metrics

    def state_shardings(state: RLHFState):
        return rlhf_state_shardings(state, mesh, policy=policy, value=value, reward=reward)

    return CompiledRLHFStep(step, state_shardings, mesh, return_rollouts, scorer)


def rlhf_state_shardings(
    state: RLHFState, mesh: Mesh, *, policy: Any, value: Any = None, reward: Any = None,
    rules=shd.DEFAULT_RULES,
) -> RLHFState:
    """NamedShardings for every leaf of ``state``: parameters by their logical axes, optimiser
    moments like their parameters, everything else replicated."""
    repl = shd.replicated(mesh)

    def params_and_opt(model, params, opt_state):
        if params is None:
            return None, (None if opt_state is None else jax.tree.map(lambda _: repl, opt_state))
        p_sh = shd.param_shardings(model, params, mesh, rules)
        o_sh = None if opt_state is None else shd.shardings_like_params(opt_state, params, p_sh, mesh)
        return p_sh, o_sh

    policy_sh, policy_opt_sh = params_and_opt(policy, state.policy_params, state.policy_opt_state)
    value_sh, value_opt_sh = params_and_opt(value, state.value_params, state.value_opt_state)
    reward_sh, _ = params_and_opt(reward, state.reward_params, None)
    return RLHFState(
        policy_params=policy_sh, policy_opt_state=policy_opt_sh,
        value_params=value_sh, value_opt_state=value_opt_sh,
        ref_params=shd.param_shardings(policy, state.ref_params, mesh, rules),
        reward_params=reward_sh,
        kl=jax.tree.map(lambda _: repl, state.kl),
        step=repl,
    )


def shard_rlhf_state(state: RLHFState, mesh: Mesh, **models) -> RLHFState:
    """Places ``state`` on ``mesh`` with :func:`rlhf_state_shardings` (``policy=…, value=…,
    reward=…``).

    In a multi-process run every process passes the same values (same seed or the same
    checkpoint); they go through host memory first, because ``device_put`` cannot move an
    array committed to one local device onto a mesh that spans processes.
    """
    if jax.process_count() > 1:
        state = jax.device_get(state)
    return jax.device_put(state, rlhf_state_shardings(state, mesh, **models))
