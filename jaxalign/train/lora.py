"""Training LoRA adapters: the optimiser sees only the trainable leaves.

:func:`lora_optimizer` wraps any optax optimiser (the whole jaxalign chain: clipping, AdamW,
accumulation, non-finite skipping, float32 master weights) in ``optax.multi_transform``, so it
runs on the adapters (and value/score heads) alone and holds no state for the frozen base
weights, whose update is ``optax.set_to_zero()``. The base weights' gradients are stopped in
the forward pass (:func:`jaxalign.models.lora_layer.freeze`), so no weight gradient is computed
for them either.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxalign.models.lora import trainable_mask

__all__ = ["lora_optimizer", "trainable_opt_state"]

_TRAINABLE, _FROZEN = "trainable", "frozen"


def _labels(params: Any) -> Any:
    return jax.tree.map(lambda t: _TRAINABLE if t else _FROZEN, trainable_mask(params))


def lora_optimizer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` on the trainable leaves (:func:`jaxalign.models.lora.trainable_mask`), zero
    updates and no state for the rest."""
    return optax.multi_transform({_TRAINABLE: inner, _FROZEN: optax.set_to_zero()}, _labels)


def trainable_opt_state(opt_state: Any) -> Any:
    """The inner optimiser's state inside a :func:`lora_optimizer` state (else as given)."""
    if isinstance(opt_state, optax.MultiTransformState):
        inner = opt_state.inner_states[_TRAINABLE]
        return getattr(inner, "inner_state", inner)
    return opt_state
