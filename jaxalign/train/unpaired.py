"""The unpaired-preference step: KTO and BCO on ``{prompt, completion, label}`` examples.

A batch (``jaxalign.data``'s ``unpaired`` kind) holds each example's sequence and a KL
sequence, its prompt with the next example's completion. Per step, outside the
differentiated function: the reference log-probs of the completions, and the KL baseline
``z₀ = max(mean(log π − log π_ref), 0)`` over the mismatched KL sequences (KTO, as TRL computes
it, with no gradient), or BCO's running reward baseline ``δ``, carried in
``state.loss_state`` and updated with the batch's rewards before the loss uses it. The
settings are :class:`jaxalign.train.PreferenceConfig`'s ``beta``, ``desirable_weight`` and
``undesirable_weight``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxalign import losses as L
from jaxalign.train.completion import completion_sums
from jaxalign.train.preference import UNPAIRED_LOSSES, PreferenceConfig
from jaxalign.train.state import TrainState, make_loss_step, train_dropout_key

__all__ = ["completion_logps", "init_loss_state", "make_unpaired_step",
           "unpaired_loss"]


def completion_logps(model: Any, params: Any, batch: dict, prefix: str = "", *,
                     dropout_key: jax.Array | None = None) -> jax.Array:
    """``[B]`` completion log-prob sums of the ``{prefix}input_ids`` sequences (``dropout_key``:
    a training pass's LoRA dropout rng)."""
    return completion_sums(model, params, batch[f"{prefix}input_ids"],
                           batch[f"{prefix}attention_mask"], batch[f"{prefix}completion_mask"],
                           dropout_key=dropout_key)


def _loss_name(config: PreferenceConfig) -> str:
    if len(config.loss) != 1 or config.loss[0] not in UNPAIRED_LOSSES:
        raise ValueError(f"the unpaired step takes loss 'kto' or 'bco', got {config.loss!r}")
    return config.loss[0]


def init_loss_state(config: PreferenceConfig) -> Any:
    """The ``TrainState.loss_state`` a config needs: BCO's baseline, else ``None``."""
    return L.bco_baseline_init() if _loss_name(config) == "bco" else None


def unpaired_loss(model: Any, params: Any, batch: dict, config: PreferenceConfig,
                  loss_state: Any = None, *,
                  logps: jax.Array | None = None,
                  dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean KTO or BCO loss of a prepared batch (``ref_logps``, and ``kl_baseline`` for KTO),
    with TRL's metric names: ``rewards/chosen`` and ``rewards/rejected`` are the mean
    ``β·(log π − log π_ref)`` of the desirable and undesirable examples, ``rewards/margins``
    their difference, ``kl`` the baseline. ``logps``: the completions' log-prob sums under
    ``params`` when the caller has them already (one forward pass, not two); else computed
    with ``dropout_key`` (LoRA dropout; none: deterministic)."""
    name = _loss_name(config)
    if logps is None:
        logps = completion_logps(model, params, batch, dropout_key=dropout_key)
    ref = jax.lax.stop_gradient(jnp.asarray(batch["ref_logps"], jnp.float32))
    desirable = batch["desirable"] > 0
    if name == "kto":
        per_example = L.kto_loss(logps, ref, desirable, batch["kl_baseline"], beta=config.beta,
                                 desirable_weight=config.desirable_weight,
                                 undesirable_weight=config.undesirable_weight)
        metrics = {"kl": batch["kl_baseline"]}
    else:
        per_example = L.bco_loss(logps, ref, desirable, loss_state, beta=config.beta)
        metrics = {"bco/delta": loss_state.mean}
    rewards = config.beta * jax.lax.stop_gradient(logps - ref)
    count = lambda m: jnp.maximum(jnp.sum(m), 1)  # noqa: E731
    chosen = jnp.sum(jnp.where(desirable, rewards, 0)) / count(desirable)
    rejected = jnp.sum(jnp.where(desirable, 0, rewards)) / count(~desirable)
    metrics.update({"rewards/chosen": chosen, "rewards/rejected": rejected,
                    "rewards/margins": chosen - rejected, "logps/mean": jnp.mean(logps)})
    return jnp.mean(per_example), metrics


def make_unpaired_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    config: PreferenceConfig | None = None,
    *,
    axis_name: str | None = None,
    jit: bool = True,
    mesh: Any = None,
    **settings: Any,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)`` for KTO (``loss="kto"``) or BCO
    (``loss="bco"``; create the state with ``loss_state=init_loss_state(config)``).

    The reference is ``state.ref_params`` (or ``ref_logps``/``ref_kl_logps`` in the batch).
    """
    config = dataclasses.replace(config or PreferenceConfig(loss=("kto",)), **settings)
    name = _loss_name(config)

    def prepare(state, batch):
        if "ref_logps" not in batch:
            batch = {**batch, "ref_logps": completion_logps(model, state.ref_params, batch)}
        if name == "kto":
            if "ref_kl_logps" not in batch:
                batch = {**batch,
                         "ref_kl_logps": completion_logps(model, state.ref_params, batch, "kl_")}
            policy_kl = completion_logps(model, state.params, batch, "kl_")
            batch = {**batch, "kl_baseline": L.kto_kl_baseline(policy_kl, batch["ref_kl_logps"])}
        return state, batch

    def loss_fn(params, state, batch):
        if name == "kto":
            return unpaired_loss(model, params, batch, config, state.loss_state,
                                 dropout_key=train_dropout_key(state))
        # BCO: the baseline sees this batch's (gradient-free) rewards before the loss does,
        # from the same forward pass the loss differentiates
        logps = completion_logps(model, params, batch, dropout_key=train_dropout_key(state))
        rewards = config.beta * jax.lax.stop_gradient(logps - batch["ref_logps"])
        baseline = L.bco_baseline_update(state.loss_state, rewards)
        loss, metrics = unpaired_loss(model, params, batch, config, baseline, logps=logps)
        return loss, (metrics, baseline)

    return make_loss_step(loss_fn, optimizer, axis_name=axis_name, jit=jit, prepare=prepare,
                          mesh=mesh, model=model, carries_loss_state=name == "bco")
