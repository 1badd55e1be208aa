"""Shared fixtures: the embedded digits set prepared once per session in a temporary TFDS data_dir."""
import pytest

from kd_jax import data


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  data.open_source("digits", "train", data_dir)  # Prepares both splits.
  return data_dir
