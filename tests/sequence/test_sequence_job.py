"""The language-model distillation job end to end (runlocal), its top-k cache, and bad input."""
import json
import os

import numpy as np
import pytest

from configs import stdlib_lm
from kd_jax import array_store, metrics
from kd_jax.sequence import job, topk_cache


def _config(arg="runlocal", **overrides):
  config = stdlib_lm.get_config(arg)
  with config.unlocked():
    config.update_from_flattened_dict(overrides)
  return config


def test_runlocal_trains_teacher_and_arms_and_reuses_the_cache(tmp_path):
  config = _config("runlocal,arms=alone+topk")
  results = job.run(config, str(tmp_path))
  assert [r["stage"] for r in results["rows"]] == ["teacher", "student_alone", "student_topk"]
  assert all(r["tokens"] == 64 * 64 and np.isfinite(r["bpc"]) and r["bpc"] > 0
             for r in results["rows"])
  assert json.load(open(tmp_path / "results.json")) == results
  assert all(text.startswith("def ") and len(text) == 64 for text in results["samples"].values())
  record = metrics.read_jsonl(os.path.join(tmp_path, "student_topk", "metrics.jsonl"))[-1]
  assert record["step"] == 6 and record["terms/topk"] > 0
  table = job.format_results(results)
  assert "student_topk" in table and f"{results['rows'][0]['bpc']:.4f}" in table
  # The cache belongs to this teacher and these windows: another teacher is refused.
  cache_dir = str(tmp_path / "teacher_topk")
  stored = json.load(open(os.path.join(cache_dir, array_store.STORE_FILE)))["metadata"]
  with pytest.raises(array_store.StaleStoreError, match="teacher"):
    array_store.open_store(cache_dir, {**stored, "teacher": array_store.params_fingerprint({"x": 0})})


def test_with_topk_adds_each_rows_cached_outputs():
  cache = {name: np.arange(np.prod(shape)).reshape(shape).astype(dtype)
           for name, (shape, dtype) in topk_cache.topk_specs(5, 3, 2).items()}
  batches = topk_cache.with_topk(lambda start: iter([{"index": np.array([4, 1])}]), cache)
  batch = next(batches(0))
  for name in topk_cache.TOPK_ARRAYS:
    np.testing.assert_array_equal(batch[name], cache[name][[4, 1]])


@pytest.mark.parametrize("overrides, message", [
    ({"data.eval_on": "test"}, "data.eval_on='test' is unknown"),
    ({"arms": ("alone", "distill")}, "arms names 'distill'"),
    ({"losses.topk.topk_tail": "drop"}, "losses.topk.topk_tail='drop' is unknown"),
    ({"student.model_kwargs.width": 9}, "student.model_kwargs: width=9 must be a multiple"),
    ({"samples.num_tokens": 100}, "exceed data.seq_length=64"),
    ({"data.eval_on": "train_tail", "data.tune_windows": 4}, "data.tune_windows=4 must leave"),
])
def test_bad_input_fails_before_training(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=None) as e:
    job.run(_config(**overrides), str(tmp_path))
  assert message in str(e.value)
  assert not os.path.exists(tmp_path / "teacher")
