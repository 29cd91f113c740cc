"""Running a compiled function over a dataset in fixed-size batches (one compilation)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np


def map_batches(
    fn: Callable[..., Any],
    arrays: Sequence[np.ndarray],
    batch_size: int,
    *,
    wrap: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> Any:
    """``fn(index, *batch)`` over consecutive ``batch_size``-row slices of ``arrays``.

    Every call gets the same shapes, so a jitted ``fn`` compiles once: the last, partial batch
    is filled by repeating rows from the start, and what those rows produce is dropped.

    Args:
      fn: ``fn(index, *batch) -> pytree`` of arrays with a leading batch axis; ``index`` is
        the batch number (e.g. for ``jax.random.fold_in``).
      arrays: arrays with the same number ``N ≥ 1`` of rows.
      batch_size: rows per call.
      wrap: wraps the iterable of batch start rows (a progress bar, say).

    Returns:
      ``fn``'s output pytree with every leaf concatenated over batches, ``N`` rows, as numpy.
    """
    count = len(arrays[0])
    if count == 0 or any(len(a) != count for a in arrays):
        raise ValueError(f"arrays must have the same, nonzero number of rows; got "
                         f"{[len(a) for a in arrays]}")
    outputs = []
    for index, start in enumerate(wrap(range(0, count, batch_size))):
        rows = np.arange(start, start + batch_size) % count
        outputs.append(fn(index, *(a[rows] for a in arrays)))
        if index:  # fetch the previous batch while this one runs: no idle device, no backlog
            outputs[index - 1] = jax.device_get(outputs[index - 1])
    outputs = jax.device_get(outputs)
    return jax.tree.map(lambda *leaves: np.concatenate(leaves)[:count], *outputs)
