"""Orbax checkpoints of a train state (any pytree of arrays) plus JSON metadata.

    ckpt = Checkpointer("runs/dpo/checkpoints", max_to_keep=3)
    for step in range(1, num_steps + 1):
        state, metrics = train_step(state, next(loader))
        if step % 500 == 0:
            ckpt.save(step, state, metadata={"loader": loader.state(), "model_config": config_dict})
    ckpt.save(num_steps, state, metadata=...)      # the final state (skipped if already saved)

    state, metadata = ckpt.restore(abstract_state, config=config_dict)   # latest step

Layout: `<directory>/<step>/state` (arrays, OCDBT/TensorStore) and `<directory>/<step>/metadata`
(JSON). Nothing is pickled. Saves are synchronous. Each step is written into
`<step>.orbax-checkpoint-tmp*` and renamed when complete, so a crash mid-save leaves the earlier
checkpoints intact; `latest_step()` never sees a partial directory, and leftovers are deleted
(in the background, finished before its first save) when the next `Checkpointer` opens it.

Restoring checks what it can before reading arrays: the stored model config against the
current one (`CheckpointMismatchError: checkpoint was written with d_model=256 but the model has
d_model=128`), then every array path and shape against the restore target.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointMismatchError", "Checkpointer", "config_mismatches"]

_MAX_LISTED = 8


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model or state it is restored into; names the fields."""


def _flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _as_json(config: Any) -> Any:
    """A config (dict or dataclass) as it reads back from JSON (tuples become lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config))


def config_mismatches(stored: Mapping[str, Any], current: Mapping[str, Any] | Any) -> list[str]:
    """Sentences naming each field where two configs differ (nested keys dotted: `a.b`).

    Args:
        stored: the config saved with a checkpoint.
        current: the config of the model being restored into (a dict or a dataclass).

    Returns:
        e.g. `["checkpoint was written with d_model=256 but the model has d_model=128"]`; empty
        when they agree.
    """
    stored_flat = _flatten_config(_as_json(stored))
    current_flat = _flatten_config(_as_json(current))
    sentences = []
    for key in sorted(set(stored_flat) | set(current_flat)):
        if key not in current_flat:
            sentences.append(f"checkpoint was written with {key}={json.dumps(stored_flat[key])}"
                             f" but the model has no {key}")
        elif key not in stored_flat:
            sentences.append(f"checkpoint was written without {key}"
                             f" but the model has {key}={json.dumps(current_flat[key])}")
        elif stored_flat[key] != current_flat[key]:
            sentences.append(f"checkpoint was written with {key}={json.dumps(stored_flat[key])}"
                             f" but the model has {key}={json.dumps(current_flat[key])}")
    return sentences


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _stored_shape(leaf: Any) -> tuple[int, ...]:
    """Shape as stored: a typed PRNG key array is stored as its key data (`[..., 2]`)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"params/dense/kernel": shape}` for every leaf; dict keys, attributes and indices alike."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): _stored_shape(leaf) for path, leaf in leaves}


def _structure_mismatches(
    stored: Mapping[str, tuple[int, ...]], target: Mapping[str, tuple[int, ...]]
) -> list[str]:
    problems = []
    for path in sorted(set(stored) | set(target)):
        if path not in stored:
            problems.append(f"'{path}' is in the restore target but not in the checkpoint")
        elif path not in target:
            problems.append(f"'{path}' is in the checkpoint but not in the restore target")
        elif stored[path] != target[path]:
            problems.append(f"'{path}' has shape {stored[path]} in the checkpoint"
                            f" but {target[path]} in the restore target")
    return problems


def _join(problems: list[str]) -> str:
    listed = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return listed + (f"; ... and {more} more" if more > 0 else "")


def _abstract_leaf(leaf: Any) -> Any:
    """A restore-target leaf: shape, dtype and sharding (default: the first local device)."""
    if isinstance(leaf, np.ndarray | np.generic | int | float):
        return np.asarray(leaf)  # restored as numpy
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


class Checkpointer:
    """Saves the steps it is given (the caller's loop decides when), keeps the last
    `max_to_keep`.

    Args:
        directory: where step directories go (created if missing).
        max_to_keep: number of most recent checkpoints kept; None keeps all.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be positive or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()},
        )

    # ---------------------------------------------------------------- bookkeeping
    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    # ---------------------------------------------------------------- save
    def save(self, step: int, state: Any, *, metadata: Mapping[str, Any] | None = None) -> bool:
        """Writes `state` and `metadata` as checkpoint `step`; returns whether it wrote.

        Args:
            step: the training step (the directory name).
            state: a pytree of arrays (jax or numpy; typed PRNG keys are fine).
            metadata: JSON-serialisable dict (loader position, model config, CLI args).

        A step that already has a checkpoint is never written twice (returns False).
        """
        if step in self._manager.all_steps():
            return False
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise TypeError(f"checkpoint metadata must be plain JSON: {error}") from None
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata))
        saved = self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return bool(saved)

    # ---------------------------------------------------------------- restore
    def _resolve(self, step: int | None) -> int:
        steps = self._manager.all_steps()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (have {sorted(steps)})")
        return step

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of checkpoint `step` (default: latest), without reading arrays."""
        step = self._resolve(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return dict(restored["metadata"] or {})

    def restore(
        self,
        target: Any,
        step: int | None = None,
        *,
        config: Mapping[str, Any] | Any | None = None,
        config_key: str = "model_config",
    ) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint `step` (default: latest) into the structure of `target`.

        Args:
            target: a pytree like the saved state: concrete arrays or `jax.ShapeDtypeStruct`s.
                Restored arrays take its dtypes and shardings (leaves without a sharding go to
                the first local device; numpy leaves come back as numpy).
            step: which checkpoint; None = the latest.
            config: the current model config (dict or dataclass); if given it must equal
                `metadata[config_key]` of the checkpoint.
            config_key: where the config sits in the metadata.

        Returns:
            `(state, metadata)`.

        Raises:
            FileNotFoundError: no such checkpoint.
            CheckpointMismatchError: config fields, array paths or shapes differ (all named).
        """
        step = self._resolve(step)
        metadata = self.read_metadata(step)
        if config is not None:
            if config_key not in metadata:
                raise CheckpointMismatchError(
                    f"checkpoint {step} has no '{config_key}' in its metadata"
                    " to compare the model config with")
            problems = config_mismatches(metadata[config_key], config)
            if problems:
                raise CheckpointMismatchError(_join(problems))
        stored_tree = self._manager.item_metadata(step)["state"]
        problems = _structure_mismatches(_leaf_shapes(stored_tree), _leaf_shapes(target))
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {step} does not fit the restore target: {_join(problems)}")
        abstract = jax.tree.map(_abstract_leaf, target)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        restored = self._manager.restore(step, args=args)
        return restored["state"], metadata

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Waits for pending work and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
