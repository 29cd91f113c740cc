"""Batch orders: a pure function of (seed, step), for one dataset or for data shards."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from jaxalign.data._dataset import Dataset


class StepLoader:
    """What every loader shares: batch ``step`` is ``collate(indices_at(step))``, a pure function
    of the seed and the step; iterating yields ``batch_at(self.step)`` and advances
    ``self.step``; ``restore(state)`` continues from a ``state()`` after checking that each of its
    entries but the position (``step``, ``epoch``, ``index``) equals this loader's."""

    step: int = 0
    _POSITION = ("step", "epoch", "index")

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """Batch number ``step`` (a pure function of seed and step)."""
        return self.collate(self.indices_at(step))

    def __iter__(self) -> StepLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def restore(self, state: Mapping[str, int]) -> None:
        """Continues from ``state()``; refuses a state of another seed, batch, data or shape."""
        for key, current in self.state().items():
            if key not in self._POSITION and state.get(key) != current:
                raise ValueError(f"loader state has {key}={state.get(key)}"
                                 f" but this loader has {key}={current}")
        self.step = int(state["step"])


class DataLoader(StepLoader):
    """Shuffled batches where batch `step` depends only on `(seed, step)`.

    Epoch `e` visits the examples in the order `np.random.default_rng([seed, e]).permutation(N)`;
    step `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`. Iterating yields
    `batch_at(self.step)` and advances `self.step`, forever (epochs repeat with new orders);
    `state()` / `restore()` save and reset that position, so a resumed run sees the same batches.

    Args:
        dataset: a `Dataset`.
        batch_size: B.
        seed: the shuffling seed.
        shuffle: False keeps file order in every epoch.
        drop_last: True drops the incomplete last batch of each epoch (every batch has B rows).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        num_examples = len(dataset)
        if batch_size >= 1:
            self.steps_per_epoch = num_examples // batch_size if drop_last else -(-num_examples // batch_size)
        if batch_size < 1 or self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} does not fit a dataset of {num_examples} examples")
        self.step = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def indices_at(self, step: int) -> np.ndarray:
        """Example indices `[B]` (fewer in a last partial batch) of batch `step`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[index * self.batch_size: (index + 1) * self.batch_size]

    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The padded batch of the examples at ``indices``."""
        return self.dataset.collate(indices)

    def state(self) -> dict[str, int]:
        """JSON-able position: the next step, its epoch and index, and what they depend on."""
        epoch, index = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "index": index, "seed": self.seed,
                "batch_size": self.batch_size, "num_examples": len(self.dataset)}


class ShardedLoader(StepLoader):
    """Batches assembled from ``num_shards`` data shards, for a mesh that splits the batch.

    Shard ``k`` holds the records on lines ``≡ k + 1 (mod num_shards)`` of the file and
    contributes rows ``k·b … (k+1)·b − 1`` (``b = batch_size / num_shards``) of every batch, drawn
    by its own :class:`DataLoader` with seed ``(seed, k)``: batch ``step`` is a pure function of
    the seed, the step and the shard count, whatever the number of processes. A process loads
    only its shards (``datasets``: ``{k: Dataset}``) and :meth:`batch_at` gives its rows, in
    shard order, ready for ``sharding.shard_batch``; every shard pads to ``max_length`` so all
    processes agree on the batch shape.
    """

    def __init__(self, datasets: Mapping[int, Dataset], batch_size: int, *, num_shards: int,
                 seed: int = 0) -> None:
        if batch_size % num_shards:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {num_shards} data"
                             " shards of the mesh (data x fsdp)")
        self.batch_size, self.num_shards, self.seed = batch_size, num_shards, seed
        self.shards = {k: DataLoader(dataset, batch_size // num_shards, seed=seed * 1_000_003 + k)
                       for k, dataset in sorted(datasets.items())}
        self.step = 0

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of batch ``step``."""
        parts = [loader.batch_at(step) for loader in self.shards.values()]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def state(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "num_shards": self.num_shards}


def shard_lines(shard: int, num_shards: int) -> Callable[[int], bool]:
    """The ``lines`` filter of data shard ``shard`` (of ``num_shards``)."""
    return lambda line_no: (line_no - 1) % num_shards == shard
