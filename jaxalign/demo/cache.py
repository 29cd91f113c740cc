"""On-disk stage cache for the demo: a finished stage is skipped when its inputs are unchanged.

Every stage ``NAME`` owns ``OUT/NAME/`` and finishes by writing ``OUT/NAME/stage.json``::

    {"name": str, "fingerprint": str, "seconds": float, "result": {...}}

The fingerprint hashes the stage's own settings, :data:`CACHE_VERSION` and the fingerprints of
the stages it reads, so
changing a setting reruns that stage and everything downstream, and nothing else. The marker is
written last (atomically), so an interrupted stage simply runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

import jaxalign

#: Bump when a stage's code changes what it produces, so old caches are not reused.
CACHE_VERSION = 1


def fingerprint(name: str, settings: Any, deps: tuple[str, ...] = ()) -> str:
    """A short stable hash of a stage name, its settings (JSON-able) and upstream fingerprints."""
    text = json.dumps({"name": name, "settings": settings, "deps": list(deps),
                       "version": [CACHE_VERSION, jaxalign.__version__]}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageCache:
    """Runs or skips stages under ``out``; remembers what it did for the report.

    Attributes:
      out: the run directory.
      timings: ``{stage: seconds}`` of this process (0.0 for skipped stages).
      recorded: ``{stage: seconds}`` the stage took when it actually ran (now or earlier).
      skipped, ran: stage names in the order they were met.
    """

    def __init__(self, out: str | os.PathLike, *, log: Callable[[str], None] = print) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.timings: dict[str, float] = {}
        self.recorded: dict[str, float] = {}
        self.skipped: list[str] = []
        self.ran: list[str] = []
        self.fingerprints: dict[str, str] = {}

    def dir(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, name: str, settings: Any, deps: tuple[str, ...],
            fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """``fn(stage_dir) -> result`` unless a marker with the same fingerprint exists.

        ``deps`` are names of stages already run in this process.
        """
        key = fingerprint(name, settings, tuple(self.fingerprints[d] for d in deps))
        self.fingerprints[name] = key
        marker = self.out / name / "stage.json"
        if marker.exists():
            try:
                stored = json.loads(marker.read_text())
            except json.JSONDecodeError:
                stored = {}
            if stored.get("fingerprint") == key:
                self.log(f"[cached] {name} (finished earlier in {stored['seconds']:.1f}s)")
                self.skipped.append(name)
                self.timings[name] = 0.0
                self.recorded[name] = float(stored["seconds"])
                return stored["result"]
        self.log(f"[stage]  {name}")
        start = time.perf_counter()
        result = fn(self.dir(name))
        seconds = time.perf_counter() - start
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"name": name, "fingerprint": key, "seconds": seconds,
                                   "result": result}, indent=1))
        os.replace(tmp, marker)
        self.ran.append(name)
        self.timings[name] = self.recorded[name] = seconds
        self.log(f"[done]   {name} in {seconds:.1f}s")
        return result


def save_params(params: Any, path: str | os.PathLike) -> None:
    """Writes a parameter pytree (nested dicts of arrays) as msgpack."""
    host = jax.tree.map(np.asarray, jax.device_get(params))
    Path(path).write_bytes(serialization.msgpack_serialize(host))


def load_params(path: str | os.PathLike) -> Any:
    """Reads :func:`save_params` output as a fresh pytree of device arrays."""
    tree = serialization.msgpack_restore(Path(path).read_bytes())
    return jax.tree.map(lambda leaf: jax.numpy.array(leaf, copy=True), tree)
