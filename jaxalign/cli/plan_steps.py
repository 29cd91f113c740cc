"""The steps ``jaxalign plan`` compiles, built as the training commands build them, on abstract
inputs.

:func:`abstract_step` makes the real step of ``sft``, ``rm``, ``dpo``, ``ipo``, ``orpo`` or
``ppo`` with the library factories (``make_sft_step``, ``make_reward_step``,
``make_preference_step``, ``make_rlhf_step``) and the one ``compile_step`` with the mesh's
in/out shardings (:func:`jaxalign.sharding.state_shardings`), and its inputs as trees of
``jax.ShapeDtypeStruct`` carrying those shardings: the state comes from ``jax.eval_shape`` of
the same initialisation a run performs, so no parameter is ever allocated. It also counts the
step's model FLOPs analytically (:func:`jaxalign.plan.forward_flops`).

Shapes: a train step reads ``batch_size`` rows (pairs for ``rm``/``dpo``/``ipo``/``orpo``) of
``length`` tokens; ``ppo`` samples ``max_new_tokens`` after ``prompt_length`` prompt tokens for
``batch_size × samples_per_prompt`` rows, with a reward and (for GAE) a value model of the
policy's shape, and no EOS, so the decode loop runs its full length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign import train as steps
from jaxalign.cli.configs import PlanConfig
from jaxalign.models import (CausalLM, CausalLMWithValueHead, RewardModel, TransformerConfig,
                             ValueModel, init_params)
from jaxalign.plan import forward_flops
from jaxalign.train.preference import PreferenceConfig
from jaxalign.train.rlhf import init_rlhf_state, make_rlhf_step, rlhf_state_models
from jaxalign.train.state import compile_step

__all__ = ["AbstractStep", "abstract_step", "parameter_total", "state_field_bytes"]

_PAIRED = ("rm", "dpo", "ipo", "orpo")


class AbstractStep(NamedTuple):
    """A compiled-step-to-be and its abstract inputs.

    Attributes:
      step: the :class:`jaxalign.train.CompiledStep` (``step.lower(state, *args)``).
      state: the train or RLHF state, ``jax.ShapeDtypeStruct`` leaves with shardings.
      args: the other inputs (the batch; ``ppo``: prompts and the PRNG key), likewise.
      model_flops: analytic model FLOPs of one step over the whole mesh.
      loop_trips: how often a loop XLA cannot count runs (the sampler's decode loop), or 1.
      logits: ``(rows, positions, vocab)`` of one full-vocabulary float32 logits tensor.
      shapes: the step's sizes, for the report.
    """

    step: Any
    state: Any
    args: tuple
    model_flops: float
    loop_trips: int
    logits: tuple[int, int, int]
    shapes: dict[str, int]


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _inputs(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh: Mesh) -> dict[str, Any]:
    """Batch inputs ``{name: (shape, dtype)}`` split over ``data × fsdp``."""
    sharding = shd.batch_sharding(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for name, (shape, dtype) in shapes.items()}


def _check_split(mesh: Mesh, **rows: int) -> None:
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    for what, size in rows.items():
        if size % split:
            raise ValueError(f"{what} ({size}) is not divisible by the mesh's data x fsdp ="
                             f" {split}")


def _train_step(kind: str, config: PlanConfig, model_config: TransformerConfig, mesh: Mesh,
                length: int) -> AbstractStep:
    """``sft``/``rm``/``dpo``/``ipo``/``orpo``, as ``jaxalign KIND`` builds it."""
    model = (RewardModel if kind == "rm" else CausalLM)(model_config)
    optimizer = steps.make_optimizer(**config.optimizer_options())
    preference = PreferenceConfig(loss=(kind,)) if kind not in ("sft", "rm") else None
    if kind == "sft":
        fn = steps.make_sft_step(model, optimizer, jit=False)
    elif kind == "rm":
        fn = steps.make_reward_step(model, optimizer, jit=False)
    else:
        fn = steps.make_preference_step(model, optimizer, config=preference, jit=False)
    reference = preference is not None and preference.needs_reference
    in_state = reference and not config.precompute_ref

    def init(key: jax.Array) -> Any:
        params = init_params(model, key)
        return steps.create_train_state(params, optimizer, key,
                                        ref_params=params if in_state else None)

    models = {"params": model, "ref_params": model}
    layout = lambda state: shd.state_shardings(state, mesh, models)  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.key(0))
    rows = config.batch_size * (2 if kind in _PAIRED else 1)
    _check_split(mesh, batch_size=config.batch_size)
    ids = ((config.batch_size, length), jnp.int32)
    if kind == "sft":
        batch = dict.fromkeys(("input_ids", "attention_mask", "completion_mask"), ids)
    else:
        fields = ("ids", "attention_mask") + (("completion_mask",) if kind != "rm" else ())
        batch = {f"{side}_{name}": ids for side in ("chosen", "rejected") for name in fields}
    if reference and config.precompute_ref:
        batch.update(dict.fromkeys(("ref_chosen_logps", "ref_rejected_logps"),
                                   ((config.batch_size,), jnp.float32)))
    head = 0 if kind == "rm" else length
    forward = forward_flops(model_config, rows, length, head_positions=head)
    flops = 3 * forward + (forward if in_state else 0.0)
    return AbstractStep(compile_step(fn, mesh=mesh, state_shardings=layout),
                        _abstract(abstract, layout(abstract)), (_inputs(batch, mesh),), flops,
                        1, (rows, head, model_config.vocab_size),
                        {"rows": rows, "length": length})


def _rlhf_flops(config: TransformerConfig, rl: Any, rows: int, prompt: int, new: int) -> float:
    """Model FLOPs of one RLHF iteration: prefill and decode, the scoring passes (policy,
    reference, value, reward) and ``ppo_epochs`` training passes (policy, value)."""
    total = prompt + new
    sample = (forward_flops(config, rows, prompt, head_positions=1)
              + (new - 1) * forward_flops(config, rows, 1, context=total - 1))
    policy = forward_flops(config, rows, total, head_positions=new)
    scalar = forward_flops(config, rows, total, head_positions=0)  # reward or value model
    critic = scalar if rl.uses_critic and not rl.shared_value_head else 0.0
    score = policy + (policy if rl.uses_reference else 0.0) + scalar + critic
    update = rl.ppo_epochs * 3 * (policy + critic)
    return sample + score + update


def _rlhf_step(config: PlanConfig, model_config: TransformerConfig, mesh: Mesh,
               length: int) -> AbstractStep:
    """``ppo``'s one-jit iteration, as ``jaxalign ppo`` builds it (reward model and value model
    of the policy's shape)."""
    rl = dataclasses.replace(config.rlhf, eos_id=None, pad_id=0)
    new = rl.max_new_tokens
    prompt = config.max_prompt_length or length - new
    if prompt < 1:
        raise ValueError(f"max_length={length} leaves no prompt before {new} new tokens")
    policy = (CausalLMWithValueHead if rl.shared_value_head else CausalLM)(model_config)
    value = ValueModel(model_config) if rl.uses_critic and not rl.shared_value_head else None
    reward = RewardModel(model_config)
    optimizer = steps.make_optimizer(**config.optimizer_options())
    value_optimizer = optimizer if value is not None else None
    rows = config.batch_size * rl.samples_per_prompt
    _check_split(mesh, batch_size=config.batch_size,
                 minibatch=rows // max(rl.num_minibatches, 1))
    step = make_rlhf_step(policy, value, reward, rl, policy_optimizer=optimizer,
                          value_optimizer=value_optimizer, mesh=mesh)

    def init(key: jax.Array) -> Any:
        return init_rlhf_state(rl, init_params(policy, key), optimizer,
                               reward_params=init_params(reward, key),
                               value_optimizer=value_optimizer)

    abstract = jax.eval_shape(init, jax.random.key(0))
    models = rlhf_state_models(policy=policy, value=value, reward=reward)
    state = _abstract(abstract, shd.state_shardings(abstract, mesh, models))
    prompts = _inputs(dict.fromkeys(("prompt_ids", "prompt_mask"),
                                    ((config.batch_size, prompt), jnp.int32)), mesh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=shd.replicated(mesh))
    return AbstractStep(step, state, (prompts, key),
                        _rlhf_flops(model_config, rl, rows, prompt, new), max(new - 1, 1),
                        (rows, new, model_config.vocab_size),
                        {"rows": rows, "prompt_length": prompt, "max_new_tokens": new})


def abstract_step(config: PlanConfig, model_config: TransformerConfig,
                  mesh: Mesh) -> AbstractStep:
    """The step ``config.step`` for ``model_config`` on ``mesh`` (raises ``ValueError`` for a
    batch the mesh does not split)."""
    length = config.max_length or model_config.max_len
    if config.step == "ppo":
        return _rlhf_step(config, model_config, mesh, length)
    return _train_step(config.step, config, model_config, mesh, length)


_FIELD_NAMES = {"params": "params", "opt_state": "optimizer_state",
                "policy_params": "params", "policy_opt_state": "optimizer_state",
                "ref_params": "reference_params", "value_params": "value_params",
                "value_opt_state": "value_optimizer_state", "reward_params": "reward_params"}


def _shard_bytes(leaf: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of ``leaf`` (its sharding splits every device equally)."""
    return math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize


def parameter_total(state: Any) -> int:
    """Parameters of the trained model in an abstract state (``params`` or ``policy_params``)."""
    params = state.params if hasattr(state, "params") else state.policy_params
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def state_field_bytes(state: Any) -> dict[str, int]:
    """Bytes per device of each part of an abstract state: ``params``, ``optimizer_state``,
    ``reference_params`` (and an RLHF state's ``value_params``, ``value_optimizer_state``,
    ``reward_params``), the rest as ``other`` (step counter, PRNG key, KL controller)."""
    result: dict[str, int] = {}
    for field in dataclasses.fields(state):
        name = _FIELD_NAMES.get(field.name, "other")
        size = sum(map(_shard_bytes, jax.tree.leaves(getattr(state, field.name))))
        if size or name != "other":
            result[name] = result.get(name, 0) + size
    return result
