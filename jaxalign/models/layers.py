"""The building blocks of the decoder: logically named parameters, float32-accumulating
matmuls, RMSNorm, projection holders and the gated MLP.

Every parameter is created through :func:`logical_param`, so it carries logical axis names
(:data:`jaxalign.models.LOGICAL_AXIS_NAMES`) that a sharding rules table maps to mesh axes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models.config import TransformerConfig
from jaxalign.models.lora_layer import LoraKernel, adapt, freeze

__all__ = ["MLP", "Projection", "RMSNorm", "activation", "einsum_f32", "gated", "logical_param"]


def logical_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
                  config: TransformerConfig, init: Any = None) -> jax.Array:
    """``module.param(name)`` of ``shape`` in ``config.param_dtype``, its axes named by the
    logical ``axes``; initialised ``normal(config.initializer_range)`` unless ``init`` is given."""
    if init is None:
        init = nn.initializers.normal(config.initializer_range)
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, config.param_dtype)
    return freeze(module, value, config)  # LoRA: base weights frozen


def einsum_f32(subscripts: str, x: jax.Array, y: jax.Array, dtype: Any) -> jax.Array:
    """``einsum`` of ``x`` and ``y`` cast to ``dtype``, accumulated and returned in float32."""
    if isinstance(y, LoraKernel):
        return y.einsum(subscripts, x, dtype)
    return jnp.einsum(subscripts, x.astype(dtype), y.astype(dtype),
                      preferred_element_type=jnp.float32)


def activation(name: str, x: jax.Array) -> jax.Array:
    """The gate activation ``name`` (:data:`jaxalign.models.config.ACTIVATIONS`): SiLU, GELU
    with the tanh approximation (``gelu_pytorch_tanh``), or exact (erf) GELU."""
    if name == "silu":
        return nn.silu(x)
    return jax.nn.gelu(x, approximate=name == "gelu_tanh")


def gated(name: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """``activation(name, gate) · up``, rematerialised: the backward pass recomputes the
    activation from ``gate`` instead of keeping its intermediates (SiLU's ``x·σ(x)`` left two
    ``[B, T, d_ff]`` values per layer alive next to ``gate`` and ``up``); one elementwise pass
    more, no matmul."""
    return jax.checkpoint(lambda g, u: activation(name, g) * u)(gate, up)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · (offset + scale)`` in float32, over the last axis.

    ``offset`` is ``config.norm_scale_offset`` (Gemma's ``1 + w``; its scale starts at 0).
    ``axis_name`` is the logical name of the normed axis (``"head_dim"`` for q/k norms).
    """

    config: TransformerConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        offset = self.config.norm_scale_offset
        init = nn.initializers.zeros_init() if offset else nn.initializers.ones_init()
        scale = logical_param(self, "scale", (x.shape[-1],), (self.axis_name,), self.config,
                              init)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps
        )
        weight = scale.astype(jnp.float32)
        if offset:
            weight = offset + weight
        return normed * weight.reshape((1,) * (x.ndim - 1) + scale.shape)


class Projection(nn.Module):
    """Holds one linear map's ``kernel`` (and optional ``bias``); the caller does the math.

    Keeping the weights separate from the matmul lets single-token decoding run one fused
    matmul for q/k/v (and one for gate/up) while the parameters stay per projection.
    """

    config: TransformerConfig
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    bias_ndim: int = 0  # trailing kernel dims that carry a bias; 0 means no bias

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        kernel = logical_param(self, "kernel", self.shape, self.axes, cfg)
        bias = None
        if self.bias_ndim:
            bias = logical_param(self, "bias", self.shape[-self.bias_ndim:],
                                 self.axes[-self.bias_ndim:], cfg, nn.initializers.zeros_init())
        kernel = adapt(self, kernel.astype(cfg.dtype), self.axes, cfg)
        return kernel, None if bias is None else bias.astype(cfg.dtype)


def _plus_bias(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``x [..., F] + bias [F]`` in float32 (no bias: ``x``)."""
    if bias is None:
        return x
    return x + bias.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + bias.shape)


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) · up(x))``; SwiGLU by default, GeGLU for Gemma
    (``config.mlp_activation``), with biases when ``config.mlp_bias``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, fused: bool = False) -> jax.Array:
        """``x [B, T, D] -> [B, T, D]``; ``fused`` runs gate and up as one matmul (inference)."""
        cfg = self.config
        bias = 1 if cfg.mlp_bias else 0
        w_gate, b_gate = Projection(cfg, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), bias,
                                    name="gate_proj")()
        w_up, b_up = Projection(cfg, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), bias,
                                name="up_proj")()
        w_down, b_down = Projection(cfg, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), bias,
                                    name="down_proj")()
        if fused:
            kernel = jnp.concatenate([w_gate, w_up], axis=1)
            gate, up = jnp.split(einsum_f32("btd,df->btf", x, kernel, cfg.dtype), 2, axis=-1)
        else:
            gate = einsum_f32("btd,df->btf", x, w_gate, cfg.dtype)
            up = einsum_f32("btd,df->btf", x, w_up, cfg.dtype)
        gate, up = _plus_bias(gate, b_gate), _plus_bias(up, b_up)
        hidden = gated(cfg.mlp_activation, gate, up)
        return _plus_bias(einsum_f32("btf,fd->btd", hidden, w_down, cfg.dtype), b_down)
