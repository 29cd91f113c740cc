"""A Llama-style decoder trunk in ``flax.linen`` (RMSNorm, rotary embeddings, grouped-query
attention, a gated MLP) with the switches of today's model families, and an explicit key/value
cache.

Conventions:

* ``tokens [B, T]`` int32 and ``attention_mask [B, T]`` (1 = real token, 0 = padding; default
  all ones). Position ids come from the mask, ``clip(cumsum(mask) − 1, 0)``, so left-padded,
  right-padded and unpadded batches give the same result on every real token.
* Rotary embeddings use the Llama / Hugging Face "rotate_half" convention (the two halves of
  each head are the real and imaginary parts), so HF checkpoints load without permutation
  (:mod:`jaxalign.models.rope`, with Hugging Face's rope scalings).
* Sliding-window layers (``config.sliding_window``, ``config.layer_types``) mask keys ``W`` or
  more slots back, in training and in the KV-cache sampler alike; as in Hugging Face, the
  window counts slots, which equal positions for every real token of a left- or right-padded
  row.
* Parameters carry logical axis names (:data:`LOGICAL_AXIS_NAMES`) through
  ``nn.with_logical_partitioning``; ``model.init`` returns them boxed, ``nn.meta.unbox`` (or
  :func:`jaxalign.models.init_params`) strips the boxes, ``nn.get_partition_spec`` reads them.
* Packed rows (several sequences per row, or ``[prompt | chosen | rejected]``) pass a
  :class:`SequenceLayout` (``layout=``): positions, segment and branch ids give the rotary
  positions and the attention rule (:mod:`jaxalign.models.layout`); sliding windows then count
  position differences.
* ``config.attention_impl`` picks dense attention (a ``[B, H, T, S]`` score tensor), the
  blockwise online-softmax kernel (:mod:`jaxalign.models.blockwise`, no ``T × T`` tensor) or,
  on GPU, cuDNN's fused attention (:func:`jaxalign.models.attention.resolve_attention`).
* Decoding uses an explicit :class:`KVCache` pytree passed in and returned (no mutable flax
  collections): ``logits, cache = model.apply(variables, tokens, mask, cache=cache)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxalign.models.attention import Attention, resolve_attention
from jaxalign.models.config import REMAT_POLICIES, TransformerConfig
from jaxalign.models.layers import MLP, RMSNorm, logical_param
from jaxalign.models.layout import SequenceLayout, allowed_mask, check_layout, layout_from_mask
from jaxalign.models.rope import rotary_tables

__all__ = ["LOGICAL_AXIS_NAMES", "KVCache", "SequenceLayout", "Transformer", "init_cache",
           "logical_param", "positions_from_mask", "stack_layer_params",
           "unstack_layer_params"]

#: Every logical axis name a parameter can carry; a sharding rules table maps these to mesh axes.
LOGICAL_AXIS_NAMES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers")


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



class LayerInputs(NamedTuple):
    """What every block reads besides its input: the rotary tables ``[B, T, R]`` and attention
    mask ``[B, T, S]`` of the global layers, and of the sliding layers (``local_*``; ``None``
    when every layer is global). Under blockwise attention the masks are ``None`` and
    ``layout`` (the rule's per-slot inputs, window positions included) replaces them."""

    cos: jax.Array
    sin: jax.Array
    allowed: jax.Array | None
    local_cos: jax.Array | None = None
    local_sin: jax.Array | None = None
    local_allowed: jax.Array | None = None
    layout: SequenceLayout | None = None

    def pick(self, sliding: Any) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """``(cos, sin, allowed)`` of a layer: ``sliding`` a Python bool (unrolled layers) or
        a traced ``[]`` bool (scanned layers, selected with ``where``)."""
        if self.local_cos is None or sliding is False:
            return self.cos, self.sin, self.allowed
        if sliding is True:
            return self.local_cos, self.local_sin, self.local_allowed
        pairs = [(self.local_cos, self.cos), (self.local_sin, self.sin)]
        picked = [jnp.where(sliding, local, full) for local, full in pairs]
        allowed = (None if self.allowed is None
                   else jnp.where(sliding, self.local_allowed, self.allowed))
        return picked[0], picked[1], allowed


def _layer_window(config: TransformerConfig, sliding: Any) -> Any:
    """The sliding window of a layer for the blockwise rule: ``None`` (global), ``W``, or for a
    traced flag ``W`` / a window no row reaches."""
    if config.sliding_window is None or sliding is False:
        return None
    if sliding is True:
        return config.sliding_window
    return jnp.where(sliding, config.sliding_window, jnp.iinfo(jnp.int32).max)


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; with
    ``config.post_norms`` (Gemma 2/3) each branch's output is normed again before the add.
    ``sliding``: whether this layer uses the sliding window (``None``: a traced flag is passed
    per call, as in scanned layers)."""

    config: TransformerConfig
    sliding: bool | None = False

    @nn.compact
    def __call__(self, x, layer_cache, inputs: LayerInputs, index, sliding_flag=None):
        cfg = self.config
        sliding = self.sliding if self.sliding is not None else sliding_flag
        cos, sin, allowed = inputs.pick(sliding)
        window = _layer_window(cfg, sliding) if inputs.layout is not None else None
        attn_out, layer_cache = Attention(cfg, name="attn")(
            RMSNorm(cfg, name="attn_norm")(x), cos, sin, allowed, layer_cache, index,
            layout=inputs.layout, window=window,
        )
        if cfg.post_norms:
            attn_out = RMSNorm(cfg, name="post_attn_norm")(attn_out)
        x = x + attn_out
        normed = RMSNorm(cfg, name="mlp_norm")(x)
        mlp_out = MLP(cfg, name="mlp")(normed, fused=layer_cache is not None)
        if cfg.post_norms:
            mlp_out = RMSNorm(cfg, name="post_mlp_norm")(mlp_out)
        return x + mlp_out, layer_cache


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
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, 0),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = block(cfg, sliding=None, name="layers")
        else:
            self.layers = [block(cfg, sliding=sliding, name=f"layers_{i}")
                           for i, sliding in enumerate(cfg.sliding_layers)]
        self.final_norm = RMSNorm(cfg, name="final_norm")

    def _layer_inputs(self, positions, allowed, window_rule) -> LayerInputs:
        """Rotary tables and masks. ``window_rule(W)`` is the sliding layers' mask (``None``
        when ``allowed`` is: blockwise attention, which evaluates the rule per block)."""
        cfg = self.config
        cos, sin = rotary_tables(positions, cfg)
        if not any(cfg.sliding_layers):
            return LayerInputs(cos, sin, allowed)
        local_cos, local_sin = (rotary_tables(positions, cfg, local=True)
                                if cfg.local_rope_theta is not None else (cos, sin))
        local_allowed = None if allowed is None else window_rule(cfg.sliding_window)
        return LayerInputs(cos, sin, allowed, local_cos, local_sin, local_allowed)

    def _masks(self, mask, cache, layout, length):
        """``(index, key_mask, LayerInputs)`` of a call (see ``__call__``)."""
        cfg = self.config
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        kind = resolve_attention(cfg, length, cached=cache is not None)
        if layout is not None:
            rule = layout
            positions, key_mask = layout.positions, (layout.segment_ids > 0).astype(jnp.int32)
            window_rule = functools.partial(allowed_mask, layout)
        elif cache is None:
            rule = layout_from_mask(mask)
            positions, key_mask = positions_from_mask(mask), mask
            window_rule = functools.partial(_padded_mask, mask, index, length)
        else:
            positions = positions_from_mask(mask, jnp.sum(cache.mask, axis=-1, keepdims=True))
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
            rule, window_rule = None, functools.partial(_padded_mask, key_mask, index, length)
        if kind == "blockwise":
            inputs = self._layer_inputs(positions, None, window_rule)
            return index, key_mask, inputs._replace(layout=rule)
        return index, key_mask, self._layer_inputs(positions, window_rule(None), window_rule)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(jnp.float32)
        if self.config.embed_scale:  # Gemma: sqrt(D), rounded to the weights' dtype as in HF
            scale = jnp.asarray(math.sqrt(self.config.d_model), self.config.param_dtype)
            x = x * scale.astype(jnp.float32)
        return x

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        layout: SequenceLayout | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Hidden states ``[B, T, D]`` float32 and the updated cache (or ``None``).

        ``layout`` (packed rows; exclusive with ``cache``) gives positions and the attention
        rule; ``attention_mask`` is then ignored (the rule already leaves padding out)."""
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if layout is not None:
            if cache is not None:
                raise ValueError("layout and cache are exclusive: decoding runs on padded rows")
            layout = check_layout(layout, tokens.shape)
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        mask = jnp.asarray(attention_mask).astype(jnp.int32)
        length = tokens.shape[1]
        index, key_mask, inputs = self._masks(mask, cache, layout, length)

        x = self._embed(tokens)
        if cache is None:
            layer_caches = [None] * cfg.n_layers
        else:
            layer_caches = list(zip(cache.keys, cache.values))
        if cfg.scan_layers:
            stacked = None
            if cache is not None:
                stacked = (jnp.stack(cache.keys), jnp.stack(cache.values))
            flags = jnp.asarray(cfg.sliding_layers)
            x, stacked = self.layers(x, stacked, inputs, index, flags)
            if cache is not None:
                layer_caches = list(zip(stacked[0], stacked[1]))
        else:
            for i, block in enumerate(self.layers):
                x, layer_caches[i] = block(x, layer_caches[i], inputs, index)
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


def _padded_mask(key_mask: jax.Array, index: jax.Array, length: int,
                 window: int | None) -> jax.Array:
    """``[B, T, S]`` bool of ordinary padded rows: causal over slots (the ``T = length`` new
    tokens start at slot ``index``), real keys only, and with a ``window`` keys fewer than
    ``window`` slots back (as Hugging Face counts a sliding window)."""
    query_slot = index + jnp.arange(length, dtype=jnp.int32)
    key_slot = jnp.arange(key_mask.shape[1], dtype=jnp.int32)
    causal = key_slot[None, :] <= query_slot[:, None]
    if window is not None:
        causal &= (query_slot[:, None] - key_slot[None, :]) < window
    return causal[None] & (key_mask[:, None, :] > 0)


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
