"""Rotary position embeddings (Su et al. 2021, arXiv:2104.09864) and the scalings Hugging Face
defines for the Llama family.

The layout is Llama's / Hugging Face's "rotate_half": the first and second halves of the
rotated dims are the real and imaginary parts, so HF checkpoints load without permuting q/k.
With ``rotary_dim < head_dim`` (``partial_rotary_factor``) only the first ``rotary_dim`` dims
of each head are rotated and the rest pass through (Phi-3 / Phi-4-mini, GPT-NeoX style).

Frequencies ``inv_freq [R/2]`` (``R`` = rotated dims) for ``config.rope_type``:

* ``default``: ``θ^(−2i/R)``;
* ``linear`` (position interpolation, Chen et al. 2023, arXiv:2306.15595): ``default / factor``;
* ``dynamic`` (NTK-aware scaling): ``θ' = θ·(factor·n/L − (factor − 1))^(R/(R−2))`` with
  ``n = max(longest position + 1, L)`` of the call and ``L`` = ``rope_original_max_len``, as
  transformers' ``dynamic_rope_update`` recomputes it per forward;
* ``llama3`` (Llama 3.1): wavelengths above ``L/low_freq_factor`` are divided by ``factor``,
  below ``L/high_freq_factor`` kept, and smoothly interpolated in between.

Every computation mirrors ``transformers.modeling_rope_utils`` in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxalign.models.config import TransformerConfig

__all__ = ["apply_rotary", "inverse_frequencies", "rotary_tables"]


def _default_inv_freq(theta: float, dim: int) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _llama3_inv_freq(inv_freq: jax.Array, config: TransformerConfig) -> jax.Array:
    """Llama 3.1's band-wise scaling of ``inv_freq`` (``_compute_llama3_parameters``)."""
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_context = config.rope_original_max_len
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def inverse_frequencies(config: TransformerConfig, positions: jax.Array | None = None, *,
                        local: bool = False) -> jax.Array:
    """``inv_freq [R/2]`` float32 of the global layers, or of the sliding ones (``local``,
    Gemma 3's ``local_rope_theta``: default rotation). ``positions [B, T]`` are needed only by
    ``dynamic`` scaling, which depends on the call's longest position."""
    dim = config.resolved_rotary_dim
    if local and config.local_rope_theta is not None:
        return _default_inv_freq(config.local_rope_theta, dim)
    kind = config.rope_type
    if kind == "dynamic":
        original = config.rope_original_max_len
        seq_len = jnp.maximum(jnp.max(positions) + 1, original).astype(jnp.float32)
        factor = config.rope_factor
        base = config.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (
            dim / (dim - 2))
        exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        return 1.0 / (base ** exponents)
    inv_freq = _default_inv_freq(config.rope_theta, dim)
    if kind == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, config)
    return inv_freq


def rotary_tables(positions: jax.Array, config: TransformerConfig, *,
                  local: bool = False) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [B, T, R]`` float32 for ``positions [B, T]`` (``rotate_half`` layout)."""
    inv_freq = inverse_frequencies(config, positions, local=local)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, H, T, Dh]`` by the tables ``[B, T, R]``: ``x·cos + rotate_half(x)·sin``
    on the first ``R`` dims; the other ``Dh − R`` pass through unchanged."""
    rotary = cos.shape[-1]
    rotated, passed = (x, None) if rotary == x.shape[-1] else (x[..., :rotary], x[..., rotary:])
    half = rotary // 2
    swapped = jnp.concatenate([-rotated[..., half:], rotated[..., :half]], axis=-1)
    out = rotated * cos[:, None] + swapped * sin[:, None]
    return out if passed is None else jnp.concatenate([out, passed], axis=-1)
