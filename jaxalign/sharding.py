"""Device meshes and shardings: a table of rules, not code in the model.

A mesh has three named axes:

* ``data``: data parallelism (batch split, parameters replicated),
* ``fsdp``: fully sharded data parallelism (batch split *and* parameters split on ``embed``),
* ``tensor``: tensor parallelism (heads, MLP width and vocabulary split).

Model parameters carry logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``layers``); :data:`DEFAULT_RULES` maps them to mesh axes. A
dimension that a mesh axis does not divide is left unsharded on that axis rather than failing,
so the same rules serve every model size. Batches are split over ``("data", "fsdp")``.

The same code runs on one CPU (a 1×1×1 mesh), on 8 forced host devices in tests, on a GPU node
or on a multi-host TPU pod after :func:`jaxalign.distributed.initialize`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign.models import logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

#: Logical parameter axis → mesh axis (or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(
    *, data: int | None = None, fsdp: int = 1, tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all of them).

    ``data=None`` takes whatever the other two axes leave: ``len(devices) // (fsdp·tensor)``.

    Raises:
      ValueError: if the axis sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // max(fsdp * tensor, 1)
    if min(data, fsdp, tensor) < 1 or data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} does not match "
            f"{len(devices)} devices"
        )
    grid = np.asarray(devices).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=4,fsdp=2"`` → ``{"data": 4, "fsdp": 2}`` (the CLI's ``--mesh`` syntax)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.isdigit():
            raise ValueError(
                f"--mesh entry {part!r} is not AXIS=N with AXIS one of {MESH_AXES}"
            )
        sizes[name] = int(value)
    return sizes


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide the dimension they would split."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = [
        axes if axes is not None and dim % _axis_size(mesh, axes) == 0 else None
        for axes, dim in zip(entries, shape)
    ]
    return P(*fitted)


def logical_shardings(
    logical_specs: Any, shapes: Any, mesh: Mesh, rules: Sequence = DEFAULT_RULES
) -> Any:
    """NamedShardings for a tree of logical ``PartitionSpec`` s and a matching tree of shapes."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    return jax.tree.map(
        lambda spec, shaped: NamedSharding(mesh, _fit_spec(spec, np.shape(shaped), mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P),
    )


def param_shardings(model: nn.Module, params: Any, mesh: Mesh, rules: Sequence = DEFAULT_RULES) -> Any:
    """NamedShardings for ``model``'s (unboxed) ``params`` from its logical axis names."""
    return logical_shardings(logical_axes(model), params, mesh, rules)


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shardings_like_params(tree: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that embeds copies of the params tree (optimiser state).

    A leaf whose key path ends with a parameter's key path and has that parameter's shape
    (Adam's ``mu``/``nu``, accumulated gradients) gets the parameter's sharding; every other
    leaf (step counters, scalars) is replicated.
    """
    by_path = {}
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params_shardings)
    ):
        by_path[_path_key(path)] = (np.shape(leaf), sharding)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def _optimizer_field(params_field: str) -> str:
    """The optimiser-state field paired with a params field: ``params`` → ``opt_state``,
    ``X_params`` → ``X_opt_state``."""
    return "opt_state" if params_field == "params" else params_field[:-len("params")] + "opt_state"


def state_shardings(state: Any, mesh: Mesh, models: Mapping[str, nn.Module | None],
                    rules: Sequence = DEFAULT_RULES) -> Any:
    """NamedShardings for every leaf of a training state (a ``flax.struct`` dataclass).

    ``models`` maps each params field of ``state`` to the model whose logical axes lay it out
    (e.g. ``{"params": model, "ref_params": model}`` for a ``TrainState``). The optimiser state
    of a params field (``opt_state`` for ``params``, ``X_opt_state`` for ``X_params``) is laid
    out like those params (:func:`shardings_like_params`); every other leaf is replicated.
    A field that is ``None`` stays ``None``.
    """
    repl = replicated(mesh)
    shardings = {f.name: jax.tree.map(lambda _: repl, getattr(state, f.name))
                 for f in dataclasses.fields(state)}
    for name, model in models.items():
        params = getattr(state, name)
        if params is None:
            continue
        if model is None:
            raise ValueError(f"state field {name!r} holds params but no model lays them out")
        shardings[name] = param_shardings(model, params, mesh, rules)
        opt_name = _optimizer_field(name)
        if getattr(state, opt_name, None) is not None:
            shardings[opt_name] = shardings_like_params(getattr(state, opt_name), params,
                                                        shardings[name], mesh)
    return state.replace(**shardings)


def shard_state(state: Any, mesh: Mesh, models: Mapping[str, nn.Module | None],
                rules: Sequence = DEFAULT_RULES) -> Any:
    """Places ``state`` on ``mesh`` with :func:`state_shardings`.

    In a multi-process run every process passes the same values (same seed or the same
    checkpoint); they go through host memory first, because ``device_put`` cannot move an
    array committed to one local device onto a mesh that spans processes.
    """
    if jax.process_count() > 1:
        state = jax.device_get(state)
    return jax.device_put(state, state_shardings(state, mesh, models, rules))


def global_key(key: jax.Array, mesh: Mesh) -> jax.Array:
    """A PRNG ``key`` every process holds, as a replicated global array on ``mesh`` in a
    multi-process run (a jitted step takes only global arrays there); else unchanged."""
    if jax.process_count() == 1:
        return key
    data = jax.device_put(jax.device_get(jax.random.key_data(key)), replicated(mesh))
    return jax.random.wrap_key_data(data)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data`` and ``fsdp``; other axes replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places every array of ``batch`` with its leading axis split across the batch axes.

    In a multi-process run each process passes its *local* rows and gets a global array
    (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh)
    size = _axis_size(mesh, BATCH_AXES)

    def put(x):
        x = np.asarray(x)
        if jax.process_count() > 1:
            return jax.make_array_from_process_local_data(sharding, x)
        if x.shape[0] % size:
            raise ValueError(
                f"batch leading dimension {x.shape[0]} is not divisible by the mesh's "
                f"data x fsdp size {size}"
            )
        return jax.device_put(x, sharding)

    return jax.tree.map(put, batch)
