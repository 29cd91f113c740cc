"""Training state and the optimiser every compiled step uses.

A :class:`TrainState` is a pytree (params, optimiser state, step, PRNG key, and optionally frozen
reference params), so it can be jitted over, donated, sharded and checkpointed as one object.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

# apply_if_finite gives up skipping after this many consecutive non-finite updates; we never
# want a poisoned update applied, so the limit is effectively infinite.
_NEVER_APPLY_NONFINITE = 2**30


@flax.struct.dataclass
class TrainState:
    """Everything one training step reads and writes.

    Attributes:
      params: trainable parameters (a pytree).
      opt_state: optax state for ``params``.
      step: ``[]`` int32, number of optimiser steps taken (micro-steps under accumulation).
      key: a typed PRNG key, split inside steps that need randomness.
      ref_params: frozen reference parameters (DPO/IPO with in-step reference log-probs,
        RLHF), or ``None``; passed through unchanged.
    """

    params: Any
    opt_state: optax.OptState
    step: jax.Array
    key: jax.Array
    ref_params: Any = None


def create_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    *,
    ref_params: Any = None,
) -> TrainState:
    """A fresh :class:`TrainState` at step 0 with ``optimizer.init(params)``.

    Steps donate the state, so the arrays in ``params`` are consumed by the first step: pass a
    copy (``jax.tree.map(jnp.copy, params)``) if you still need them. ``ref_params`` is always
    copied, so it may be the same tree as ``params``.
    """
    if ref_params is not None:
        ref_params = jax.tree.map(jnp.copy, ref_params)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=key,
        ref_params=ref_params,
    )


def make_optimizer(
    learning_rate: float = 1e-4,
    *,
    total_steps: int = 1000,
    warmup_steps: int = 0,
    end_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, global-norm clipping, accumulation, and
    non-finite updates skipped.

    The chain, outermost first: ``apply_if_finite`` (a step whose gradients contain NaN or inf
    leaves params and moments untouched and is counted in ``opt_state.total_notfinite``) →
    ``MultiSteps`` (``grad_accum_steps`` micro-batches averaged per update) → clip by global
    norm → AdamW on the warmup-cosine schedule (decaying to ``end_lr_ratio × learning_rate``).

    Args:
      learning_rate: peak learning rate.
      total_steps: optimiser updates in the schedule (after accumulation).
      warmup_steps: linear warmup updates from 0 to the peak.
      end_lr_ratio: final learning rate as a fraction of the peak.
      weight_decay: decoupled weight decay.
      b1, b2, eps: Adam moments.
      max_grad_norm: global-norm clip, or ``None``.
      grad_accum_steps: micro-batches per update.
      skip_nonfinite: wrap in ``optax.apply_if_finite``.
    """
    if total_steps < 1 or warmup_steps < 0 or grad_accum_steps < 1:
        raise ValueError(
            f"need total_steps >= 1, warmup_steps >= 0, grad_accum_steps >= 1; got "
            f"total_steps={total_steps}, warmup_steps={warmup_steps}, "
            f"grad_accum_steps={grad_accum_steps}"
        )
    schedule = learning_rate_schedule(
        learning_rate, total_steps=total_steps, warmup_steps=warmup_steps,
        end_lr_ratio=end_lr_ratio,
    )
    parts = []
    if max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    optimizer = optax.chain(*parts)
    if grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=grad_accum_steps)
    if skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=_NEVER_APPLY_NONFINITE)
    return optimizer


def learning_rate_schedule(
    learning_rate: float, *, total_steps: int, warmup_steps: int = 0, end_lr_ratio: float = 0.0
) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` then cosine decay to ``end_lr_ratio × learning_rate``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * end_lr_ratio,
    )


def optimizer_schedule(
    learning_rate: float, *, total_steps: int, warmup_steps: int = 0, end_lr_ratio: float = 0.0,
    **other_optimizer_options: Any,
) -> optax.Schedule:
    """The schedule ``make_optimizer(**options)`` follows, from the same keyword arguments (for
    logging the learning rate; options that do not shape the schedule are ignored)."""
    del other_optimizer_options
    return learning_rate_schedule(learning_rate, total_steps=total_steps,
                                  warmup_steps=warmup_steps, end_lr_ratio=end_lr_ratio)


def nonfinite_count(opt_state: optax.OptState) -> jax.Array:
    """Total updates skipped for non-finite gradients (0 if the optimiser does not skip)."""
    total = getattr(opt_state, "total_notfinite", None)
    return jnp.zeros((), jnp.int32) if total is None else jnp.asarray(total, jnp.int32)


def apply_gradients(
    state: TrainState,
    grads: Any,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update; returns the new state and ``grad_norm`` / ``skipped`` metrics.

    With ``axis_name`` (inside ``pmap``/``shard_map``) the gradients are first averaged over
    that axis with ``lax.pmean``, so every replica applies the same update.
    """
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "grad_norm": optax.tree.norm(grads),
        "skipped_updates": nonfinite_count(opt_state),
    }
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def compile_step(
    step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]],
    *,
    in_shardings: Any = None,
    out_shardings: Any = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``jax.jit`` with the state donated (its buffers are reused for the new state)."""
    kwargs = {}
    if in_shardings is not None:
        kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return jax.jit(step_fn, donate_argnums=(0,), **kwargs)


def make_loss_step(
    loss_fn: Callable[[Any, TrainState, dict], tuple[jax.Array, dict]],
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    jit: bool = True,
    prepare_batch: Callable[[TrainState, dict], dict] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The step every factory builds: differentiate ``loss_fn(params, state, batch) ->
    (loss, metrics)``, apply the optimiser, and return ``(state, {"loss", **metrics,
    "grad_norm", "skipped_updates"})``. ``prepare_batch(state, batch)`` runs first, outside the
    differentiated function (e.g. reference log-probs, which do not depend on ``params``).

    Jitted with the state donated, unless ``axis_name`` is given (gradients and metrics are then
    ``pmean``-ed over it and the caller wraps the step in ``pmap``/``shard_map``) or ``jit`` is
    false.
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if prepare_batch is not None:
            batch = prepare_batch(state, batch)
        (loss, metrics), grads = jax.value_and_grad(
            lambda params: loss_fn(params, state, batch), has_aux=True)(state.params)
        state, opt_metrics = apply_gradients(state, grads, optimizer, axis_name=axis_name)
        if axis_name is not None:
            loss, metrics = jax.lax.pmean((loss, metrics), axis_name)
        return state, {"loss": loss, **metrics, **opt_metrics}

    if axis_name is not None or not jit:
        return step
    return compile_step(step)
