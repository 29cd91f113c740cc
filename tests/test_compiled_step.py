"""CompiledStep hands the compiler's freed heap back to the OS after each call that compiled."""

import jax.numpy as jnp

from jaxalign.train import state as state_module


def test_compiler_memory_is_released_once_per_compilation(monkeypatch):
    released = []
    monkeypatch.setattr(state_module, "release_compiler_memory", lambda: released.append(1))
    step = state_module.compile_step(lambda s, batch: (s + 1, jnp.sum(batch)))
    carry = jnp.zeros(3)
    for width in (4, 4, 4, 5, 5):  # two shapes: two compilations
        carry, total = step(carry, jnp.ones(width))
    assert float(total) == 5 and carry.tolist() == [5, 5, 5]
    assert len(released) == 2


def test_release_compiler_memory_runs_here():
    state_module.release_compiler_memory()  # glibc's malloc_trim(0) here; a no-op without it
    assert state_module._libc_malloc_trim() is not None  # the test machine runs glibc
