"""Test configuration: several virtual CPU devices, strict promotion, float64 available."""

import os

# Must precede the first jax import: four virtual CPU devices for the multi-device paths.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Layers must not rely on implicit rank promotion or mixed-dtype promotion; float64 is on so
# gradient checks can run in double precision (production code passes float32 explicitly).
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_enable_x64", True)
