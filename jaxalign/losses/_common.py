"""Helpers shared by the preference and policy losses: dtype promotion and shape checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def _f32(x: ArrayLike) -> jax.Array:
    """Cast to at least float32 (bf16/f16 → f32; f64 stays f64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _same_shape(**arrays: jax.Array) -> None:
    """Raise a ``ValueError`` naming every argument and its shape unless all shapes agree."""
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"arguments must have the same shape; got {listed}")
