"""Pieces shared by the benchmark scripts: the matmul peak and fresh-process workers."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import types

_MODEL_ENV = "JAXALIGN_BENCH_MODEL"
_MODEL_FIELDS = ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads",
                 "resolved_head_dim", "max_len", "norm_eps", "rope_theta")


def bench_config(vocab_size: int | None = None):
    """The ``bench`` model preset (with ``vocab_size`` if given). In a worker it is read from the
    environment its parent set, so a PyTorch worker never imports JAX and its peak memory is
    PyTorch's alone."""
    text = os.environ.get(_MODEL_ENV)
    if text:
        fields = json.loads(text)
        if vocab_size is not None:
            fields["vocab_size"] = vocab_size
        return types.SimpleNamespace(**fields)
    from jaxalign.models import get_config

    return get_config("bench", **({} if vocab_size is None else {"vocab_size": vocab_size}))


def jax_bench_config(**overrides):
    """The ``bench`` preset as a ``TransformerConfig`` (JAX workers)."""
    from jaxalign.models import get_config

    return get_config("bench", **overrides)


def llama_config(cfg, **extra):
    """A ``transformers.LlamaConfig`` with ``cfg``'s shapes (untied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                       intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                       num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                       max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
                       rope_theta=cfg.rope_theta, tie_word_embeddings=False, **extra)


def forward_flops(cfg, tokens: int, context: int) -> float:
    """Model FLOPs of a forward pass over ``tokens`` tokens attending to ``context`` positions:
    2·N per token for the matmul weights (the LM head included; the embedding is a gather)
    plus 4·L·context·d for the attention scores (QKᵀ and AV, the PaLM MFU convention)."""
    hd = cfg.resolved_head_dim
    per_layer = cfg.d_model * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.d_model * cfg.d_ff
    weights = cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size
    return tokens * (2 * weights + 4 * cfg.n_layers * context * cfg.n_heads * hd)


def peak_rss_mb() -> float:
    """This process's peak resident memory (``ru_maxrss``) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    """This process's resident memory now (``VmRSS``) in MiB (Linux)."""
    return _proc_status_mb("VmRSS")


def high_water_mb() -> float:
    """This process's peak resident memory since start or the last :func:`reset_high_water`
    (``VmHWM``) in MiB (Linux)."""
    return _proc_status_mb("VmHWM")


def reset_high_water() -> None:
    """Resets the peak resident memory ``VmHWM`` to the current RSS (Linux >= 4.0,
    ``/proc/self/clear_refs``), so a later :func:`high_water_mb` covers only what ran since."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def matmul_peak_gflops(repeats: int = 10, n: int = 2048, dtype: str = "float32") -> dict:
    """Best ``n x n`` matmul FLOP/s of this machine through XLA (the roofline's peak), inputs in
    ``dtype``, accumulated in float32."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
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
    cfg = bench_config()
    env = {**os.environ, _MODEL_ENV: json.dumps({f: getattr(cfg, f) for f in _MODEL_FIELDS})}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])
