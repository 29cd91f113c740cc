"""LoRA inside the dense layers: the adapters of one projection and the matmul that uses them.

A projection named in ``config.lora_targets`` (``q_proj`` for ``"q"``, ...) holds, next to its
``kernel [*in, *out]``, ``lora_a [*in, r]`` (PEFT's Kaiming-uniform init) and ``lora_b [r, *out]``
(zeros), both float32 whatever ``param_dtype`` is. :class:`LoraKernel` stands in for the kernel
the layer's caller multiplies with: ``x @ W + (alpha / r) · (dropout(x) @ A) @ B``, the two
paths never merged into one ``[d_in, d_out]`` matrix while training. Adapters carry the logical
axes of their base weight's input (``A``) and output (``B``) axes and an unsharded rank axis,
so the sharding rules place them next to their kernel.

A projection whose adapters are absent from the parameters runs as a plain one: the tree
without its ``lora_*`` leaves *is* the base model with the adapters switched off
(:func:`jaxalign.models.lora.base_params`), which is how DPO and PPO get their reference model
without a second copy of the weights.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models.config import LORA_TARGETS, TransformerConfig

__all__ = ["ADAPTER_NAMES", "PROJECTIONS", "TRAINABLE_HEADS", "LoraKernel", "adapt",
           "freeze", "input_ndim", "merged_kernel", "stored_once"]

#: ``--lora-targets`` name -> the projection module it adapts (``"q"`` -> ``"q_proj"``).
PROJECTIONS = {target: f"{target}_proj" for target in LORA_TARGETS}
ADAPTER_NAMES = ("lora_a", "lora_b")
#: Modules that still train under LoRA (PEFT's ``modules_to_save`` for value and reward heads).
TRAINABLE_HEADS = ("value_head", "score_head")


def input_ndim(projection: str) -> int:
    """Leading kernel axes that are the projection's input (``o_proj [H, Dh, D]``: 2)."""
    return 2 if projection == "o_proj" else 1


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float,
                  n_in: int) -> jax.Array:
    """``kernel + scale · A @ B`` in the kernel's dtype, the delta computed in float32.

    ``kernel [*L, *in, *out]``, ``a [*L, *in, r]``, ``b [*L, r, *out]`` with ``n_in`` input
    axes; ``L`` is the scanned layout's leading ``layers`` axis, or nothing."""
    lead = a.ndim - 1 - n_in
    fan_in, rank = math.prod(a.shape[lead:-1]), a.shape[-1]
    delta = jnp.einsum("...ir,...rj->...ij", a.reshape(*a.shape[:lead], fan_in, rank),
                       b.reshape(*b.shape[:lead], rank, -1).astype(jnp.float32))
    return (kernel.astype(jnp.float32) + scale * delta.reshape(kernel.shape)).astype(kernel.dtype)


def _letter(used: str) -> str:
    return next(c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in used)


class LoraKernel:
    """A kernel ``base [*in, *out]`` plus ``scale · A [*in, r] @ B [r, *out]``, unmerged.

    It answers what the layers ask of a kernel (``shape``, ``ndim``, ``dtype``, a 2-D
    ``reshape(fan_in, fan_out)``) and :meth:`einsum` does the two-path matmul; anything else
    (the fused q/k/v or gate/up concatenation of the KV-cache decoder) sees the merged kernel
    through ``__jax_array__``.
    """

    def __init__(self, base: jax.Array, a: jax.Array, b: jax.Array, scale: float,
                 dropout: float = 0.0, key: jax.Array | None = None):
        self.base, self.a, self.b, self.scale = base, a, b, scale
        self.dropout, self.key = dropout, key

    shape = property(lambda self: self.base.shape)
    ndim = property(lambda self: self.base.ndim)
    dtype = property(lambda self: self.base.dtype)

    def reshape(self, *shape: int) -> "LoraKernel":
        """The kernel as ``[fan_in, fan_out]`` (``shape`` must put the input axes first)."""
        shape = tuple(shape[0]) if len(shape) == 1 else shape
        fan_in = math.prod(self.a.shape[:-1])
        if len(shape) != 2 or shape[0] != fan_in:
            raise ValueError(f"a LoRA kernel {self.shape} reshapes to (fan_in={fan_in}, -1),"
                             f" not {shape}")
        rank = self.a.shape[-1]
        return LoraKernel(self.base.reshape(shape), self.a.reshape(fan_in, rank),
                          self.b.reshape(rank, -1), self.scale, self.dropout, self.key)

    def merged(self) -> jax.Array:
        """``base + scale · A @ B`` in the base's dtype (:func:`merged_kernel`)."""
        return merged_kernel(self.base, self.a, self.b, self.scale, self.a.ndim - 1)

    def __jax_array__(self) -> jax.Array:
        return self.merged()

    def einsum(self, subscripts: str, x: jax.Array, dtype: Any) -> jax.Array:
        """``einsum(subscripts, x, W)`` for a 2-D ``W`` (``"...i,ij->...j"`` forms), plus the
        adapters' path in float32; accumulated and returned in float32."""
        lhs, rest = subscripts.split(",")
        rhs, out = rest.split("->")
        if len(rhs) != 2 or self.ndim != 2:
            raise ValueError(f"LoRA needs a 2-D kernel in einsum, got {subscripts!r} with"
                             f" {self.shape}")
        contracted, produced = rhs
        rank = _letter(subscripts)
        mid = out.replace(produced, rank)
        base = jnp.einsum(subscripts, x.astype(dtype), self.base.astype(dtype),
                          preferred_element_type=jnp.float32)
        x32 = x.astype(jnp.float32)
        if self.dropout and self.key is not None:
            keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x32.shape)
            x32 = jnp.where(keep, x32 / (1.0 - self.dropout), 0.0)
        down = jnp.einsum(f"{lhs},{contracted}{rank}->{mid}", x32, self.a.astype(jnp.float32))
        up = jnp.einsum(f"{mid},{rank}{produced}->{out}", down, self.b.astype(jnp.float32))
        return stored_once(base + self.scale * up, self.b)


def stored_once(x: jax.Array, anchor: jax.Array) -> jax.Array:
    """``x`` bit for bit, as a value XLA computes and stores once.

    ``base + scale · up`` is a cheap add, so XLA:CPU fuses a copy of it into every consumer,
    the backward pass's among them, which then keeps both ``[N, d_out]`` addends alive from
    the forward pass instead of their sum: for the MLP's gate and up that was 8 MiB a layer
    more than full fine-tuning (96 MiB of the 110M ``bench_lora`` model's step). XLA does not
    duplicate a division into its consumers, and one by exactly 1.0 changes no bit; the 1.0 is
    computed from a parameter (``anchor``, never a constant XLA could fold away) and carries
    no gradient. (A non-finite ``anchor`` makes the result NaN, as it makes the adapter's.)
    """
    one = 1.0 + 0.0 * anchor.reshape(-1)[0].astype(jnp.float32)
    return x / jax.lax.stop_gradient(one)


def _adapted(module: nn.Module, config: TransformerConfig) -> bool:
    targets = {PROJECTIONS[t] for t in config.lora_targets}
    if not config.lora_rank or module.name not in targets:
        return False
    return module.is_initializing() or module.has_variable("params", "lora_a")


def adapt(module: nn.Module, kernel: jax.Array, axes: tuple[str, ...],
          config: TransformerConfig) -> jax.Array | LoraKernel:
    """``kernel`` itself, or a :class:`LoraKernel` when ``module`` (a projection) is a LoRA
    target and its adapters exist (created here at ``init``)."""
    if not _adapted(module, config):
        return kernel
    n_in, rank = input_ndim(module.name), config.lora_rank
    shape = kernel.shape
    # PEFT: kaiming_uniform(a=sqrt(5)) on lora_A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    init_a = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                              in_axis=tuple(range(n_in)), out_axis=-1)
    a = module.param("lora_a", nn.with_logical_partitioning(init_a, (*axes[:n_in], None)),
                     (*shape[:n_in], rank), jnp.float32)
    b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            (None, *axes[n_in:])),
                     (rank, *shape[n_in:]), jnp.float32)
    key = None
    if config.lora_dropout and module.has_rng("dropout"):
        key = module.make_rng("dropout")
    return LoraKernel(kernel, a, b, config.lora_scale, config.lora_dropout, key)


def freeze(module: nn.Module, value: jax.Array, config: TransformerConfig) -> jax.Array:
    """A base parameter of a LoRA model with its gradient stopped (no weight gradient is ever
    computed for it); heads in :data:`TRAINABLE_HEADS` and models without adapters train."""
    if not config.lora_rank or module.name in TRAINABLE_HEADS:
        return value
    return jax.lax.stop_gradient(value)
