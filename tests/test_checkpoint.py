"""Tests for jaxalign.checkpoint: round trips, retention, crash safety, mismatch messages."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.checkpoint import CheckpointMismatchError, Checkpointer, config_mismatches

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
    ckpt = Checkpointer(tmp_path)
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
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from jaxalign.checkpoint import Checkpointer

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def crash_before_commit(self):
        if self.get_final().name == "2":  # step 2's final rename: die with its files half-written
            os._exit(17)
        await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = crash_before_commit
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.ones((64, 64))}, metadata={"step": 1})
    ckpt.save(2, {"w": jnp.zeros((64, 64))}, metadata={"step": 2})
    os._exit(0)
""")


def test_process_killed_mid_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(tmp_path)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 17, result.stderr[-2000:]
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
