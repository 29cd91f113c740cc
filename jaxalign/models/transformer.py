"""A Llama-style decoder trunk in ``flax.linen``: RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU, and an explicit key/value cache.

Conventions:

* ``tokens [B, T]`` int32 and ``attention_mask [B, T]`` (1 = real token, 0 = padding; default
  all ones). Position ids come from the mask, ``clip(cumsum(mask) − 1, 0)``, so left-padded,
  right-padded and unpadded batches give the same result on every real token.
* Rotary embeddings use the Llama / Hugging Face "rotate_half" convention (the two halves of
  each head are the real and imaginary parts), so HF checkpoints load without permutation.
* Parameters carry logical axis names (:data:`LOGICAL_AXIS_NAMES`) through
  ``nn.with_logical_partitioning``; ``model.init`` returns them boxed, ``nn.meta.unbox`` (or
  :func:`jaxalign.models.init_params`) strips the boxes, ``nn.get_partition_spec`` reads them.
* Decoding uses an explicit :class:`KVCache` pytree passed in and returned (no mutable flax
  collections): ``logits, cache = model.apply(variables, tokens, mask, cache=cache)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.models.config import REMAT_POLICIES, TransformerConfig

#: Every logical axis name a parameter can carry; a sharding rules table maps these to mesh axes.
LOGICAL_AXIS_NAMES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers")

_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


class KVCache(NamedTuple):
    """Keys and values of every layer for ``S`` slots, written left to right.

    Attributes:
      keys: tuple of ``L`` arrays ``[B, Hkv, S, Dh]`` (one per layer), in the cache dtype
        (:func:`init_cache`'s ``dtype``; the compute dtype by default).
      values: tuple of ``L`` arrays ``[B, Hkv, S, Dh]``.
      mask: ``[B, S]`` int32, 1 where the slot holds a real (non-padding) token.
      index: ``[]`` int32, the next slot to write (the same for every row).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array


def init_cache(
    config: TransformerConfig, batch_size: int, length: int, dtype: Any = None
) -> KVCache:
    """An empty :class:`KVCache` with ``length`` slots for ``batch_size`` rows.

    ``dtype`` (default: the compute dtype) is the dtype keys and values are stored in;
    attention over the cache runs in it.
    """
    shape = (batch_size, config.n_kv_heads, length, config.resolved_head_dim)
    dtype = config.dtype if dtype is None else dtype
    layers = range(config.n_layers)
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in layers),
        values=tuple(jnp.zeros(shape, dtype) for _ in layers),
        mask=jnp.zeros((batch_size, length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def positions_from_mask(attention_mask: ArrayLike, offset: ArrayLike = 0) -> jax.Array:
    """Position ids ``clip(offset + cumsum(mask) − 1, 0)``.

    Args:
      attention_mask: ``[B, T]`` 1 on real tokens.
      offset: ``[B, 1]`` (or scalar) number of real tokens already in the cache.

    Returns:
      ``[B, T]`` int32 positions; a padding token gets the position of the real token
      before it (or 0), which is harmless because no real token attends to it.
    """
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1 + offset, 0)


def rotary_tables(
    positions: jax.Array, head_dim: int, theta: float, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [B, T, Dh]`` for ``positions [B, T]`` (HF ``rotate_half`` layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, H, T, Dh]`` by the tables ``[B, T, Dh]``: ``x·cos + rotate_half(x)·sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def logical_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
                  config: TransformerConfig, init: Any = None) -> jax.Array:
    """``module.param(name)`` of ``shape`` in ``config.param_dtype``, its axes named by the
    logical ``axes``; initialised ``normal(config.initializer_range)`` unless ``init`` is given."""
    if init is None:
        init = nn.initializers.normal(config.initializer_range)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, config.param_dtype)


def _einsum(subscripts: str, x: jax.Array, y: jax.Array, dtype: Any) -> jax.Array:
    """``einsum`` of ``x`` and ``y`` cast to ``dtype``, accumulated and returned in float32."""
    return jnp.einsum(subscripts, x.astype(dtype), y.astype(dtype),
                      preferred_element_type=jnp.float32)


def _write_cache(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``cache[:, :, index:index + T] = new`` in place.

    Sub-32-bit floats are written as same-width integers: XLA:CPU computes bfloat16 ops in
    float32, and would otherwise convert the whole cache to float32 and back for every write.
    """
    new = new.astype(cache.dtype)
    if jnp.issubdtype(cache.dtype, jnp.floating) and cache.dtype.itemsize < 4:
        bits = jnp.dtype(f"uint{8 * cache.dtype.itemsize}")
        updated = jax.lax.dynamic_update_slice(
            jax.lax.bitcast_convert_type(cache, bits),
            jax.lax.bitcast_convert_type(new, bits),
            (0, 0, index, 0),
        )
        return jax.lax.bitcast_convert_type(updated, cache.dtype)
    return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))


def _project(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
    """``x [B, T, D] @ kernel [D, H, Dh] -> [B, H, T, Dh]`` as one 2-D matmul."""
    batch, length, d = x.shape
    _, heads, head_dim = kernel.shape
    out = _einsum("nd,df->nf", x.reshape(batch * length, d), kernel.reshape(d, -1), dtype)
    return out.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · scale`` in float32."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = logical_param(self, "scale", (x.shape[-1],), ("embed",), self.config,
                              nn.initializers.ones_init())
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(
            jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps
        )
        return normed * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + scale.shape)


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
        return kernel.astype(cfg.dtype), None if bias is None else bias.astype(cfg.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention; K/V heads are shared by ``G`` query heads without copies."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, cos, sin, allowed, layer_cache, index):
        """Args: ``x [B, T, D]``, ``cos, sin [B, T, Dh]``, ``allowed [B, T, S]`` bool,
        ``layer_cache`` ``(keys, values)`` each ``[B, Hkv, S, Dh]`` or ``None`` (then ``S = T``),
        ``index`` ``[]`` slot of the first new token. Returns ``(out [B, T, D], layer_cache)``."""
        cfg = self.config
        heads, kv_heads, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        batch, length = x.shape[0], x.shape[1]
        bias_ndim = 2 if cfg.qkv_bias else 0
        d = cfg.d_model
        projections = [
            Projection(cfg, (d, n, head_dim), ("embed", axis, "head_dim"), bias_ndim, name=name)()
            for name, n, axis in (("q_proj", heads, "heads"), ("k_proj", kv_heads, "kv_heads"),
                                  ("v_proj", kv_heads, "kv_heads"))
        ]
        if layer_cache is not None:
            # Inference: one matmul for q, k and v (XLA hoists the weight concatenation out of
            # a decode loop). Training keeps three, so no sharded weights get concatenated.
            kernel = jnp.concatenate([w for w, _ in projections], axis=1)
            qkv = _project(x, kernel, cfg.dtype)
            if cfg.qkv_bias:
                qkv = qkv + jnp.concatenate([b for _, b in projections])[None, :, None, :]
            q, k, v = jnp.split(qkv, [heads, heads + kv_heads], axis=1)
        else:
            q, k, v = (
                _project(x, w, cfg.dtype) + (0 if b is None else b[None, :, None, :])
                for w, b in projections
            )
        # Heads lead ([B, H, T, Dh]) so the cache and the attention dots share one layout.
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            k = _write_cache(cache_k, k, index)
            v = _write_cache(cache_v, v, index)
            layer_cache = (k, v)
        else:
            k, v = k.astype(cfg.dtype), v.astype(cfg.dtype)
        # Attention runs in the dtype of the keys and values (the cache's, when decoding).
        q = q.reshape(batch, kv_heads, heads // kv_heads, length, head_dim).astype(k.dtype)
        scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(allowed[:, None, None], scores * head_dim**-0.5, _MASKED_SCORE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = _einsum("bkgts,bksd->bkgtd", probs, v, v.dtype)
        out = out.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)
        w_o, _ = Projection(cfg, (heads, head_dim, d), ("heads", "head_dim", "embed"),
                            name="o_proj")()
        out = _einsum("nf,fd->nd", out.reshape(batch * length, heads * head_dim),
                      w_o.reshape(heads * head_dim, d), cfg.dtype)
        return out.reshape(batch, length, d), layer_cache


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) · up(x))``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, fused: bool = False) -> jax.Array:
        """``x [B, T, D] -> [B, T, D]``; ``fused`` runs gate and up as one matmul (inference)."""
        cfg = self.config
        w_gate, _ = Projection(cfg, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), name="gate_proj")()
        w_up, _ = Projection(cfg, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), name="up_proj")()
        w_down, _ = Projection(cfg, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), name="down_proj")()
        if fused:
            kernel = jnp.concatenate([w_gate, w_up], axis=1)
            gate, up = jnp.split(_einsum("btd,df->btf", x, kernel, cfg.dtype), 2, axis=-1)
        else:
            gate = _einsum("btd,df->btf", x, w_gate, cfg.dtype)
            up = _einsum("btd,df->btf", x, w_up, cfg.dtype)
        return _einsum("btf,fd->btd", nn.silu(gate) * up, w_down, cfg.dtype)


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, allowed, index):
        attn_out, layer_cache = Attention(self.config, name="attn")(
            RMSNorm(self.config, name="attn_norm")(x), cos, sin, allowed, layer_cache, index
        )
        x = x + attn_out
        normed = RMSNorm(self.config, name="mlp_norm")(x)
        x = x + MLP(self.config, name="mlp")(normed, fused=layer_cache is not None)
        return x, layer_cache


class Transformer(nn.Module):
    """Embedding, ``n_layers`` blocks and the final norm: ``tokens [B, T] -> hidden [B, T, D]``.

    Parameters: ``embedding [V, D]``, ``layers`` (stacked on a leading ``L`` axis when
    ``config.scan_layers``; otherwise ``layers_0 ... layers_{L-1}``), ``final_norm.scale``.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.embedding = logical_param(self, "embedding", (cfg.vocab_size, cfg.d_model),
                                       ("vocab", "embed"), cfg)
        block = Block
        if cfg.remat:
            block = nn.remat(block, prevent_cse=not cfg.scan_layers,
                             policy=REMAT_POLICIES[cfg.remat_policy])
        if cfg.scan_layers:
            block = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = block(cfg, name="layers")
        else:
            self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.final_norm = RMSNorm(cfg, name="final_norm")

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Hidden states ``[B, T, D]`` float32 and the updated cache (or ``None``)."""
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        mask = jnp.asarray(attention_mask).astype(jnp.int32)
        length = tokens.shape[1]
        if cache is None:
            index = jnp.zeros((), jnp.int32)
            key_mask = mask
            positions = positions_from_mask(mask)
        else:
            index = cache.index
            positions = positions_from_mask(mask, jnp.sum(cache.mask, axis=-1, keepdims=True))
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
        query_slot = index + jnp.arange(length, dtype=jnp.int32)
        key_slot = jnp.arange(key_mask.shape[1], dtype=jnp.int32)
        allowed = (key_slot[None, :] <= query_slot[:, None])[None] & (key_mask[:, None, :] > 0)
        cos, sin = rotary_tables(positions, cfg.resolved_head_dim, cfg.rope_theta, jnp.float32)

        x = jnp.take(self.embedding, tokens, axis=0).astype(jnp.float32)
        if cache is None:
            layer_caches = [None] * cfg.n_layers
        else:
            layer_caches = list(zip(cache.keys, cache.values))
        if cfg.scan_layers:
            stacked = None
            if cache is not None:
                stacked = (jnp.stack(cache.keys), jnp.stack(cache.values))
            x, stacked = self.layers(x, stacked, cos, sin, allowed, index)
            if cache is not None:
                layer_caches = list(zip(stacked[0], stacked[1]))
        else:
            for i, block in enumerate(self.layers):
                x, layer_caches[i] = block(x, layer_caches[i], cos, sin, allowed, index)
        x = self.final_norm(x)
        if cache is None:
            return x, None
        keys, values = (tuple(kv) for kv in zip(*layer_caches))
        return x, KVCache(keys, values, key_mask, index + length)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied output projection ``hidden [B, T, D] @ embeddingᵀ -> [B, T, V]`` float32."""
        dtype = self.config.dtype
        return jnp.einsum("btd,vd->btv", hidden.astype(dtype), self.embedding.astype(dtype),
                          preferred_element_type=jnp.float32)


def unstack_layer_params(params: Any, n_layers: int) -> Any:
    """Convert params from the scanned layout (``trunk.layers`` stacked on a leading ``L``
    axis) to the unrolled one (``trunk.layers_0 ... layers_{L-1}``). Idempotent."""
    trunk = dict(params["trunk"])
    if "layers" not in trunk:
        return params
    stacked = trunk.pop("layers")
    for i in range(n_layers):
        trunk[f"layers_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return {**params, "trunk": trunk}


def stack_layer_params(params: Any, n_layers: int) -> Any:
    """Inverse of :func:`unstack_layer_params` (unrolled -> scanned layout). Idempotent."""
    trunk = dict(params["trunk"])
    if "layers_0" not in trunk:
        return params
    per_layer = [trunk.pop(f"layers_{i}") for i in range(n_layers)]
    trunk["layers"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
    return {**params, "trunk": trunk}
