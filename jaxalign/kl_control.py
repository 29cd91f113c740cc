"""KL-coefficient controllers for RLHF, as ``(init, update)`` pairs of pure functions.

A controller is a frozen (hashable) dataclass of hyperparameters; its state is a
:class:`KLControllerState` pytree that the compiled RLHF step carries. ``update`` never mutates:
``state = controller.update(state, kl, n_steps)``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


class KLControllerState(NamedTuple):
    coef: jax.Array  # [] float32, the current KL coefficient β


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards a target.

    ``e = clip(KL / target − 1, −0.2, 0.2)``, ``β ← β·(1 + e·n_steps / horizon)``, where
    ``n_steps`` is the number of samples the KL was measured on (the rollout batch size).

    References:
      Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593,
      section 2.2.
    """

    init_coef: float = 0.2
    target: float = 6.0
    horizon: float = 10_000.0

    def __post_init__(self):
        if self.target <= 0 or self.horizon <= 0 or self.init_coef < 0:
            raise ValueError(
                "AdaptiveKLController needs target > 0, horizon > 0 and init_coef >= 0; got "
                f"target={self.target}, horizon={self.horizon}, init_coef={self.init_coef}"
            )

    def init(self) -> KLControllerState:
        return KLControllerState(coef=jnp.asarray(self.init_coef, jnp.float32))

    def update(
        self, state: KLControllerState, kl: ArrayLike, n_steps: ArrayLike
    ) -> KLControllerState:
        error = jnp.clip(jnp.asarray(kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
        factor = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / self.horizon
        return KLControllerState(coef=state.coef * factor)


@dataclasses.dataclass(frozen=True)
class FixedKLController:
    """A constant KL coefficient with the same interface as :class:`AdaptiveKLController`."""

    coef: float = 0.05

    def init(self) -> KLControllerState:
        return KLControllerState(coef=jnp.asarray(self.coef, jnp.float32))

    def update(
        self, state: KLControllerState, kl: ArrayLike, n_steps: ArrayLike
    ) -> KLControllerState:
        del kl, n_steps
        return state
