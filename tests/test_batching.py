"""Tests for jaxalign.batching.map_batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.batching import map_batches


@pytest.mark.parametrize("count,batch_size", [(1, 4), (7, 3), (8, 4), (5, 8)])
def test_map_batches_equals_one_big_call_and_compiles_once(count, batch_size):
    x = np.arange(count * 2, dtype=np.float32).reshape(count, 2)
    y = np.arange(count, dtype=np.int32)
    fn = jax.jit(lambda index, a, b: (a.sum(1) * b + index * 0, a * 2))
    seen = []
    total, doubled = map_batches(lambda i, a, b: (seen.append((i, a.shape)), fn(i, a, b))[1],
                                 (x, y), batch_size)
    np.testing.assert_array_equal(total, x.sum(1) * y)
    np.testing.assert_array_equal(doubled, x * 2)
    assert [i for i, _ in seen] == list(range(-(-count // batch_size)))
    assert {shape for _, shape in seen} == {(batch_size, 2)}
    assert fn._cache_size() == 1


def test_map_batches_rejects_empty_or_ragged_inputs():
    with pytest.raises(ValueError, match="same, nonzero number of rows"):
        map_batches(lambda i, a: a, (np.zeros((0, 2)),), 4)
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        map_batches(lambda i, a, b: a, (np.zeros(3), jnp.zeros(2)), 4)
