"""Masked reductions shared by every loss and estimator.

Padding never contributes: every reduction here replaces masked entries with zero
(``jnp.where(mask, x, 0)``) before it sums, rather than multiplying by the mask, so NaN or inf
in padded positions cannot leak into a result or its gradient (``0 * nan`` is ``nan``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def _as_mask(mask: ArrayLike, like: jax.Array) -> jax.Array:
    mask = jnp.asarray(mask)
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {mask.shape} but values have shape {like.shape}")
    return mask.astype(bool) if mask.dtype != bool else mask


def masked_sum(values: ArrayLike, mask: ArrayLike, axis=None) -> jax.Array:
    """Sum of ``values`` where ``mask`` is true; masked entries (even NaN) contribute 0."""
    values = jnp.asarray(values)
    mask = _as_mask(mask, values)
    return jnp.sum(jnp.where(mask, values, 0), axis=axis)


def masked_mean(values: ArrayLike, mask: ArrayLike, axis=None) -> jax.Array:
    """Mean of ``values`` over positions where ``mask`` is true.

    ``sum(mask * values) / max(sum(mask), 1)``: an all-masked row gives 0, not NaN.

    Args:
        values: ``[...]`` values.
        mask: same shape as ``values``; nonzero means valid.
        axis: axis or axes to reduce; ``None`` reduces everything.

    Returns:
        The masked mean, float32 for low-precision inputs, with ``axis`` reduced.
    """
    values = jnp.asarray(values)
    values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
    mask = _as_mask(mask, values)
    total = jnp.sum(jnp.where(mask, values, 0), axis=axis)
    count = jnp.sum(mask, axis=axis).astype(values.dtype)
    return total / jnp.maximum(count, 1)


def masked_var(values: ArrayLike, mask: ArrayLike, *, unbiased: bool = True) -> jax.Array:
    """Variance over all positions where ``mask`` is true (Bessel-corrected by default)."""
    values = jnp.asarray(values)
    values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
    mask = _as_mask(mask, values)
    mean = masked_mean(values, mask)
    centred = jnp.where(mask, values - mean, 0)
    count = jnp.sum(mask).astype(values.dtype)
    denom = jnp.maximum(count - 1, 1) if unbiased else jnp.maximum(count, 1)
    return jnp.sum(centred**2) / denom


def masked_whiten(
        values: ArrayLike, mask: ArrayLike, *, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """Normalise ``values`` to zero mean and unit variance over the valid positions.

    ``(x − mean) / sqrt(var + eps)`` with mean and (unbiased) variance taken over positions where
    ``mask`` is true, as TRL and OpenRLHF whiten advantages. With ``shift_mean=False`` the mean
    is added back (TRL's option for whitening rewards without moving their level). Masked
    positions are returned as 0.

    Args:
        values: ``[B, T]`` (any shape) values, e.g. advantages.
        mask: same shape; nonzero marks valid positions.
        shift_mean: whether the result is centred.
        eps: added to the variance before the square root.

    Returns:
        Array of the same shape, float32 (or float64 for float64 input).
    """
    values = jnp.asarray(values)
    values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
    mask = _as_mask(mask, values)
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0)
