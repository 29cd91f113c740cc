"""A fingerprint of a pytree of arrays, computed on the devices that hold them, so that a
checkpoint whose bytes changed after it was written is caught when it is read back.

Orbax and TensorStore notice a truncated chunk file, but not one whose bytes were overwritten:
a flipped byte in a stored array restores without an error, as another number. So every save
records, per leaf, two sums over the leaf's bits viewed as unsigned 32-bit words ``w_i``
(narrower dtypes widened, 8-byte ones split in two; PRNG keys by their key data), modulo 2³²:

    plain = Σ_i w_i,        weighted = Σ_i (2i + 1) · w_i

Integer sums are exact, so the result does not depend on how the array is sharded or in which
order devices reduce. A change of any single word changes ``weighted`` (an odd weight times a
non-zero difference is non-zero modulo 2³²); a random change of many goes unseen with
probability about 2⁻⁶⁴. The sums are one fused pass over the state (XLA does not materialise
the index), and only ``2 × leaves`` words leave the devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["fingerprint_mismatches", "leaf_paths", "leaf_shapes", "tree_fingerprint"]

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[("params/dense/kernel", leaf), ...]``: dict keys, attributes and indices alike."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def _stored_shape(leaf: Any) -> tuple[int, ...]:
    """Shape as stored: a typed PRNG key array is stored as its key data (`[..., 2]`)."""
    if _is_key(leaf):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"params/dense/kernel": shape}`` for every leaf, as stored."""
    return {path: _stored_shape(leaf) for path, leaf in leaf_paths(tree)}


def _words(leaf: jax.Array) -> jax.Array:
    """The leaf's bits as uint32 words."""
    if _is_key(leaf):
        leaf = jax.random.key_data(leaf)
    if leaf.dtype == jnp.bool_:
        leaf = leaf.astype(jnp.uint8)
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
        leaf = jnp.stack([jnp.real(leaf), jnp.imag(leaf)], axis=-1)
    unsigned = _UNSIGNED[jnp.dtype(leaf.dtype).itemsize]
    return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)


def _leaf_sums(leaf: jax.Array) -> jax.Array:
    """``[plain, weighted]`` (uint32) of one leaf."""
    words = _words(leaf)
    if words.ndim == 0:
        words = words[None]
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(
            stride % 2**32)
        stride *= words.shape[axis]
    weighted = jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), weighted])


@jax.jit
def _tree_sums(leaves: list[Any]) -> list[jax.Array]:
    return [_leaf_sums(leaf) for leaf in leaves]


def _to_host(sums: list[jax.Array]) -> list[np.ndarray]:
    if jax.process_count() > 1:  # replicated global arrays: every process reads its own copy
        return [np.asarray(s.addressable_data(0)) for s in sums]
    return [np.asarray(s) for s in jax.device_get(sums)]


def tree_fingerprint(tree: Any) -> dict[str, list]:
    """``{path: [dtype name, plain, weighted]}`` for every leaf of ``tree`` (see the module
    docstring); JSON-serialisable. Collective in a multi-process run (every process calls it)."""
    named = leaf_paths(tree)
    leaves = [leaf if isinstance(leaf, jax.Array) else np.asarray(leaf) for _, leaf in named]
    sums = _to_host(_tree_sums(leaves)) if leaves else []
    return {path: [jnp.dtype(leaf.dtype).name if not _is_key(leaf) else "key",
                   int(s[0]), int(s[1])]
            for (path, _), leaf, s in zip(named, leaves, sums)}


def fingerprint_mismatches(stored: dict[str, list], restored: dict[str, list]) -> list[str]:
    """The paths whose restored bits differ from the fingerprint saved with them. Leaves
    restored into another dtype (a cast) or absent from either side are not compared."""
    return [f"'{path}'" for path, (dtype, *sums) in sorted(stored.items())
            if path in restored and restored[path][0] == dtype and restored[path][1:] != sums]
