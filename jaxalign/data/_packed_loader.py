"""Packed batches in a shuffled order that is a pure function of (seed, step)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxalign.data._dataset import Dataset
from jaxalign.data._loader import StepLoader
from jaxalign.data._packing import (
    PackingConfig, PackingReport, PackSpec, _place, default_spec, fit_example, pack,
)

_PACKABLE = {"pairs": "preference", "sequences": "sft"}


class PackedLoader(StepLoader):
    """Packed batches (:mod:`jaxalign.data._packing`) of one dataset.

    Epoch ``e`` visits the examples in the order of :class:`DataLoader`
    (``default_rng([seed, e]).permutation(N)``) and cuts it into batches first-fit: an
    example joins the current batch while it fits a row (slots and head positions) and the
    capacity, otherwise it opens the next batch. Batch ``step`` is therefore a pure function of
    ``(seed, step)``, every batch has the shape ``spec``, and every example appears exactly
    once per epoch (cut to a row if it is longer, counted in ``report``).

    Args:
        dataset: a preference (``packing="pairs"``) or sft (``"sequences"``) :class:`Dataset`.
        batch_size: what the defaults of ``config`` size the batch for (average records per
            batch, see :func:`default_spec`).
        config: the :class:`PackingConfig` (``packing`` "pairs" or "sequences").
        seed, shuffle: as :class:`DataLoader`'s.
        include_prompt: sft: the prompt tokens are targets too.
    """

    def __init__(self, dataset: Dataset, batch_size: int, config: PackingConfig, *,
                 seed: int = 0, shuffle: bool = True, include_prompt: bool = False) -> None:
        kind = config.packing
        if kind not in _PACKABLE:
            raise ValueError(f"PackedLoader packs 'pairs' or 'sequences', got packing={kind!r}")
        if dataset.kind != _PACKABLE[kind]:
            raise ValueError(f"packing={kind!r} packs {_PACKABLE[kind]} records, but the data"
                             f" holds {dataset.kind} records")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.kind, self.seed, self.shuffle = dataset, kind, seed, shuffle
        self.batch_size = batch_size
        self.spec = default_spec(dataset.examples, kind, batch_size, config,
                                 pad_multiple=dataset.config.pad_multiple,
                                 include_prompt=include_prompt)
        if kind == "pairs" and self.spec.targets < 2:
            raise ValueError(f"pack_targets={self.spec.targets}: a pair needs at least 2 head"
                             " positions per row")
        self.items = [fit_example(e, kind, self.spec.length, self.spec.targets,
                                  include_prompt=include_prompt) for e in dataset.examples]
        self._plans: list[list[np.ndarray]] = []
        self.step = 0
        self.report = self._report()

    def _report(self) -> PackingReport:
        plan = self._plan(0)
        cut = [item.cut for item in self.items]
        return PackingReport(self.kind, self.spec, num_examples=len(self.items),
                             num_cut=sum(c > 0 for c in cut), tokens_cut=sum(cut),
                             real_tokens=sum(item.slots for item in self.items),
                             slots=len(plan) * self.spec.rows * self.spec.length,
                             batches=len(plan))

    def _plan(self, epoch: int) -> list[np.ndarray]:
        """The example indices of each batch of ``epoch`` (computed once, in order)."""
        while len(self._plans) <= epoch:
            e, n = len(self._plans), len(self.items)
            order = (np.random.default_rng([self.seed, e]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._plans.append(self._cut(order))
        return self._plans[epoch]

    def _cut(self, order: np.ndarray) -> list[np.ndarray]:
        spec, batches, current = self.spec, [], []
        slots, targets = [0] * spec.rows, [0] * spec.rows
        for index in order:
            item = self.items[index]
            if len(current) == spec.capacity or _place(item, spec, slots, targets) is None:
                batches.append(np.asarray(current))
                current, slots, targets = [], [0] * spec.rows, [0] * spec.rows
                _place(item, spec, slots, targets)  # an item always fits an empty batch
            current.append(int(index))
        batches.append(np.asarray(current))
        return batches

    def indices_at(self, step: int) -> np.ndarray:
        """Example indices of batch ``step`` (between 1 and ``spec.capacity`` of them)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch = 0
        while step >= len(self._plan(epoch)):
            step -= len(self._plan(epoch))
            epoch += 1
        return self._plan(epoch)[step]

    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The packed batch of the examples at ``indices`` (in that order)."""
        return pack([self.items[int(i)] for i in indices], self.spec, self.kind,
                    self.dataset.pad_id, [self.dataset.examples[int(i)] for i in indices])


    def state(self) -> dict[str, int]:
        """JSON-able position and what it depends on (the packing shape included)."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.items), "packing": self.kind,
                "pack_spec": list(self.spec)}


class ShardedPackedLoader(StepLoader):
    """Packed batches assembled from ``num_shards`` data shards, for a mesh that splits the rows.

    Shard ``k`` (the lines ``≡ k + 1 (mod num_shards)``, as :class:`ShardedLoader`) is packed by
    its own :class:`PackedLoader` (seed ``(seed, k)``, ``batch_size / num_shards`` records on
    average) into the same :class:`PackSpec`; batch ``step`` is shard ``k``'s rows
    ``k·rows … (k+1)·rows − 1`` and pair slots ``k·P … (k+1)·P − 1`` of the global batch, with
    its target groups renumbered globally (chosen ``k·P + p``, rejected ``N·P + k·P + p`` for
    ``N`` shards). A process loads only its shards (``datasets``: ``{k: Dataset}``); the shape
    must then not depend on the data, so with fewer shards than ``num_shards`` here
    ``pack_length``, ``pack_rows`` and ``pack_targets`` must be given.
    """

    def __init__(self, datasets: Mapping[int, Dataset], batch_size: int, config: PackingConfig,
                 *, num_shards: int, seed: int = 0, include_prompt: bool = False) -> None:
        if batch_size % num_shards:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {num_shards} data"
                             " shards of the mesh (data x fsdp)")
        unset = [f"pack_{name}" for name in ("length", "rows", "targets")
                 if getattr(config, f"pack_{name}") is None]
        if len(datasets) < num_shards and unset:
            raise ValueError(f"packing data shards over several processes needs {', '.join(unset)}"
                             " set: every process must build the same batch shape")
        first = next(iter(datasets.values()))
        per_shard = batch_size // num_shards
        examples = [e for dataset in datasets.values() for e in dataset.examples]
        spec = default_spec(examples, config.packing, per_shard, config,
                            pad_multiple=first.config.pad_multiple, include_prompt=include_prompt)
        fixed = dataclasses.replace(config, pack_length=spec.length, pack_rows=spec.rows,
                                    pack_capacity=spec.capacity, pack_targets=spec.targets)
        self.shards = {k: PackedLoader(dataset, per_shard, fixed, seed=seed * 1_000_003 + k,
                                       include_prompt=include_prompt)
                       for k, dataset in sorted(datasets.items())}
        self.spec, self.num_shards, self.seed, self.batch_size = spec, num_shards, seed, batch_size
        self.step = 0
        reports = [loader.report for loader in self.shards.values()]
        local = len(self.shards)  # the report: this process's part of the global batches
        self.report = PackingReport(
            config.packing, spec._replace(rows=local * spec.rows, capacity=local * spec.capacity),
            *(sum(getattr(r, name) for r in reports) for name in (
                "num_examples", "num_cut", "tokens_cut", "real_tokens")),
            slots=local * max(r.batches for r in reports) * spec.rows * spec.length,
            batches=max(r.batches for r in reports))

    def indices_at(self, step: int) -> dict[int, np.ndarray]:
        """``{shard: example indices}`` of batch ``step`` (this process's shards)."""
        return {k: loader.indices_at(step) for k, loader in self.shards.items()}

    def collate(self, indices: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of ``indices`` (from :meth:`indices_at`)."""
        capacity = self.spec.capacity
        parts = []
        for k, rows in indices.items():
            part = self.shards[k].collate(rows)
            group = part["target_group"]
            rejected = group >= capacity
            part["target_group"] = np.where(
                group < 0, -1, np.where(rejected, self.num_shards * capacity + k * capacity
                                        + group - capacity, k * capacity + group))
            parts.append(part)
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


    def state(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "num_shards": self.num_shards, "pack_spec": list(self.spec)}


def pad_pairs(values: np.ndarray, indices: np.ndarray, capacity: int) -> np.ndarray:
    """``values[indices]`` zero-padded to the ``capacity`` pair slots (e.g. reference log-probs
    ``[N]`` of a packed batch)."""
    out = np.zeros((capacity,) + values.shape[1:], values.dtype)
    out[:len(indices)] = values[indices]
    return out


__all__ = ["PackSpec", "PackedLoader", "PackingConfig", "PackingReport", "ShardedPackedLoader",
           "pad_pairs"]
