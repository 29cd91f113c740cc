"""Stages 5–7 of the demo: PPO against the reward model, DPO / IPO / ORPO on the preference
pairs, and the evaluation of every resulting policy against the SFT model.

Compilation is shared wherever shapes allow: one RLHF step serves every fixed-β PPO run of the
sweep (β lives in the state's KL-controller state, not in the program), and each preference
loss is compiled once with its hyperparameter (β or λ) as a traced argument — the factories'
``jit=False`` mode exists for callers that wrap the step in their own ``jit``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign.data import DataLoader, load_jsonl
from jaxalign.demo import task
from jaxalign.demo.cache import load_params, save_params
from jaxalign.demo.context import Context, preference_dataset, progress, read_jsonl
from jaxalign.evaluate import evaluate_policy, mean_and_se
from jaxalign.feedback import write_jsonl
from jaxalign.models import RewardModel, ValueModel
from jaxalign.train.rlhf import RLHFConfig, init_rlhf_state, make_rlhf_step
from jaxalign.train import (
    create_train_state, make_optimizer, make_preference_step, make_unpaired_step,
)

__all__ = ["planned_runs", "run_alignment", "run_evaluation", "run_name", "run_preference",
           "stage_baseline", "stage_evaluate", "stage_ppo", "stage_preference"]

# Compiled programs shared between stages of one process, keyed by what is baked into them.
_COMPILED: dict[Any, Any] = {}


def run_name(method: str, value: float | None = None) -> str:
    """Directory name of one training run: ``ppo``, ``ppo_fixed_0.1``, ``dpo_beta0.1``, ..."""
    if method == "ppo_fixed":
        return f"ppo_fixed_{value:g}"
    if method == "dpo":
        return f"dpo_beta{value:g}"
    return method


# ----------------------------------------------------------------------------- PPO
def _rlhf_config(ctx: Context, *, kl_coef: float, adaptive: bool) -> RLHFConfig:
    cfg = ctx.config
    return RLHFConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=1.0, eos_id=ctx.tokenizer.eos_id,
        pad_id=ctx.tokenizer.padding_id, kl_coef=kl_coef,
        kl_target=cfg.ppo_kl_target if adaptive else None, kl_horizon=cfg.ppo_kl_horizon,
        missing_eos_penalty=cfg.ppo_missing_eos_penalty, ppo_epochs=cfg.ppo_epochs,
        num_minibatches=cfg.ppo_minibatches)


def _ppo_optimizers(ctx: Context):
    cfg = ctx.config
    updates = cfg.ppo_iterations * cfg.ppo_epochs * cfg.ppo_minibatches
    return (make_optimizer(cfg.ppo_lr, total_steps=updates, warmup_steps=updates // 10),
            make_optimizer(cfg.ppo_value_lr, total_steps=updates, warmup_steps=updates // 10))


def stage_ppo(ctx: Context, out: Path, *, kl_coef: float, adaptive: bool) -> dict[str, Any]:
    """PPO (GAE, value model initialised from the reward model) with the one-jit RLHF step.

    Before each iteration the current policy samples the iteration's prompts once more with a
    fresh key; the gold reward of those samples is the reward curve (the training rollouts
    themselves stay inside the compiled step).
    """
    cfg = ctx.config
    model_config = ctx.model.config
    rlhf_config = _rlhf_config(ctx, kl_coef=kl_coef, adaptive=adaptive)
    # kl_coef only sets the initial controller state, so runs that differ in it share a step
    key = ("rlhf", ctx.model, dataclasses.replace(rlhf_config, kl_coef=0.0), cfg.ppo_lr,
           cfg.ppo_value_lr, cfg.ppo_iterations)
    if key not in _COMPILED:
        policy_opt, value_opt = _ppo_optimizers(ctx)
        _COMPILED[key] = (make_rlhf_step(
            ctx.model, ValueModel(model_config), RewardModel(model_config), rlhf_config,
            policy_optimizer=policy_opt, value_optimizer=value_opt), policy_opt, value_opt)
    step, policy_opt, value_opt = _COMPILED[key]
    state = init_rlhf_state(rlhf_config, ctx.sft_params(), policy_opt,
                            reward_params=ctx.reward_params(),
                            value_optimizer=value_opt)
    prompts = ctx.prompts("ppo_prompts")
    n = cfg.ppo_batch
    curve: dict[str, list] = {k: [] for k in ("gold_reward", "gold_reward_se", "rm_score", "kl",
                                               "kl_coef", "response_length")}
    per_iteration_gold = []
    base_key = jax.random.key(cfg.seed + 30)
    bar = progress(range(cfg.ppo_iterations), desc=f"ppo (β0={kl_coef:g}"
                   f"{', adaptive' if adaptive else ''})", unit="it")
    for it in bar:
        batch = {k: v[it * n:(it + 1) * n] for k, v in prompts.items()}
        sample = ctx.sample(state.policy_params, batch, jax.random.fold_in(base_key, 2 * it))
        gold = task.gold_rewards(ctx.decode(sample.tokens, sample.completion_mask))
        per_iteration_gold.append(gold.tolist())
        mean, se = mean_and_se(gold)
        state, metrics = step(state, batch, jax.random.fold_in(base_key, 2 * it + 1))
        metrics = jax.device_get(metrics)
        curve["gold_reward"].append(mean)
        curve["gold_reward_se"].append(se)
        curve["rm_score"].append(float(metrics["score/mean"]))
        curve["kl"].append(float(metrics["kl"]))
        curve["kl_coef"].append(float(metrics["kl_coef"]))
        curve["response_length"].append(float(metrics["response_length"]))
        bar.set_postfix(gold=f"{mean:+.2f}", rm=f"{curve['rm_score'][-1]:+.2f}",
                        kl=f"{curve['kl'][-1]:.2f}", beta=f"{curve['kl_coef'][-1]:.3f}")
    save_params(state.policy_params, out / "params.msgpack")
    return {"hyperparameters": {"kl_coef_init": kl_coef, "adaptive": adaptive,
                                "kl_target": rlhf_config.kl_target, "lr": cfg.ppo_lr,
                                "iterations": cfg.ppo_iterations, "batch": n},
            "curve": {"iteration": list(range(cfg.ppo_iterations)), **curve},
            "per_iteration_gold": per_iteration_gold}


# ----------------------------------------------------------------------------- DPO/IPO/ORPO
def _preference_step(model: Any, loss: str, *, learning_rate: float, steps: int,
                     simpo_gamma: float = 0.5):
    """``(step, optimizer)``; ``step(state, batch, coef)`` is compiled once per loss and
    schedule, ``coef`` being β (λ for ORPO)."""
    key = ("preference", model, loss, learning_rate, steps, simpo_gamma)
    if key not in _COMPILED:
        optimizer = make_optimizer(learning_rate, total_steps=steps, warmup_steps=steps // 10)

        def step(state, batch, coef):
            kwargs = {"orpo_lambda": coef} if loss == "orpo" else {"beta": coef}
            if loss == "simpo":
                kwargs["simpo_gamma"] = simpo_gamma
            factory = make_unpaired_step if loss == "kto" else make_preference_step
            inner = factory(model, optimizer, loss=loss, jit=False, **kwargs)
            return inner(state, batch)

        _COMPILED[key] = (jax.jit(step, donate_argnums=(0,)), optimizer)
    return _COMPILED[key]


def _unpaired_dataset(ctx: Context, out: Path, stage: str):
    """The train pairs of ``stage`` split into unpaired examples (KTO's data): each pair's
    chosen completion as desirable, its rejected one as undesirable."""
    records = []
    for pair in read_jsonl(ctx.out / stage / "train.jsonl"):
        records += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                    {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    path = out / "unpaired_train.jsonl"
    write_jsonl(path, records)
    return load_jsonl(path, ctx.tokenizer, kind="unpaired", config=ctx.data_config())


def stage_preference(ctx: Context, out: Path, *, loss: str, coef: float,
                     data: str = "preferences") -> dict[str, Any]:
    """DPO / IPO (reference = SFT, in the state), ORPO / SimPO (no reference) or KTO (on the
    pairs split into unpaired examples) from the SFT model, on the train pairs of stage
    ``data`` (soft ``p_chosen`` labels make DPO conservative DPO)."""
    cfg = ctx.config
    dataset = (_unpaired_dataset(ctx, out, data) if loss == "kto"
               else preference_dataset(ctx, "train", stage=data))
    loader = DataLoader(dataset, cfg.pref_batch, seed=cfg.seed + 40)
    steps = max(1, cfg.pref_epochs * loader.steps_per_epoch)
    learning_rate = cfg.orpo_lr if loss == "orpo" else cfg.pref_lr
    step, optimizer = _preference_step(ctx.model, loss, learning_rate=learning_rate, steps=steps,
                                       simpo_gamma=cfg.simpo_gamma)
    params = ctx.sft_params()  # a fresh copy; create_train_state copies the reference again
    reference_free = loss in ("orpo", "simpo")
    state = create_train_state(params, optimizer, jax.random.key(cfg.seed + 41),
                               ref_params=None if reference_free else params)
    coef_array = np.float32(coef)
    history = []
    bar = progress(range(steps), desc=f"{loss} ({'λ' if loss == 'orpo' else 'β'}={coef:g})",
                   unit="step")
    for index in bar:
        state, metrics = step(state, loader.batch_at(index), coef_array)
        if index % 10 == 0 or index == steps - 1:
            metrics = jax.device_get(metrics)
            history.append({k: float(metrics[k]) for k in ("loss", "rewards/accuracies",
                                                           "rewards/margins") if k in metrics})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}",
                            margin=f"{history[-1]['rewards/margins']:.2f}")
    save_params(state.params, out / "params.msgpack")
    name = "orpo_lambda" if loss == "orpo" else "beta"
    extra = {"simpo_gamma": cfg.simpo_gamma} if loss == "simpo" else {}
    return {"hyperparameters": {name: coef, **extra, "lr": learning_rate, "steps": steps,
                                "batch": cfg.pref_batch},
            "first": history[0], "final": history[-1]}


# ----------------------------------------------------------------------------- evaluation
def stage_baseline(ctx: Context, out: Path) -> dict[str, Any]:
    """SFT completions of the evaluation prompts: the comparison set for every win rate."""
    sample = ctx.sample(ctx.sft_params(), ctx.prompts("eval_prompts"),
                        jax.random.key(ctx.config.seed + 50))
    rewards = task.gold_rewards(ctx.decode(sample.tokens, sample.completion_mask))
    return {"rewards": rewards.tolist(), "gold_reward": float(np.mean(rewards))}


def stage_evaluate(ctx: Context, out: Path, *, run: str, baseline: list[float]) -> dict[str, Any]:
    """Gold reward, KL to SFT and win rate vs the baseline for the policy of ``run``."""
    prompts = ctx.prompts("eval_prompts")
    params_path = ctx.out / ("sft" if run == "sft" else run) / "params.msgpack"
    bar = progress(total=1, desc=f"evaluate {run}", unit="model")
    result = evaluate_policy(
        ctx.model, load_params(params_path), ctx.sft_params(), prompts["prompt_ids"],
        prompts["prompt_mask"], jax.random.key(ctx.config.seed + 51), score_fn=task.gold_rewards,
        decode_fn=ctx.decode, baseline_rewards=np.asarray(baseline),
        max_new_tokens=ctx.config.max_new_tokens, eos_id=ctx.tokenizer.eos_id,
        pad_id=ctx.tokenizer.padding_id, batch_size=ctx.config.gen_batch, seed=ctx.config.seed)
    bar.update(1)
    bar.close()
    return result


def planned_runs(ctx: Context) -> list[tuple[str, str, float, bool]]:
    """``(run, method, coefficient, is_main)`` for every training run, main methods first."""
    cfg = ctx.config
    runs = [("ppo", "ppo", cfg.ppo_kl_coef, True),
            (run_name("dpo", cfg.dpo_beta), "dpo", cfg.dpo_beta, True),
            ("ipo", "ipo", cfg.ipo_beta, True),
            ("orpo", "orpo", cfg.orpo_lambda, True)]
    runs += [(run_name("dpo", b), "dpo", b, False) for b in cfg.dpo_sweep if b != cfg.dpo_beta]
    runs += [(run_name("ppo_fixed", b), "ppo_fixed", b, False) for b in cfg.ppo_sweep]
    runs += [("simpo", "simpo", cfg.simpo_beta, False), ("kto", "kto", cfg.kto_beta, False)]
    return runs


def run_preference(ctx: Context, run: str, loss: str, coef: float, *,
                   data: str = "preferences") -> dict[str, Any]:
    """The cached preference-optimisation stage ``run`` on the pairs of stage ``data``."""
    settings = {k: getattr(ctx.config, k) for k in ("seed", "pref_epochs", "pref_batch",
                                                    "pref_lr", "orpo_lr")}
    if loss == "simpo":  # (other runs keep their cache keys)
        settings["simpo_gamma"] = ctx.config.simpo_gamma
    return ctx.cache.run(run, {**settings, "loss": loss, "coef": coef}, (data,),
                         lambda d: stage_preference(ctx, d, loss=loss, coef=coef, data=data))


def run_evaluation(ctx: Context, run: str, baseline: dict[str, Any]) -> dict[str, Any]:
    """The cached ``eval/RUN`` stage (``run`` is ``"sft"`` or a finished training stage)."""
    settings = {"seed": ctx.config.seed, "gen_batch": ctx.config.gen_batch}
    return ctx.cache.run(f"eval/{run}", settings, (run, "eval/baseline"),
                         lambda d: stage_evaluate(ctx, d, run=run, baseline=baseline["rewards"]))


def run_alignment(ctx: Context) -> dict[str, Any]:
    """Trains and evaluates every run; returns ``{"runs", "evals", "baseline"}``."""
    cfg, cache = ctx.config, ctx.cache
    ppo_settings = {k: getattr(cfg, k) for k in (
        "seed", "ppo_iterations", "ppo_batch", "ppo_lr", "ppo_value_lr", "ppo_kl_target",
        "ppo_kl_horizon", "ppo_epochs", "ppo_minibatches", "ppo_missing_eos_penalty",
        "gen_batch")}
    baseline = cache.run("eval/baseline", {"seed": cfg.seed, "gen_batch": cfg.gen_batch},
                         ("sft", "prompts"), lambda d: stage_baseline(ctx, d))
    runs, evals = {}, {"sft": run_evaluation(ctx, "sft", baseline)}
    for run, method, coef, _ in planned_runs(ctx):
        if method in ("ppo", "ppo_fixed"):
            adaptive = method == "ppo"
            runs[run] = cache.run(run, {**ppo_settings, "kl_coef": coef, "adaptive": adaptive},
                                  ("reward_model", "prompts"),
                                  lambda d, c=coef, a=adaptive: stage_ppo(ctx, d, kl_coef=c,
                                                                          adaptive=a))
        else:
            runs[run] = run_preference(ctx, run, method, coef)
        evals[run] = run_evaluation(ctx, run, baseline)
    return {"runs": runs, "evals": evals, "baseline": baseline}

