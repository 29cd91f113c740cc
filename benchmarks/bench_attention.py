"""Attention forward + backward on CPU: dense vs blockwise, by row length and block size.

What ``TransformerConfig.attention_impl="auto"`` and ``attention_block`` are chosen from. For
each row length ``T`` the batch holds ``TOKENS`` slots (``B = TOKENS / T`` rows of packed
segments ~ T/2 long), the ``bench`` model's heads (8 query heads over 4 K/V heads of 32):

* ``dense``: the ``[B, Hkv, G, T, T]`` float32 scores masked by the layout rule;
* ``blockwise bN``: :func:`jaxalign.models.blockwise.blockwise_attention` (custom_vjp backward
  recomputing each block), block size ``N``;
* ``scan+checkpoint``: the same online softmax as a ``lax.scan`` over every key block with a
  ``jax.checkpoint``-ed body, differentiated by JAX (the alternative to a custom_vjp).

Prints a table (ms per forward+backward, min of ``--repeats``, and XLA's temp bytes) and one
JSON line. Run: ``PYTHONPATH=. python benchmarks/bench_attention.py``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.attention import _dense_attention
from jaxalign.models.blockwise import blockwise_attention
from jaxalign.models.layout import SequenceLayout, allowed_mask, block_allowed

TOKENS, KV_HEADS, GROUPS, HEAD_DIM = 4096, 4, 2, 32


def _layout(batch: int, length: int, rng, packed: bool) -> SequenceLayout:
    """Rows packed with segments of 1/4 .. 3/4 of the row, the rest padding; or (not
    ``packed``) one right-padded sequence of 1/2 .. 1 of the row per row."""
    segments = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for b in range(batch):
        if not packed:
            n = int(rng.integers(length // 2, length + 1))
            segments[b, :n], positions[b, :n] = 1, np.arange(n)
            continue
        slot, segment = 0, 0
        while slot < length * 0.9:
            n = min(int(rng.integers(length // 4, 3 * length // 4 + 1)), length - slot)
            segment += 1
            segments[b, slot:slot + n], positions[b, slot:slot + n] = segment, np.arange(n)
            slot += n
    return SequenceLayout(jnp.asarray(positions), jnp.asarray(segments),
                          jnp.zeros((batch, length), jnp.int32))


def _scan_checkpoint(q, k, v, layout, *, scale, block):
    """Online softmax over all key blocks as a checkpointed scan (autodiff backward)."""
    batch, kv_heads, groups, length, head_dim = q.shape
    nb = length // block
    keys = k.reshape(batch, kv_heads, nb, block, head_dim).transpose(2, 0, 1, 3, 4)
    values = v.reshape(batch, kv_heads, nb, block, head_dim).transpose(2, 0, 1, 3, 4)
    meta = jax.tree.map(lambda a: a.reshape(batch, nb, block).swapaxes(0, 1), layout)
    slots = jnp.arange(length, dtype=jnp.int32)

    @jax.checkpoint
    def step(carry, xs):
        m, l, acc = carry
        k_j, v_j, meta_j, j = xs
        allowed = block_allowed(layout, meta_j, slots, j * block + jnp.arange(block), None)
        s = jnp.einsum("bkgqd,bksd->bkgqs", q, k_j) * scale
        s = jnp.where(allowed[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        c = jnp.exp(m - m_safe)
        return (m_new, l * c + p.sum(-1), acc * c[..., None]
                + jnp.einsum("bkgqs,bksd->bkgqd", p, v_j)), None

    shape = q.shape[:-1]
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(q.shape))
    (m, l, acc), _ = jax.lax.scan(step, init, (keys, values, meta, jnp.arange(nb)))
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def _variants(blocks):
    out = {"dense": lambda q, k, v, lay: _dense_attention(q, k, v, allowed_mask(lay), 0.2, None)}
    for block in blocks:
        out[f"blockwise b{block}"] = (lambda b: lambda q, k, v, lay: blockwise_attention(
            q, k, v, lay, scale=0.2, block_size=b))(block)
    out["scan+checkpoint b128"] = lambda q, k, v, lay: _scan_checkpoint(q, k, v, lay, scale=0.2,
                                                                        block=128)
    return out


def _measure(fn, args, repeats):
    grad = jax.jit(jax.grad(lambda q, k, v, lay: jnp.sum(fn(q, k, v, lay)), argnums=(0, 1, 2)))
    compiled = grad.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), temp / 2**20


def _trunk(lengths, blocks, repeats, packed: bool) -> dict:
    """The ``bench`` trunk's forward + backward (``TOKENS`` slots a step) per implementation."""
    import dataclasses

    from jaxalign.models import get_config
    from jaxalign.models.transformer import Transformer

    rng, results = np.random.default_rng(1), {}
    for length in lengths:
        batch = max(1, TOKENS // length)
        tokens = jnp.asarray(rng.integers(1, 4096, (batch, length)), jnp.int32)
        layout = _layout(batch, length, rng, packed)
        variants = [("dense", {"attention_impl": "dense"})] + [
            (f"blockwise b{b}", {"attention_impl": "blockwise", "attention_block": b})
            for b in blocks if b <= length]
        for name, fields in variants:
            model = Transformer(dataclasses.replace(get_config("bench"), **fields))
            params = jax.jit(model.init)(jax.random.key(0), tokens[:1])

            def loss(p, t, lay, model=model):
                return jnp.sum(jnp.square(model.apply(p, t, layout=lay)[0]))

            grad = jax.jit(jax.grad(loss)).lower(params, tokens, layout).compile()
            jax.block_until_ready(grad(params, tokens, layout))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(grad(params, tokens, layout))
                times.append(time.perf_counter() - start)
            temp = grad.memory_analysis().temp_size_in_bytes / 2**20
            results[f"trunk T{length} {name}"] = {"ms": round(1e3 * min(times), 1),
                                                  "temp_mib": round(temp, 1)}
            print(f"{length:>6} trunk {name:<16} {1e3 * min(times):>11.1f} {temp:>9.1f}",
                  flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,256,512,1024,2048")
    parser.add_argument("--blocks", default="64,128,256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", choices=("packed", "padded"), default="packed")
    parser.add_argument("--trunk", action="store_true",
                        help="time the bench model's trunk (forward + backward) instead")
    args = parser.parse_args()
    if args.trunk:
        lengths = [int(t) for t in args.lengths.split(",")]
        blocks = [int(b) for b in args.blocks.split(",")]
        results = _trunk(lengths, blocks, args.repeats, args.rows == "packed")
        print(json.dumps({"bench": "attention_trunk", "rows": args.rows, "tokens": TOKENS,
                          "results": results}))
        return
    rng = np.random.default_rng(0)
    blocks = [int(b) for b in args.blocks.split(",")]
    results = {}
    print(f"{'T':>6} {'variant':<22} {'ms fwd+bwd':>11} {'temp MiB':>9}")
    for length in (int(t) for t in args.lengths.split(",")):
        batch = max(1, TOKENS // length)
        q = jnp.asarray(rng.normal(size=(batch, KV_HEADS, GROUPS, length, HEAD_DIM)), jnp.float32)
        k, v = (jnp.asarray(rng.normal(size=(batch, KV_HEADS, length, HEAD_DIM)), jnp.float32)
                for _ in range(2))
        layout = _layout(batch, length, rng, args.rows == "packed")
        for name, fn in _variants([b for b in blocks if b <= length]).items():
            if name.startswith("scan") and length % 128:
                continue
            ms, temp = _measure(fn, (q, k, v, layout), args.repeats)
            results[f"T{length} {name}"] = {"ms": round(ms, 2), "temp_mib": round(temp, 1)}
            print(f"{length:>6} {name:<22} {ms:>11.1f} {temp:>9.1f}", flush=True)
    print(json.dumps({"bench": "attention", "rows": args.rows, "tokens": TOKENS,
                      "results": results}))


if __name__ == "__main__":
    main()
