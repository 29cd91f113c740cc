"""Pieces shared by the benchmark scripts: the matmul peak and fresh-process workers."""

from __future__ import annotations

import json
import subprocess
import sys
import time


def matmul_peak_gflops(repeats: int = 10, n: int = 2048) -> dict:
    """Best float32 ``n x n`` matmul FLOP/s of this machine through XLA (the roofline's peak)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return {"gflops": 2 * n**3 / best / 1e9}


def spawn_worker(script: str, name: str, *args: str) -> dict:
    """Runs ``script --worker name *args`` in a fresh process and parses its last JSON line, so
    each measurement's peak resident memory belongs to it alone."""
    cmd = [sys.executable, script, "--worker", name, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])
