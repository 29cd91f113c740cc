"""Multi-host runs on JAX's own distributed runtime (no runtime of our own).

After :func:`initialize`, ``jax.devices()`` lists every device of every process, a mesh from
:func:`jaxalign.sharding.make_mesh` spans them all, and the same compiled steps run over it;
each process feeds its local rows (:func:`jaxalign.sharding.shard_batch` builds global arrays
with ``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import os

import jax

_ENV = {
    "coordinator_address": "JAXALIGN_COORDINATOR",
    "num_processes": "JAXALIGN_NUM_PROCESSES",
    "process_id": "JAXALIGN_PROCESS_ID",
}


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    cpu_collectives: str = "gloo",
) -> None:
    """Calls ``jax.distributed.initialize`` with arguments from flags or the environment.

    Each argument left ``None`` is read from ``JAXALIGN_COORDINATOR``, ``JAXALIGN_NUM_PROCESSES``
    and ``JAXALIGN_PROCESS_ID``; if still unset, JAX detects the cluster itself (TPU pod
    slices, Slurm, Open MPI, Kubernetes). On CPU the cross-process collectives use
    ``cpu_collectives`` (``"gloo"``), which must be chosen before the runtime starts.

    Example (two processes on one machine)::

        JAXALIGN_COORDINATOR=127.0.0.1:12355 JAXALIGN_NUM_PROCESSES=2 JAXALIGN_PROCESS_ID=0 python train.py
        JAXALIGN_COORDINATOR=127.0.0.1:12355 JAXALIGN_NUM_PROCESSES=2 JAXALIGN_PROCESS_ID=1 python train.py
    """
    values = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
    for name, env in _ENV.items():
        if values[name] is None and env in os.environ:
            raw = os.environ[env]
            values[name] = raw if name == "coordinator_address" else int(raw)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {k: v for k, v in values.items() if v is not None}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)


def _cpu_only() -> bool:
    """True when no accelerator plugin is installed (checked without starting a backend)."""
    import importlib.util

    accelerators = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin", "libtpu")
    return not any(importlib.util.find_spec(name) for name in accelerators)


def is_main_process() -> bool:
    """Process 0: the one that writes logs, metrics and checkpoints' metadata."""
    return jax.process_index() == 0
