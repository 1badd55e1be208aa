"""Test setup: 8 fake CPU devices and cheaper code generation, set before jax is imported
anywhere, and one persistent XLA compilation cache for the session's workers (many tests compile the same steps: it cuts the
suite's time by about a third, and a cache hit is the same executable)."""
import os
import tempfile

# Cheaper XLA:CPU code generation: the tests compile many programs and run each a few steps
# (tests/dataset_distill + tests/regimes: 260 s → 227 s on 2 cores). The notebooks' kernels use
# the same flags (tests/test_colabs.py).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Set once by pytest's main process; the xdist workers inherit it, so they share the cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kd_jax_tests_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """A TFDS data_dir with the embedded digits set prepared once per test session."""
  from kd_jax import data  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data.open_source("digits", "train", data_dir)
  return data_dir
