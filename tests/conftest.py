"""Test configuration: several virtual CPU devices, strict promotion, float64 available."""

import atexit
import os
import shutil
import tempfile

# Must precede the first jax import: four virtual CPU devices for the multi-device paths.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
# JCAFFE_TEST_PLATFORM=cuda runs the suite with the GPU as JAX's default backend (the CPU
# devices stay available); the default is the CPU alone.
# "gpu" means "cuda": JAX_PLATFORMS=gpu would also require ROCm and oneAPI.
_platform = os.environ.get("JCAFFE_TEST_PLATFORM", "cpu")
_platform = "cuda" if _platform == "gpu" else _platform
os.environ.setdefault("JAX_PLATFORMS", "cpu" if _platform == "cpu" else f"{_platform},cpu")

# One persistent XLA compilation cache for the whole run, shared by this process and the
# command-line subprocesses the tests start (they inherit the environment): a program that
# several tests build (the LeNet step, say) compiles once per run instead of once per test.
# Programs with host callbacks (Python layers) are never cached, by JAX's own rule.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="jcaffe-tests-xla-cache-")
    atexit.register(shutil.rmtree, _xla_cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402

# Layers must not rely on implicit rank promotion or mixed-dtype promotion; float64 is on so
# gradient checks can run in double precision (production code passes float32 explicitly).
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


class CompileCounter:
    """Counts XLA backend compilations (JAX's own monitoring event) while active."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1


@pytest.fixture
def compiles():
    """``compiles.count``: backend compilations since the test started."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    yield counter
    jax.monitoring.unregister_event_duration_listener(counter)
