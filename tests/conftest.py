"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """A TFDS data_dir with the embedded digits set prepared once per test session."""
  from kd_jax import data  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data.open_source("digits", "train", data_dir)
  return data_dir
