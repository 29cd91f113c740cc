"""Test-session setup: 8 forced CPU devices, strict rank promotion, hypothesis profiles.

XLA_FLAGS must be set before JAX is imported anywhere, which is why this happens at the top of
conftest.py (pytest imports it before any test module).
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# One persistent XLA compilation cache per test session, shared by the xdist workers and every
# subprocess (CLI runs, the demos, notebook kernels inherit the environment): a program already
# compiled in this session (same HLO, devices and options: JAX's cache key) is loaded instead of
# compiled again, e.g. the demo's quick-preset SFT / reward-model / PPO steps that the notebooks
# compile too, or a resumed run's step. JAX never caches programs with host callbacks. The
# process that creates the directory (the controller) removes it at exit; a directory the
# caller set is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxalign-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
