"""Grouped-query self-attention with the switches of today's model families: q/k/v (and output)
biases, per-head q/k RMSNorm (Qwen3, Gemma 3), partial rotary embeddings, Gemma's
``query_pre_attn_scalar`` and logit soft-capping, and a mask that is causal, padding-aware and,
in sliding layers, windowed (the caller builds it; see ``Transformer``).

Shapes: ``x [B, T, D]``; heads lead (``[B, H, T, Dh]``) so the key/value cache and the
attention dots share one layout; K/V heads are shared by ``G = H / Hkv`` query heads without
copies.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign.models.blockwise import blockwise_attention
from jaxalign.models.config import TransformerConfig
from jaxalign.models.layers import Projection, RMSNorm, einsum_f32
from jaxalign.models.rope import apply_rotary

__all__ = ["AUTO_BLOCKWISE_MIN_LENGTH", "MASKED_SCORE", "Attention", "cudnn_applies",
           "resolve_attention", "soft_cap"]

MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap · tanh(x / cap)`` (Gemma 2's logit soft-capping); ``x`` itself when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


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


def _project(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
    """``x [B, T, D] @ kernel [D, H, Dh] -> [B, H, T, Dh]`` as one 2-D matmul."""
    batch, length, d = x.shape
    _, heads, head_dim = kernel.shape
    out = einsum_f32("nd,df->nf", x.reshape(batch * length, d), kernel.reshape(d, -1), dtype)
    return out.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)


#: ``attention_impl="auto"`` runs blockwise attention on rows of at least this many slots
#: (CPU/TPU; measured on CPU, see README "Attention"), dense below.
AUTO_BLOCKWISE_MIN_LENGTH = 256


def cudnn_applies(config: TransformerConfig) -> bool:
    """Whether cuDNN's fused attention (``jax.nn.dot_product_attention(implementation=
    "cudnn")``) computes this model's attention: no logit soft-capping, a 16-bit compute
    dtype, and a head width it supports (a multiple of 8, at most 128)."""
    head_dim = config.resolved_head_dim
    return (config.attn_logit_softcap is None and head_dim % 8 == 0 and head_dim <= 128
            and config.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def resolve_attention(config: TransformerConfig, length: int, *, cached: bool,
                      backend: str | None = None) -> str:
    """Which attention a call of ``length`` query slots runs: ``"dense"`` (scores
    ``[B, H, T, S]``), ``"blockwise"`` (:mod:`jaxalign.models.blockwise`) or ``"cudnn"``
    (fused, GPU only). Decoding with a KV cache always runs dense (its queries are few);
    ``config.attention_impl="auto"`` picks cuDNN on a GPU backend (``backend``, default
    ``jax.default_backend()``) where :func:`cudnn_applies`, else blockwise from
    :data:`AUTO_BLOCKWISE_MIN_LENGTH` slots up."""
    impl = config.attention_impl
    if cached or impl == "dense":
        return "dense"
    if impl == "blockwise":
        return "blockwise"
    backend = jax.default_backend() if backend is None else backend
    if backend in ("gpu", "cuda", "rocm") and cudnn_applies(config):
        return "cudnn"
    return "blockwise" if length >= AUTO_BLOCKWISE_MIN_LENGTH else "dense"


def _cudnn_attention(q, k, v, allowed, scale):
    """cuDNN's fused attention on ``q [B, H, T, Dh]``, ``k, v [B, Hkv, T, Dh]`` with the
    boolean mask ``allowed [B, T, S]``: ``[B, H, T, Dh]`` float32. A query that may attend to
    nothing (padding) attends to itself, so no row of the kernel's softmax is empty."""
    empty = ~jnp.any(allowed, axis=-1, keepdims=True)
    allowed = allowed | (empty & jnp.eye(allowed.shape[1], allowed.shape[2], dtype=bool))
    out = jax.nn.dot_product_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        mask=allowed[:, None], scale=scale, implementation="cudnn")
    return out.transpose(0, 2, 1, 3).astype(jnp.float32)


def _dense_forward(q, k, v, allowed, scale, cap):
    """``(out, max, sum)``: the output and the softmax's row maximum and normaliser."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None, None], soft_cap(scores * scale, cap), MASKED_SCORE)
    top = jnp.max(scores, axis=-1)
    e = jnp.exp(scores - top[..., None])
    total = jnp.sum(e, axis=-1)
    probs = (e / total[..., None]).astype(v.dtype)
    return einsum_f32("bkgts,bksd->bkgtd", probs, v, v.dtype), top, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dense_attention(q, k, v, allowed, scale, cap):
    """``q [B, Hkv, G, T, Dh]`` over ``k, v [B, Hkv, S, Dh]`` through ``[B, Hkv, G, T, S]``
    float32 scores masked by ``allowed [B, T, S]``: ``[B, Hkv, G, T, Dh]`` float32.

    The gradient recomputes the probabilities from q, k and the saved row maximum and
    normaliser (as blockwise attention does per block), so the backward pass keeps no
    ``[T, S]`` tensor from the forward one: plain autodiff held three per layer (the
    exponentials and the probabilities in two layouts), 9 MiB a layer at 4 x 12 heads x 128².
    It computes them transposed (``[S, T]``), which XLA cannot merge with the forward's.
    """
    return _dense_forward(q, k, v, allowed, scale, cap)[0]


def _dense_fwd(q, k, v, allowed, scale, cap):
    out, top, total = _dense_forward(q, k, v, allowed, scale, cap)
    return out, (q, k, v, allowed, out, top, total)


def _dense_bwd(scale, cap, residuals, d_out):
    q, k, v, allowed, out, top, total = residuals
    keep = jnp.swapaxes(allowed, 1, 2)[:, None, None]  # [B, 1, 1, S, T]
    raw = jnp.einsum("bksd,bkgtd->bkgst", k, q, preferred_element_type=jnp.float32) * scale
    capped = soft_cap(raw, cap)
    scores = jnp.where(keep, capped, MASKED_SCORE)
    p = jnp.exp(scores - top[..., None, :]) / total[..., None, :]
    dv = jnp.einsum("bkgst,bkgtd->bksd", p.astype(v.dtype), d_out.astype(v.dtype),
                    preferred_element_type=jnp.float32)
    dp = jnp.einsum("bksd,bkgtd->bkgst", v, d_out.astype(v.dtype),
                    preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)[..., None, :]
    ds = jnp.where(keep, p * (dp - delta), 0.0)
    if cap is not None:
        ds = ds * (1.0 - jnp.square(capped / cap))
    ds = ds * scale
    dq = jnp.einsum("bkgst,bksd->bkgtd", ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgst,bkgtd->bksd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_dense_attention.defvjp(_dense_fwd, _dense_bwd)


class Attention(nn.Module):
    """Grouped-query self-attention; K/V heads are shared by ``G`` query heads without copies."""

    config: TransformerConfig

    def _qkv(self, x: jax.Array, fused: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``q [B, H, T, Dh]``, ``k, v [B, Hkv, T, Dh]`` float32, biased and (q/k) normed."""
        cfg = self.config
        heads, kv_heads, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        bias_ndim = 2 if cfg.qkv_bias else 0
        projections = [
            Projection(cfg, (cfg.d_model, n, head_dim), ("embed", axis, "head_dim"), bias_ndim,
                       name=name)()
            for name, n, axis in (("q_proj", heads, "heads"), ("k_proj", kv_heads, "kv_heads"),
                                  ("v_proj", kv_heads, "kv_heads"))
        ]
        if fused:
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
        if cfg.qk_norm:
            q = RMSNorm(cfg, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg, "head_dim", name="k_norm")(k)
        return q, k, v

    @nn.compact
    def __call__(self, x, cos, sin, allowed, layer_cache, index, layout=None, window=None):
        """Args: ``x [B, T, D]``, ``cos, sin [B, T, R]``, ``allowed [B, T, S]`` bool,
        ``layer_cache`` ``(keys, values)`` each ``[B, Hkv, S, Dh]`` or ``None`` (then ``S = T``),
        ``index`` ``[]`` slot of the first new token; ``layout`` (a ``SequenceLayout``) and
        ``window`` replace ``allowed`` (then ``None``) under blockwise attention.
        Returns ``(out [B, T, D], layer_cache)``."""
        cfg = self.config
        heads, kv_heads, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        batch, length, d = x.shape
        q, k, v = self._qkv(x, fused=layer_cache is not None)
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
        scale = (head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar)
        kind = resolve_attention(cfg, length, cached=layer_cache is not None)
        if kind == "cudnn":
            out = _cudnn_attention(q.astype(k.dtype), k, v, allowed, scale**-0.5)
        else:
            q = q.reshape(batch, kv_heads, heads // kv_heads, length, head_dim).astype(k.dtype)
            if kind == "blockwise":
                out = blockwise_attention(q, k, v, layout, scale=scale**-0.5,
                                          soft_cap=cfg.attn_logit_softcap, window=window,
                                          block_size=cfg.attention_block)
            else:
                out = _dense_attention(q, k, v, allowed, scale**-0.5, cfg.attn_logit_softcap)
        out = out.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)
        w_o, b_o = Projection(cfg, (heads, head_dim, d), ("heads", "head_dim", "embed"),
                              1 if cfg.o_bias else 0, name="o_proj")()
        out = einsum_f32("nf,fd->nd", out.reshape(batch * length, heads * head_dim),
                         w_o.reshape(heads * head_dim, d), cfg.dtype)
        if b_o is not None:
            out = out + b_o.astype(jnp.float32)[None, :]
        return out.reshape(batch, length, d), layer_cache
