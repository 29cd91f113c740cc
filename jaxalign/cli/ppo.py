"""The run behind ``jaxalign ppo`` and ``jaxalign grpo``: RLHF against a reward model or Python
reward functions (``--reward-fn``, :mod:`jaxalign.cli.reward_fns`), one compiled iteration
(:func:`jaxalign.train.rlhf.make_rlhf_step`) driven by the shared loop of :mod:`jaxalign.cli.loop`.
``grpo`` is the same run with GRPO's defaults (:class:`jaxalign.cli.configs.GRPOConfig`).

A run directory ``DIR`` (``--out``) holds::

    metrics.jsonl        one JSON object per logged iteration: {"step", "score/mean", "kl",
                         "kl_coef", "policy/clipfrac", "loss/policy", ..., "lr"}
    tb/                  TensorBoard event files, the same scalars + tokens/s
    checkpoints/<step>/  the whole RLHFState (policy, value model and both optimiser states,
                         reference and reward params, KL controller) + metadata {"kind",
                         "step", "loader", "model_config", "args"}
    final/               the policy as a causal LM (load_final, --init-from, --policy read it)
    hf/                  Hugging Face safetensors + tokenizer (--export-hf)
    summary.json         what :func:`ppo` returns

Iteration ``i`` (1-based) samples prompt batch ``i − 1`` of a ``DataLoader`` (a pure function of
seed and ``i``) with the PRNG key ``fold_in(rollout_key, i)``, where ``rollout_key`` derives from
``--seed`` alone; with the state checkpointed whole, a resumed run logs exactly what an
uninterrupted run logs. ``--lr`` follows the warmup-cosine schedule over all
``steps × ppo_epochs × num_minibatches`` optimiser updates; the logged ``lr`` is the one of an
iteration's first update. With ``--mesh`` the state is sharded by :mod:`jaxalign.sharding`'s
rules and prompts are split over ``data × fsdp``. With ``JAXALIGN_COORDINATOR`` set, the run
first joins a multi-process job (:func:`jaxalign.distributed.initialize`); each process feeds
its rows of every batch and only process 0 writes logs.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign import distributed, sharding
from jaxalign import train as steps
from jaxalign.cli.configs import GRPOConfig, PPOConfig
from jaxalign.cli.lora import check_export_adapter, lora_source, optimizer_for
from jaxalign.cli.loop import (RunError, check_checkpoints, checkpointed_loop, prepare_out,
                               summarize)
from jaxalign.cli.options import ConfigError
from jaxalign.cli.run_dir import config_to_dict, save_final
from jaxalign.cli.reward_fns import TextRewardSpec, text_reward_spec
from jaxalign.cli.sources import PolicyRun, load_policy_run, mesh_from_spec, stop_tokens
from jaxalign.data import DataLoader
from jaxalign.distributed import is_main_process
from jaxalign.models import (
    CausalLM, CausalLMWithValueHead, ValueModel, causal_lm_params, init_head_from_causal_lm,
)
from jaxalign.train.rlhf import init_rlhf_state, make_rlhf_step, rlhf_state_models

__all__ = ["ppo"]



def _check_batch(config: PPOConfig, mesh: jax.sharding.Mesh | None) -> None:
    """Batch sizes the mesh, the minibatches and the processes divide."""
    rows = config.batch_size * config.rlhf.samples_per_prompt
    if rows % config.rlhf.num_minibatches:
        raise ConfigError(f"batch_size x samples_per_prompt = {rows} rollouts do not split into"
                          f" num_minibatches={config.rlhf.num_minibatches}")
    if mesh is not None:
        split = mesh.shape["data"] * mesh.shape["fsdp"]
        for what, size in (("batch_size", config.batch_size),
                           ("a minibatch of rollouts", rows // config.rlhf.num_minibatches)):
            if size % split:
                raise ConfigError(f"{what} ({size}) is not divisible by the mesh's data x fsdp"
                                  f" = {split}")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the"
                          f" {jax.process_count()} processes")


def _iteration_key(rollout_key: jax.Array, step: int, mesh: Any) -> jax.Array:
    """``fold_in(rollout_key, step)``; in a multi-process run a replicated global array."""
    return sharding.global_key(jax.random.fold_in(rollout_key, step), mesh)


@functools.lru_cache(maxsize=4)
def _rlhf_fns(policy: Any, value: Any, reward: Any, rlhf_config: Any, policy_options: tuple,
              value_options: tuple, mesh: Any, rewards: TextRewardSpec | None = None) -> tuple:
    """``(step, policy_optimizer, value_optimizer, schedule)`` (cached: a process running
    several jobs on one model, e.g. a resume, compiles once). ``rewards``: the Python reward
    functions that score instead of ``reward``."""
    policy_optimizer = optimizer_for(policy, steps.make_optimizer(**dict(policy_options)))
    value_optimizer = (optimizer_for(value, steps.make_optimizer(**dict(value_options)))
                       if value is not None else None)  # LoRA: the adapters (and head) only
    step = make_rlhf_step(policy, value, reward, rlhf_config, policy_optimizer=policy_optimizer,
                          value_optimizer=value_optimizer, mesh=mesh,
                          **(rewards.step_options() if rewards is not None else {}))
    schedule = steps.optimizer_schedule(**dict(policy_options))
    return step, policy_optimizer, value_optimizer, jax.jit(schedule)


def _initial_state(config: PPOConfig, run: PolicyRun, rlhf_config: Any, mesh: Any,
                   key: jax.Array, rewards: TextRewardSpec | None = None
                   ) -> tuple[Any, Any, Any, Any]:
    """``(state, step, schedule, actor)``: the placed initial RLHF state (on a mesh created
    directly sharded, under one jit), its compiled iteration, the policy's LR schedule and the
    policy model it trains. Without a reward model a value model starts from the policy's
    trunk."""
    actor = run.policy
    if rlhf_config.shared_value_head:
        actor = CausalLMWithValueHead(run.policy.config)
    value = ValueModel((run.reward or run.policy).config) if (
        rlhf_config.uses_critic and not rlhf_config.shared_value_head) else None
    updates = config.steps * rlhf_config.ppo_epochs * rlhf_config.num_minibatches
    step_fn, policy_optimizer, value_optimizer, schedule = _rlhf_fns(
        actor, value, run.reward, rlhf_config, tuple(config.optimizer_options(updates).items()),
        tuple(config.optimizer_options(updates, config.value_lr).items()), mesh, rewards)

    def init(make_params, reward_params, key):
        policy_params = make_params(key)
        value_params = None
        if value is not None and reward_params is None:
            value_params = init_head_from_causal_lm(value, causal_lm_params(policy_params),
                                                    jax.random.fold_in(key, 2))
        if rlhf_config.shared_value_head:
            policy_params = init_head_from_causal_lm(actor, policy_params,
                                                     jax.random.fold_in(key, 1))
        return init_rlhf_state(rlhf_config, policy_params, policy_optimizer,
                               reward_params=reward_params, value_params=value_params,
                               value_optimizer=value_optimizer)

    make_params = run.make_policy_params
    if mesh is None:  # one placement for every leaf, as the step's outputs have (cli.train)
        state = jax.device_put(init(make_params, run.reward_params, key), jax.local_devices()[0])
        return state, step_fn, schedule, actor
    models = rlhf_state_models(policy=actor, value=value, reward=run.reward)
    shapes = jax.eval_shape(init, make_params, run.reward_params, key)
    key = sharding.global_key(key, mesh)
    state = jax.jit(init, out_shardings=sharding.state_shardings(shapes, mesh, models))(
        make_params, run.reward_params, key)
    return state, step_fn, schedule, actor


def ppo(config: PPOConfig) -> dict[str, Any]:
    """Runs one ``jaxalign ppo`` job; returns the summary (also in summary.json)."""
    began = time.perf_counter()
    if os.environ.get("JAXALIGN_COORDINATOR") and not jax.distributed.is_initialized():
        distributed.initialize()
    if config.out is None:
        raise RunError("--prompts, --policy, --reward and --out are required (as flags or in"
                       " --config)")
    out = Path(config.out).absolute()
    resuming = prepare_out(out, resume=config.resume)
    mesh = mesh_from_spec(config.mesh)
    _check_batch(config, mesh)
    # Read and check everything (the whole prompts file too) before writing anything.
    kind = "grpo" if isinstance(config, GRPOConfig) else "ppo"
    run = load_policy_run(kind, config, mesh)
    policy, make_policy_params = lora_source(run.policy, run.make_policy_params, config.lora,
                                             seed=config.seed, flag=f"--policy {config.policy}")
    run = run._replace(policy=policy, make_policy_params=make_policy_params)
    check_export_adapter(policy, config.export_adapter, "a LoRA --policy run")
    rewards = text_reward_spec(config, run.tokenizer, len(run.prompts))
    rlhf_config = config.rlhf_config(eos_id=stop_tokens(run.tokenizer),
                                     pad_id=run.tokenizer.padding_id)
    try:
        loader = DataLoader(run.prompts, config.batch_size, seed=config.seed)
    except ValueError as error:
        raise RunError(str(error)) from None
    model_config = {"policy": config_to_dict(run.policy.config)}
    if run.reward is not None:
        model_config["reward"] = config_to_dict(run.reward.config)
    if resuming:  # before compiling anything
        check_checkpoints(out / "checkpoints", kind, model_config)
    init_key, rollout_key = jax.random.split(jax.random.key(config.seed))
    state, step_fn, schedule, _ = _initial_state(config, run, rlhf_config, mesh, init_key,
                                                 rewards)
    out.mkdir(parents=True, exist_ok=True)
    k = rlhf_config.samples_per_prompt
    updates = rlhf_config.ppo_epochs * rlhf_config.num_minibatches  # per iteration

    def rlhf_step(state: Any, step: int) -> tuple[Any, dict, Any]:
        indices = loader.indices_at(step - 1)
        prompts = run.prompts.collate(indices)
        if rewards is not None:  # each prompt's row, where the reward functions' columns are
            prompts["index"] = np.asarray(indices, np.int32)
        prompt_tokens = int(prompts["prompt_mask"].sum()) * k
        if mesh is not None:
            if jax.process_count() > 1:  # this process's rows of the global batch
                prompts = {key: np.array_split(v, jax.process_count())[jax.process_index()]
                           for key, v in prompts.items()}
            prompts = sharding.shard_batch(prompts, mesh)
        state, metrics = step_fn(state, prompts, _iteration_key(rollout_key, step, mesh))
        return state, metrics, prompt_tokens + metrics["response_length"] * config.batch_size * k

    def learning_rate(step: int) -> dict[str, float]:
        return {"lr": float(schedule((step - 1) * updates))}

    result, start = checkpointed_loop(
        state, rlhf_step, config=config, kind=kind, out=out, loader=loader, resuming=resuming,
        model_config=model_config, began=began, headline="score/mean", extra=learning_rate,)
    return _finish(config, run, result, start, out, kind)


def _finish(config: PPOConfig, run: PolicyRun, result: Any, start: int,
            out: Path, kind: str = "ppo") -> dict[str, Any]:
    """Saves the final policy (as the causal LM it is, without a shared value head) when the
    run is done, and writes and prints the summary."""
    final = hf_dir = None
    if result.step == config.steps:
        final, hf_dir = save_final(out, kind, CausalLM(run.policy.config),
                                   causal_lm_params(result.state.policy_params), run.tokenizer,
                                   result.step, config.export_hf, config.export_adapter)
    metrics = result.final_metrics
    summary = summarize(kind, result, start=start, total=config.steps, out=out, final=final,
                        hf_dir=hf_dir, final_score=metrics.get("score/mean"),
                        final_kl=metrics.get("kl"))
    score = "n/a" if not metrics else f"{metrics['score/mean']:.4f} (kl {metrics['kl']:.4f})"
    where = final or f"{out / 'checkpoints'} (resume with --resume)"
    if is_main_process():
        print(f"jaxalign {kind}: {result.step - start} iterations (to {result.step}/{config.steps}),"
              f" final score {score}, {result.wall_time_s:.1f} s, {result.tokens_per_s:.0f}"
              f" tokens/s -> {where}")
    return summary
