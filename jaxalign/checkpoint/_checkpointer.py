"""The :class:`Checkpointer`: Orbax's ``CheckpointManager`` with asynchronous saves, a
fingerprint per checkpoint, and the latest intact checkpoint on restore."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxalign.checkpoint._errors import (
    CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError, config_mismatches,
    join, os_error_of, quiet_abandoned_writes, quiet_orbax_save_errors, short_cause,
    structure_mismatches,
)
from jaxalign.checkpoint._fingerprint import (
    fingerprint_mismatches, leaf_shapes, tree_fingerprint,
)

__all__ = ["Checkpointer"]

_ITEMS = ("state", "metadata", "fingerprint")


def _abstract_leaf(leaf: Any) -> Any:
    """A restore-target leaf: shape, dtype and sharding (default: the first local device)."""
    if isinstance(leaf, np.ndarray | np.generic | int | float):
        return np.asarray(leaf)  # restored as numpy
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class Checkpointer:
    """Saves the steps it is given (the caller's loop decides when), keeps the last
    `max_to_keep`.

    Args:
        directory: where step directories go (created if missing).
        max_to_keep: number of most recent checkpoints kept; None keeps all.
        async_save: write in the background (`save` returns once the arrays are copied to host
            memory; the next `save`, `wait_until_finished` or `close` waits for it and raises
            its error). False writes before `save` returns.
        read_only: only read (no saves, no clean-up of leftovers, damaged steps not renamed),
            e.g. to look at a run's metadata while another `Checkpointer` writes there.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, read_only: bool = False) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be positive or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        quiet_orbax_save_errors()
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "metadata": ocp.JsonCheckpointHandler(),
                    "fingerprint": ocp.JsonCheckpointHandler()}
        with self._writing(None):  # creating the directory can fail too
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=handlers)
        self._in_flight: int | None = None  # the step of a background save not yet waited for
        self.read_only = read_only

    # ---------------------------------------------------------------- bookkeeping
    def all_steps(self) -> list[int]:
        """Steps with a checkpoint (one being written in the background included), ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def step_dir(self, step: int) -> Path:
        return Path(self.directory) / str(step)

    def _finished_steps(self) -> list[int]:
        """Step directories that are complete on disk (orbax renames them into place)."""
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        return sorted(int(name) for name in names if name.isdigit())

    # ---------------------------------------------------------------- save
    @contextlib.contextmanager
    def _writing(self, step: int | None) -> Iterator[None]:
        """Turns an OS error (a full disk) of writing ``step`` into a
        :class:`CheckpointWriteError` naming the step directory and the intact checkpoints."""
        try:
            yield
        except Exception as error:  # orbax raises TensorStore's errors as ValueError
            found = os_error_of(error)
            if found is None:
                raise
            code, cause = found
            quiet_abandoned_writes()
            where = self.directory if step is None else str(self.step_dir(step))
            intact = [str(s) for s in self._finished_steps() if s != step]
            kept = ("no earlier checkpoint" if not intact
                    else f"checkpoint {intact[0]} is intact" if len(intact) == 1
                    else f"checkpoints {', '.join(intact)} are intact")
            what = "writing checkpoints" if step is None else f"writing checkpoint {step}"
            raise CheckpointWriteError(code, f"{cause} ({what}; {kept})", where) from error

    def save(self, step: int, state: Any, *, metadata: Mapping[str, Any] | None = None) -> bool:
        """Writes `state` and `metadata` as checkpoint `step`; returns whether it wrote.

        Args:
            step: the training step (the directory name).
            state: a pytree of arrays (jax or numpy; typed PRNG keys are fine).
            metadata: JSON-serialisable dict (loader position, model config, CLI args).

        A step that already has a checkpoint is never written twice (returns False). The
        previous background save is waited for first.

        Raises:
            CheckpointWriteError: this save or the previous background one could not be
                written (an ``OSError``: ``filename`` is the step directory).
        """
        self.wait_until_finished()
        if step in self._manager.all_steps():
            return False
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise TypeError(f"checkpoint metadata must be plain JSON: {error}") from None
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  metadata=ocp.args.JsonSave(metadata),
                                  fingerprint=ocp.args.JsonSave(tree_fingerprint(state)))
        with self._writing(step):
            saved = self._manager.save(step, args=args, force=True)
        self._in_flight = step
        return bool(saved)

    def wait_until_finished(self) -> None:
        """Waits for a background save; raises its :class:`CheckpointWriteError` if it failed."""
        step, self._in_flight = self._in_flight, None
        with self._writing(step):
            self._manager.wait_until_finished()

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

    def _damaged(self, step: int, what: str, error: BaseException | None = None) -> Exception:
        cause = f" ({short_cause(error)})" if error is not None else ""
        return CheckpointCorruptError(f"checkpoint {step} in {self.directory} is damaged: {what}"
                                      f"{cause}", path=self.step_dir(step))

    def _read_item(self, step: int, item: str) -> Any:
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
        except Exception as error:
            raise self._damaged(step, f"its {item} cannot be read", error) from error
        return restored[item]

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of checkpoint `step` (default: the newest one whose metadata
        reads), without reading arrays. Raises :class:`CheckpointCorruptError` if unreadable."""
        if step is not None:
            return dict(self._read_item(self._resolve(step), "metadata") or {})
        damaged = None
        for candidate in reversed(self.all_steps()):
            try:
                return dict(self._read_item(candidate, "metadata") or {})
            except CheckpointCorruptError as error:
                damaged = damaged or error
        if damaged is not None:
            raise damaged
        raise FileNotFoundError(f"no checkpoint in {self.directory}")

    def _restore_step(self, step: int, target: Any, config: Any,
                      config_key: str) -> tuple[Any, dict[str, Any]]:
        """Checks, reads and verifies one step. A config or tree that does not fit raises
        :class:`CheckpointMismatchError`; anything unreadable or altered
        :class:`CheckpointCorruptError`."""
        metadata = dict(self._read_item(step, "metadata") or {})
        if config is not None:
            if config_key not in metadata:
                raise CheckpointMismatchError(
                    f"checkpoint {step} has no '{config_key}' in its metadata"
                    " to compare the model config with")
            problems = config_mismatches(metadata[config_key], config)
            if problems:
                raise CheckpointMismatchError(join(problems))
        try:
            stored_tree = self._manager.item_metadata(step)["state"]
        except Exception as error:
            raise self._damaged(step, "its array metadata cannot be read", error) from error
        if stored_tree is None:
            raise self._damaged(step, "it holds no arrays")
        problems = structure_mismatches(leaf_shapes(stored_tree), leaf_shapes(target))
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {step} does not fit the restore target: {join(problems)}")
        abstract = jax.tree.map(_abstract_leaf, target)
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as error:
            raise self._damaged(step, "its arrays cannot be read", error) from error
        if (self.step_dir(step) / "fingerprint").is_dir():  # older checkpoints have none
            altered = fingerprint_mismatches(self._read_item(step, "fingerprint") or {},
                                             tree_fingerprint(state))
            if altered:
                verb = "differs" if len(altered) == 1 else "differ"
                raise self._damaged(step, f"{join(altered)} {verb} from the fingerprint saved"
                                    " with the checkpoint (its bytes changed after the save)")
        return state, metadata

    def _set_aside(self, step: int) -> Path:
        """Renames a damaged step to ``<step>.corrupt`` (kept for inspection; the step can be
        written again)."""
        source = self.step_dir(step)
        target, n = source.with_name(f"{step}.corrupt"), 1
        while target.exists():
            n += 1
            target = source.with_name(f"{step}.corrupt{n}")
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"jaxalign set aside checkpoint {step}")
        self._manager.reload()
        return target

    def restore(
        self,
        target: Any,
        step: int | None = None,
        *,
        config: Mapping[str, Any] | Any | None = None,
        config_key: str = "model_config",
        report: Callable[[str], None] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint `step` (default: the latest intact one) into `target`'s structure.

        Args:
            target: a pytree like the saved state: concrete arrays or `jax.ShapeDtypeStruct`s.
                Restored arrays take its dtypes and shardings (leaves without a sharding go to
                the first local device; numpy leaves come back as numpy).
            step: which checkpoint; None = the latest that reads back intact. A damaged one
                (unreadable, truncated, or whose arrays differ from the fingerprint saved with
                them) is renamed ``<step>.corrupt``, reported, and the one before it tried.
            config: the current model config (dict or dataclass); if given it must equal
                `metadata[config_key]` of the checkpoint.
            config_key: where the config sits in the metadata.
            report: called with one sentence per damaged checkpoint set aside (default: a
                ``RuntimeWarning``).

        Returns:
            `(state, metadata)`.

        Raises:
            FileNotFoundError: no such checkpoint.
            CheckpointMismatchError: config fields, array paths or shapes differ (all named).
            CheckpointCorruptError: `step` (or, with `step=None`, every checkpoint) is damaged.
        """
        self.wait_until_finished()
        if step is not None:
            return self._restore_step(self._resolve(step), target, config, config_key)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for position in range(len(steps) - 1, -1, -1):
            try:
                return self._restore_step(steps[position], target, config, config_key)
            except CheckpointCorruptError as error:
                kept = ("skipped (read-only)" if self.read_only
                        else f"set aside as {self._set_aside(steps[position]).name}")
                then = (f"using step {steps[position - 1]} instead" if position
                        else "no earlier checkpoint to use")
                (report or _warn)(f"{error}; {kept}, {then}")
        raise CheckpointCorruptError(
            f"every checkpoint in {self.directory} is damaged (steps"
            f" {', '.join(map(str, steps))}, now set aside as <step>.corrupt)",
            path=self.directory)

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Waits for pending work (raising its :class:`CheckpointWriteError`) and releases the
        manager."""
        failed = None
        try:
            self.wait_until_finished()
            # orbax deletes leftover partial saves in a thread of its own; a Checkpointer
            # opened next on this directory must not find it still deleting
            getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        except CheckpointWriteError as error:
            failed = error
        try:
            self._manager.close()
        except Exception:
            if failed is None:
                raise
        if failed is not None:
            raise failed

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
