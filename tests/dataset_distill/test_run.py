"""The distill_dataset job end to end (configs/dd_digits.py:runlocal) on an 8-device mesh."""
import json

import numpy as np

from configs import dd_digits
from kd_jax.dataset_distill import run as run_lib
from kd_jax.dataset_distill.distilled_set import load_distilled


def test_runlocal_job_on_segment_and_data_mesh(tmp_path, digits_data_dir):
  config = dd_digits.get_config("runlocal")
  with config.unlocked():
    config.data.data_dir = digits_data_dir
    config.mesh.axes = (("segment", 2), ("data", -1))
    config.distill.segments = 2
  results = run_lib.run(config, tmp_path)
  assert json.loads((tmp_path / "results.json").read_text())["ipc"] == 10
  for name in ("distilled_fixed_lr", "random_real", "full_data"):
    assert 0.0 <= results[name]["mean"] <= 1.0, name
  assert (tmp_path / "synthetic_images.png").stat().st_size > 0
  arrays, metadata = load_distilled(tmp_path)
  assert metadata["ipc"] == 10 and arrays["images"].shape == (100, 8, 8, 1)
  assert np.isfinite(arrays["images"]).all()
