"""The optimiser every compiled step uses: AdamW on a warmup-cosine schedule, clipped,
accumulated, skipping non-finite updates and, for bfloat16 params, on float32 master weights.

:class:`OptimizerConfig` is the one definition of the options that shape it (the command line
generates its flags from these fields); the peak learning rate, the number of updates and the
accumulation are each run's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxalign.settings import setting
from jaxalign.train.lora import trainable_opt_state

__all__ = ["MasterWeightsState", "OptimizerConfig", "float32_master_weights",
           "learning_rate_schedule", "make_optimizer", "nonfinite_count", "optimizer_schedule"]

# apply_if_finite gives up skipping after this many consecutive non-finite updates; we never
# want a poisoned update applied, so the limit is effectively infinite.
_NEVER_APPLY_NONFINITE = 2**30


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Schedule and regularisation of :func:`make_optimizer` (its keyword defaults)."""

    warmup_steps: int = setting(0, "linear warmup updates before the cosine decay")
    end_lr_ratio: float = setting(0.0, "final learning rate as a fraction of the peak --lr")
    weight_decay: float = setting(0.0, "decoupled (AdamW) weight decay")
    max_grad_norm: float | None = setting(1.0, "global-norm gradient clip (none or <= 0: no"
                                          " clip)")

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be non-negative, got {self.warmup_steps}")


class MasterWeightsState(NamedTuple):
    """State of :func:`float32_master_weights`: float32 copies of the params and the inner
    optimiser's state (built on those copies, so its moments are float32 too)."""

    master: Any  # a float32 copy of every floating-point param (others as they are)
    inner: optax.OptState


def _to_float32(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(
        x.dtype, jnp.floating) else x, tree)


def float32_master_weights(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Mixed-precision training of low-precision (e.g. bfloat16) params: ``inner`` runs on
    float32 master copies of the params, with float32 gradients and moments, and the params
    become the master weights rounded to their own dtype after every update.

    The update it returns is ``round(master') − params`` in float32, so
    ``optax.apply_updates(params, updates)`` (which adds in float32 and casts back) lands
    exactly on the rounded master weights; small updates accumulate in the master copy instead
    of being lost to bfloat16 rounding. optax has no such wrapper; this is the scheme of
    MaxText's float32 weights with a bfloat16 compute copy and of PyTorch AMP / TRL's
    ``bf16=True`` (float32 master params and optimizer state), here with the low-precision
    copy being the stored params. Costs 4 bytes per parameter for the master copy.

    When every parameter is already float32 (or not a float) the wrapper is ``inner`` itself:
    same state, same numbers.
    """

    def init(params: Any) -> Any:
        if all(leaf.dtype == jnp.float32 or not jnp.issubdtype(leaf.dtype, jnp.floating)
               for leaf in jax.tree.leaves(params)):
            return inner.init(params)
        master = _to_float32(params)
        return MasterWeightsState(master, inner.init(master))

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if not isinstance(state, MasterWeightsState):
            return inner.update(grads, state, params)
        if params is None:
            raise ValueError("float32_master_weights needs the params in update()")
        updates, inner_state = inner.update(_to_float32(grads), state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        deltas = jax.tree.map(
            lambda m, p: m.astype(p.dtype).astype(jnp.float32) - p.astype(jnp.float32)
            if jnp.issubdtype(p.dtype, jnp.floating) else jnp.zeros_like(p), master, params)
        return deltas, MasterWeightsState(master, inner_state)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    learning_rate: float = 1e-4,
    *,
    total_steps: int = 1000,
    warmup_steps: int = OptimizerConfig.warmup_steps,
    end_lr_ratio: float = OptimizerConfig.end_lr_ratio,
    weight_decay: float = OptimizerConfig.weight_decay,
    max_grad_norm: float | None = OptimizerConfig.max_grad_norm,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = True,
    master_weights: bool = False,
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
      max_grad_norm: global-norm clip; ``None`` or ``<= 0`` for none.
      b1, b2, eps: Adam moments.
      grad_accum_steps: micro-batches per update.
      skip_nonfinite: wrap in ``optax.apply_if_finite``.
      master_weights: keep float32 master weights, gradients, accumulators and moments for
        low-precision params (:func:`float32_master_weights`, outermost: the whole chain above
        runs in float32 on the master copy; a skipped step leaves it untouched).
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
    if max_grad_norm is not None and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    optimizer = optax.chain(*parts)
    if grad_accum_steps > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=grad_accum_steps)
    if skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=_NEVER_APPLY_NONFINITE)
    if master_weights:
        optimizer = float32_master_weights(optimizer)
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
    """The schedule ``make_optimizer(**options)`` follows, from the same keyword arguments
    (options that do not shape the schedule are ignored)."""
    del other_optimizer_options
    return learning_rate_schedule(learning_rate, total_steps=total_steps,
                                  warmup_steps=warmup_steps, end_lr_ratio=end_lr_ratio)


def nonfinite_count(opt_state: optax.OptState) -> jax.Array:
    """Total updates skipped for non-finite gradients (0 if the optimiser does not skip)."""
    opt_state = trainable_opt_state(opt_state)  # inside a train.lora.lora_optimizer's
    if isinstance(opt_state, MasterWeightsState):
        opt_state = opt_state.inner
    total = getattr(opt_state, "total_notfinite", None)
    return jnp.zeros((), jnp.int32) if total is None else jnp.asarray(total, jnp.int32)
