"""Tests for jaxalign.checkpoint: round trips, retention, crash safety, mismatch messages,
background saves, fingerprints that catch altered bytes, damaged steps set aside, write errors
that name the path."""

import dataclasses
import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from orbax.checkpoint._src.path import atomicity

from jaxalign.checkpoint import (CheckpointCorruptError, CheckpointMismatchError, Checkpointer,
                                 CheckpointWriteError, config_mismatches, os_error_of,
                                 tree_fingerprint)

CONFIG = {"d_model": 8, "n_layers": 2, "activation": "gelu", "rope": {"theta": 10000.0}}


def make_state(d_model: int = 8, seed: int = 0) -> dict:
    key = jax.random.key(seed)
    params = {
        "embed": {"embedding": jax.random.normal(key, (16, d_model))},
        "block_0": {"kernel": jnp.full((d_model, 4), 0.5), "bias": jnp.arange(4, dtype=jnp.float32)},
    }
    opt_state = optax.adam(1e-3).init(params)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.key_data(jax.random.fold_in(key, 1)),  # raw uint32 key
        "typed_rng": jax.random.fold_in(key, 2),  # typed key array
    }


def assert_trees_equal(a, b) -> None:
    a = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, a)
    b = jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_and_metadata(tmp_path: Path) -> None:
    state = make_state(seed=3)
    metadata = {"loader": {"step": 30, "epoch": 1, "seed": 0}, "model_config": CONFIG, "args": ["--lr", "1e-3"]}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(30, state, metadata=metadata)
    reopened = Checkpointer(tmp_path / "ckpt")
    assert reopened.latest_step() == 30
    restored, restored_metadata = reopened.restore(make_state(seed=0), config=CONFIG)
    assert_trees_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert restored_metadata == metadata
    assert reopened.read_metadata(30) == metadata
    abstract = jax.eval_shape(lambda: make_state())
    restored_from_abstract, _ = reopened.restore(abstract)
    assert_trees_equal(restored_from_abstract, state)


def test_restore_uses_target_sharding(tmp_path: Path) -> None:
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = {"w": jnp.arange(8.0)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state)
    target = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)}
    restored, metadata = ckpt.restore(target)
    assert restored["w"].sharding == sharding and metadata == {}
    np.testing.assert_array_equal(restored["w"], np.arange(8.0))


def test_save_schedule_and_keep_last_k(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    assert all(ckpt.save(step, make_state(seed=step)) for step in (2, 4, 6))
    assert ckpt.all_steps() == [4, 6]
    assert ckpt.save(7, make_state(seed=7))
    assert not ckpt.save(7, make_state())  # never written twice
    assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
    restored, _ = ckpt.restore(make_state(), step=6)
    assert int(restored["step"]) == 6
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 4 .*\(have \[6, 7\]\)"):
        ckpt.restore(make_state(), step=4)
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]


def test_partial_checkpoint_directory_is_ignored_and_cleaned(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, make_state(seed=2), metadata={"ok": True})
    partial = tmp_path / "3.orbax-checkpoint-tmp-1732345678901234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\x00" * 100)
    reopened = Checkpointer(tmp_path)
    assert reopened.latest_step() == 2 and reopened.all_steps() == [2]
    restored, metadata = reopened.restore(make_state())
    assert int(restored["step"]) == 2 and metadata == {"ok": True}
    assert reopened.save(3, make_state(seed=3))  # step 3 can be written again, cleanly
    assert not partial.exists()  # the leftover is gone (cleanup finishes before the first save)
    assert reopened.all_steps() == [2, 3]


CRASHING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from jaxalign.checkpoint import Checkpointer

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def crash_before_commit(self):
        if self.get_final().name == "2":  # step 2's final rename: die with its files written
            os.kill(os.getpid(), signal.SIGKILL)  # but not renamed into place (a background thread)
        await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = crash_before_commit
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.ones((64, 64))}, metadata={"step": 1})
    ckpt.save(2, {"w": jnp.zeros((64, 64))}, metadata={"step": 2})
    ckpt.wait_until_finished()
    os._exit(0)
""")


def test_process_killed_mid_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(tmp_path)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))  # the partial save
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    restored, metadata = ckpt.restore({"w": jnp.zeros((64, 64))})
    np.testing.assert_array_equal(restored["w"], np.ones((64, 64)))
    assert metadata == {"step": 1}


def test_config_mismatch_names_fields(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, make_state(d_model=256), metadata={"model_config": {**CONFIG, "d_model": 256}})
    with pytest.raises(CheckpointMismatchError) as error:
        ckpt.restore(make_state(d_model=128), config={**CONFIG, "d_model": 128})
    assert str(error.value) == "checkpoint was written with d_model=256 but the model has d_model=128"
    assert isinstance(error.value, ValueError)
    without_config = Checkpointer(tmp_path / "other")
    without_config.save(1, {"w": jnp.ones(2)}, metadata={"loader": {"step": 1}})
    with pytest.raises(CheckpointMismatchError, match="checkpoint 1 has no 'model_config' in its metadata"):
        without_config.restore({"w": jnp.ones(2)}, config=CONFIG)


def test_config_mismatches_text() -> None:
    @dataclasses.dataclass(frozen=True)
    class ModelConfig:
        d_model: int = 8
        n_layers: int = 2
        activation: str = "gelu"
        rope: dict = dataclasses.field(default_factory=lambda: {"theta": 10000.0})

    assert config_mismatches(CONFIG, ModelConfig()) == []
    stored = {**CONFIG, "rope": {"theta": 500000.0}, "n_experts": 4, "shape": (2, 3)}
    current = {**CONFIG, "activation": "relu", "dropout": 0.1, "shape": [2, 3]}
    assert config_mismatches(stored, current) == [
        'checkpoint was written with activation="gelu" but the model has activation="relu"',
        "checkpoint was written without dropout but the model has dropout=0.1",
        "checkpoint was written with n_experts=4 but the model has no n_experts",
        "checkpoint was written with rope.theta=500000.0 but the model has rope.theta=10000.0",
    ]


def test_structure_mismatch_names_paths_and_shapes(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, {"params": {"dense": {"kernel": jnp.ones((256, 4)), "bias": jnp.ones(4)}}, "step": jnp.int32(5)})
    target = {"params": {"dense": {"kernel": jnp.ones((128, 4)), "scale": jnp.ones(4)}}, "step": jnp.int32(0)}
    with pytest.raises(CheckpointMismatchError) as error:
        ckpt.restore(target)
    assert str(error.value) == (
        "checkpoint 5 does not fit the restore target: "
        "'params/dense/bias' is in the checkpoint but not in the restore target; "
        "'params/dense/kernel' has shape (256, 4) in the checkpoint but (128, 4) in the restore target; "
        "'params/dense/scale' is in the restore target but not in the checkpoint"
    )


def test_errors_for_missing_checkpoint_and_bad_metadata(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore({"w": jnp.ones(2)})
    with pytest.raises(TypeError, match="checkpoint metadata must be plain JSON"):
        ckpt.save(1, {"w": jnp.ones(2)}, metadata={"array": np.ones(2)})
    assert ckpt.all_steps() == []
    with pytest.raises(ValueError, match="max_to_keep must be positive or None"):
        Checkpointer(tmp_path, max_to_keep=0)


# ------------------------------------------------------------------------------ background saves
def test_save_returns_while_the_write_is_still_running(tmp_path: Path, monkeypatch) -> None:
    release, finalize = threading.Event(), atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self):  # the background thread's last act: rename into place
        if self.get_final().name == "1":
            assert release.wait(timeout=60)
        await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
    state = make_state(seed=1)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.save(1, state, metadata={"step": 1})  # returns with the write unfinished
    assert not (tmp_path / "1").exists() and ckpt.all_steps() == [1]
    state["params"]["block_0"]["bias"].delete()  # the arrays were copied: donating them is safe
    release.set()
    assert not ckpt.save(1, make_state())  # waits for the save in flight; no second write
    ckpt.close()
    restored, metadata = Checkpointer(tmp_path).restore(make_state())
    assert metadata == {"step": 1}
    np.testing.assert_array_equal(restored["params"]["block_0"]["bias"], np.arange(4))


# ------------------------------------------------------------------------------ fingerprints
_DTYPES = [jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint32, jnp.bool_, jnp.int32]


@settings(max_examples=20, deadline=None)
@given(dtype=st.sampled_from(_DTYPES), shape=st.sampled_from([(), (5,), (3, 4), (2, 3, 4)]),
       data=st.data())
def test_fingerprint_changes_with_any_single_element(dtype, shape, data) -> None:
    values = np.asarray(data.draw(st.lists(st.integers(0, 255), min_size=int(np.prod(shape)),
                                           max_size=int(np.prod(shape)))), np.int64)
    array = jnp.asarray(values.reshape(shape) % (2 if dtype == jnp.bool_ else 256)).astype(dtype)
    index = data.draw(st.integers(0, max(array.size - 1, 0)))
    changed = array.reshape(-1).at[index].set(
        jnp.logical_not(array.reshape(-1)[index]) if dtype == jnp.bool_
        else array.reshape(-1)[index] + 1).reshape(shape)
    before, after = tree_fingerprint({"a": array}), tree_fingerprint({"a": changed})
    assert before["a"][0] == jnp.dtype(dtype).name
    assert before != after and tree_fingerprint({"a": array}) == before


def test_fingerprint_sees_swapped_elements_keys_and_is_the_same_sharded() -> None:
    array = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
    swapped = array.at[0, 0].set(array[0, 1]).at[0, 1].set(array[0, 0])  # same plain sum
    assert tree_fingerprint([array]) != tree_fingerprint([swapped])
    keys = tree_fingerprint([jax.random.key(0)]), tree_fingerprint([jax.random.key(1)])
    assert keys[0] != keys[1] and keys[0]["0"][0] == "key"
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), devices=jax.devices()[:8])
    sharded = jax.device_put(array, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data", "fsdp")))
    assert tree_fingerprint([sharded]) == tree_fingerprint([array]) == tree_fingerprint(
        [np.asarray(array)])


# ------------------------------------------------------------------------------ damaged steps
def _damage_arrays(step_dir: Path, how: str) -> None:
    path = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    content = bytearray(path.read_bytes())
    if how == "truncate":
        os.truncate(path, len(content) // 2)
        return
    middle = len(content) // 2
    content[middle:middle + 8] = bytes(b ^ 0x55 for b in content[middle:middle + 8])
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("how", ["overwrite", "truncate"])
def test_damaged_latest_step_is_set_aside_and_the_previous_restored(tmp_path: Path, how) -> None:
    big = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)}
    with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": big["w"] * step}, metadata={"step": step})
    _damage_arrays(tmp_path / "3", how)
    ckpt = Checkpointer(tmp_path, max_to_keep=None)
    with pytest.raises(CheckpointCorruptError, match=f"checkpoint 3 in {tmp_path} is damaged"):
        ckpt.restore(big, step=3)  # an explicit step is not replaced by another
    reports = []
    restored, metadata = ckpt.restore(big, report=reports.append)
    assert metadata == {"step": 2} and ckpt.all_steps() == [1, 2]
    np.testing.assert_array_equal(restored["w"], big["w"] * 2)
    cause = ("'w' differs from the fingerprint" if how == "overwrite"
             else "its arrays cannot be read")
    assert len(reports) == 1 and cause in reports[0]
    assert reports[0].endswith("set aside as 3.corrupt, using step 2 instead")
    assert (tmp_path / "3.corrupt" / "state").is_dir()  # kept for inspection
    assert ckpt.save(3, {"w": big["w"] * 3}, metadata={"step": 3})  # and written afresh
    ckpt.close()
    _damage_arrays(tmp_path / "3", how)
    with pytest.warns(RuntimeWarning, match="set aside as 3.corrupt2, using step 2 instead"):
        assert Checkpointer(tmp_path).read_metadata() == {"step": 3}  # metadata still reads
        assert Checkpointer(tmp_path).restore(big)[1] == {"step": 2}


def test_every_step_damaged_is_an_error_naming_them(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones(4)})
    os.truncate(tmp_path / "1" / "metadata" / "metadata", 3)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointCorruptError, match="its metadata cannot be read"):
        ckpt.read_metadata()
    with pytest.warns(RuntimeWarning, match="no earlier checkpoint to use"), pytest.raises(
            CheckpointCorruptError, match=r"every checkpoint in .* is damaged \(steps 1,"):
        ckpt.restore({"w": jnp.ones(4)})


# ------------------------------------------------------------------------------ write errors
def test_errno_is_read_from_tensorstore_and_rust_errors() -> None:
    assert os_error_of(ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x\": Failed"
                                  " to write: No space left on device [os_error_code='28']")) == (
        errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os_error_of(Exception("No space left on device (os error 28)"))[0] == errno.ENOSPC
    assert os_error_of(PermissionError(errno.EACCES, "Permission denied"))[0] == errno.EACCES
    assert os_error_of(ValueError("bad value")) is None


def test_a_failed_background_write_names_its_step_and_the_intact_ones(tmp_path: Path,
                                                                     monkeypatch) -> None:
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full_at_2(self):
        if self.get_final().name == "2":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_2)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"w": jnp.ones(4)})
    ckpt.save(2, {"w": jnp.zeros(4)})  # fails in the background
    with pytest.raises(CheckpointWriteError) as error:
        ckpt.save(3, {"w": jnp.zeros(4)})  # which the next save reports
    assert isinstance(error.value, OSError) and error.value.errno == errno.ENOSPC
    assert error.value.filename == str(tmp_path / "2")
    assert error.value.strerror == ("No space left on device (writing checkpoint 2; checkpoint 1"
                                    " is intact)")
    ckpt.close()  # reported once
    monkeypatch.undo()
    assert Checkpointer(tmp_path).restore({"w": jnp.zeros(4)})[0]["w"].tolist() == [1.0] * 4


def test_an_unretrieved_tensorstore_write_failure_is_not_logged_again():
    """asyncio's 'exception was never retrieved' record of a failed write (a TensorStore error
    set on the future, never raised in Python, so no orbax frame) is dropped: the Checkpointer
    reports that failure once; other records pass."""
    from jaxalign.checkpoint._errors import _DropUnretrievedOrbaxWrites

    def record(message, error=None):
        info = None if error is None else (type(error), error, None)
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, info)

    quiet = _DropUnretrievedOrbaxWrites()
    full = ValueError("RESOURCE_EXHAUSTED: Failed to write 61429 bytes to file 4: No space left"
                      " on device [os_error_code='28'] [tensorstore_spec='{\"driver\":\"zarr\"}']")
    # an OCDBT write's error carries no spec, only the errno (seen in CI)
    ocdbt = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.mu/0" in OCDBT database at'
                       ' local file "/x/6.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write'
                       " 2820 bytes to file 4: No space left on device [os_error_code='28']")
    assert not quiet.filter(record("Future exception was never retrieved", full))
    assert not quiet.filter(record("Future exception was never retrieved", ocdbt))
    assert quiet.filter(record("Future exception was never retrieved", ValueError("other")))
    assert quiet.filter(record("Task was destroyed but it is pending!"))


def test_what_a_failed_restore_leaves_behind_is_not_printed(monkeypatch):
    """A failed restore leaves orbax's other array reads unfinished; whenever one is collected
    later, closing it raises orbax's wrapper of its GeneratorExit, which Python would print as
    'Exception ignored in: <coroutine ...>' with a traceback (5 of 8 runs of a truncated
    checkpoint printed 1-10 of them after the one report). The hook drops those and a failed
    save's 'Event loop is closed', and passes every other unraisable error on."""
    from orbax.checkpoint._src.serialization import serialization

    from jaxalign.checkpoint import _errors

    passed = []
    monkeypatch.setattr(_errors, "_previous_unraisable_hook", passed.append)

    def unraisable(value, cause=None, code=None):
        value.__cause__ = cause
        return types.SimpleNamespace(exc_value=value, object=types.SimpleNamespace(cr_code=code)
                                     if code else None)

    orbax_read = serialization._read_array_index_and_device_put.__code__
    ours = test_what_a_failed_restore_leaves_behind_is_not_printed.__code__
    dropped = [unraisable(Exception("Encountered error while reading array index: ()"),
                          GeneratorExit(), orbax_read),
               unraisable(RuntimeError("Event loop is closed"))]
    kept = [unraisable(Exception("a read that failed by itself"), ValueError(), orbax_read),
            unraisable(Exception("not orbax's"), GeneratorExit(), ours),
            unraisable(RuntimeError("something else"))]
    for record in dropped + kept:
        _errors._drop_orbax_leftovers(record)
    assert passed == kept
