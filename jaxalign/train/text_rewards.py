"""Python reward functions on decoded text, called from inside a compiled step.

``reward_fns=[f, g, ...]`` in :func:`jaxalign.train.rlhf.make_rlhf_step` become one
``jax.pure_callback``: the compiled step hands the host its token ids, the host decodes them
(``tokenizer.decode_batch``, special tokens dropped), looks up the dataset's extra columns of
each row, calls every function once on the whole batch with TRL's signature

    f(prompts: list[str], completions: list[str], *, completion_ids, **columns) -> list[float]

and returns a ``[B, F]`` float32 matrix (``None`` → NaN: "does not apply"), which the step
weighs and sums (NaN-skipping, as TRL does) into the sequence score. The step stays one
compiled function; the callback is the only host round trip.

On a mesh the callback runs inside ``shard_map`` over the batch axes, so each device's call
sees only its rows and, with several processes, each host scores only its local rows (rows
replicated over ``tensor`` are scored once per replica). Columns are found by the row's
``index`` in the step's prompt batch (the row of the dataset), so every host needs the whole
column table, which it has when it has read the whole prompts file. Reward functions may be
called from several device threads at once; keep them free of shared mutable state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.rewards import reward_name

__all__ = ["TextRewards", "sharded_score", "text_rewards"]


def _unique_names(fns: Sequence[Callable]) -> tuple[str, ...]:
    names: list[str] = []
    for fn in fns:
        name, suffix = reward_name(fn), 2
        while name in names:
            name, suffix = f"{reward_name(fn)}_{suffix}", suffix + 1
        names.append(name)
    return tuple(names)


@dataclasses.dataclass(frozen=True, eq=False)
class TextRewards:
    """The host side: decode, look up columns, call each function, stack. See the module
    docstring. ``columns`` maps a column name to one value per dataset row."""

    fns: tuple[Callable, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]
    tokenizer: Any
    columns: Mapping[str, Sequence[Any]]

    def __call__(self, prompt_ids, prompt_mask, completion_ids, completion_mask,
                 index) -> np.ndarray:
        """``[B, F]`` float32 rewards of the ``B`` rows (NaN where a function returned None)."""
        prompt_ids, completion_ids = np.asarray(prompt_ids), np.asarray(completion_ids)
        completion_mask, index = np.asarray(completion_mask) > 0, np.asarray(index)
        prompts = self.tokenizer.decode_batch(prompt_ids, attention_mask=np.asarray(prompt_mask))
        completions = self.tokenizer.decode_batch(completion_ids, attention_mask=completion_mask)
        ids = [row[keep].tolist() for row, keep in zip(completion_ids, completion_mask)]
        columns = {name: [values[int(i)] for i in index] for name, values in self.columns.items()}
        out = np.full((len(completions), len(self.fns)), np.nan, np.float32)
        for j, (fn, name) in enumerate(zip(self.fns, self.names)):
            values = fn(prompts, completions, completion_ids=ids, **columns)
            if values is None or len(values) != len(completions):
                got = "None" if values is None else f"{len(values)} values"
                raise ValueError(f"reward function {name!r} returned {got} for"
                                 f" {len(completions)} completions")
            out[:, j] = [np.nan if v is None else float(v) for v in values]
        return out

    def score(self, prompt_ids: jax.Array, prompt_mask: jax.Array, completion_ids: jax.Array,
              completion_mask: jax.Array, index: jax.Array) -> jax.Array:
        """The traced side: ``[B, F]`` rewards through one ``pure_callback`` (per device)."""
        shape = jax.ShapeDtypeStruct((completion_ids.shape[0], len(self.fns)), jnp.float32)
        return jax.pure_callback(self, shape, prompt_ids, prompt_mask, completion_ids,
                                 completion_mask, index, vmap_method="sequential")

    def combine(self, per_function: jax.Array) -> jax.Array:
        """``[B, F]`` → ``[B]``: ``Σ_f w_f r_f`` over the functions that gave a value."""
        weights = jnp.asarray(self.weights, jnp.float32)
        return jnp.nansum(per_function * weights[None, :], axis=1)

    def metrics(self, per_function: jax.Array) -> dict[str, jax.Array]:
        """``rewards/<name>/mean`` and ``/std`` of each function (over rows it applied to)."""
        result = {}
        for j, name in enumerate(self.names):
            column = per_function[:, j]
            result[f"rewards/{name}/mean"] = jnp.nan_to_num(jnp.nanmean(column))
            result[f"rewards/{name}/std"] = jnp.nan_to_num(jnp.nanstd(column))
        return result


def text_rewards(reward_fns: Sequence[Callable], tokenizer: Any, *,
                 weights: Sequence[float] | None = None,
                 columns: Mapping[str, Sequence[Any]] | None = None) -> TextRewards:
    """:class:`TextRewards` of ``reward_fns`` (weights default to 1 each); ``tokenizer`` is
    anything with ``decode_batch(ids, attention_mask=...)`` (a :class:`jaxalign.tokenizer.
    Tokenizer`)."""
    fns = tuple(reward_fns)
    if not fns:
        raise ValueError("reward_fns is empty")
    if not all(callable(fn) for fn in fns):
        raise TypeError("every reward function must be callable")
    weights = tuple(float(w) for w in (weights if weights is not None else [1.0] * len(fns)))
    if len(weights) != len(fns):
        raise ValueError(f"{len(weights)} reward weights for {len(fns)} reward functions")
    if tokenizer is None or not hasattr(tokenizer, "decode_batch"):
        raise ValueError("Python reward functions need a tokenizer (with decode_batch) to"
                         " decode the completions")
    columns = dict(columns or {})
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"reward columns differ in length: {lengths}")
    return TextRewards(fns, weights, _unique_names(fns), tokenizer, columns)


def sharded_score(rewards: TextRewards, mesh: Mesh | None) -> Callable[..., jax.Array]:
    """``rewards.score``, inside ``shard_map`` over the batch axes when there is a mesh (each
    device, and so each host, scores its own rows)."""
    if mesh is None:
        return rewards.score
    rows = P(shd.BATCH_AXES)
    return jax.shard_map(rewards.score, mesh=mesh, in_specs=(rows,) * 5, out_specs=rows,
                         check_vma=False)
