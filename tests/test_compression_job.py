"""The KD job with a quantized student on a pruned transfer set (configs/digits_compression.py)."""
import json
import os

import numpy as np
import pytest

from configs import digits_compression
from kd_jax import data, experiment, kd_job, metrics, models, quantization
from kd_jax.data import pruning


def _config(data_dir, arg="runlocal", **overrides):
  config = digits_compression.get_config(arg)
  with config.unlocked():
    config.update_from_flattened_dict({"data.data_dir": data_dir, **overrides})
  return config


def test_quantized_student_on_pruned_data(digits_data_dir, tmp_path, monkeypatch):
  """A 2-bit KD student with learned points on a randomly pruned half of train: its row, its
  export, and its transfer set. (An MLP teacher and random scores: compile time; EL2N and
  forgetting runs are `benchmarks/digits_compression_table.py`'s.)"""
  sources = []
  real = data.train_batches

  def recording(source, **kwargs):
    sources.append(source)
    return real(source, **kwargs)

  monkeypatch.setattr(data, "train_batches", recording)
  config = _config(digits_data_dir, "runlocal,bits=2,method=differentiable,prune=0.5,"
                   "score=random", **{"tune.validation_examples": 0,
                                      "student.baseline": False, "teacher.model": "mlp",
                                      "teacher.model_kwargs": {"hidden_sizes": (32,)},
                                      "checkpoint.every_steps": 100, "log.tensorboard": False})
  rows = kd_job.run(config, str(tmp_path))
  teacher, student = rows
  assert teacher["bits"] == 32 * teacher["params"] and "full_precision_accuracy" not in teacher
  # MLP 64 at 2 bits: 4,810 codes; 16 + 1 + 3 + 1 buckets of (scale, offset); 4 leaves × 4 points.
  assert student["bits"] == 4810 * 2 + 21 * 2 * 32 + 4 * 4 * 32
  assert 0 <= student["full_precision_accuracy"] <= 1
  # The printed table shows both: the size in bits and the shadows' accuracy.
  student_line = experiment.format_table(rows).splitlines()[-1]
  assert f"{student['bits']:,}" in student_line
  assert f"{100 * student['full_precision_accuracy']:.2f}%" in student_line

  # The exported codes, scales and learned points give the evaluated (quantized) student.
  exp = experiment.Experiment(config)
  apply_fn = models.make_apply_fn(models.create_model("mlp", num_classes=10, hidden_sizes=(64,)))
  params = quantization.load(str(tmp_path / "student_kd" / "quantized.npz"))
  assert exp.evaluate(apply_fn, {"params": params})["accuracy"] == student["accuracy"]
  with np.load(tmp_path / "student_kd" / "quantized.npz") as f:
    assert f["dense1/kernel.codes"].max() <= 3 and "dense1/kernel.points" in f

  # The student trained on the kept half of train, and only on it.
  train = exp.train_source
  kept = pruning.kept(pruning.random_scores(1300, config.seed), 0.5, "hardest", config.seed)
  students = [s for s in sources if len(s) == 650]
  assert students and all(np.array_equal(s.images, train.images[kept]) for s in students)
  assert metrics.read_jsonl(str(tmp_path / "student_kd" / "metrics.jsonl"))[-1]["step"] == 650 // 64
  assert json.load(open(tmp_path / "results.json")) == rows


@pytest.mark.parametrize("key,value,message", [
    ("student.quantize.bits", 17, r"student.quantize: bits must be in 1..16"),
    ("student.quantize.method", "ternary", r"student.quantize.method='ternary' is unknown; "
                                           r"valid: uniform, differentiable"),
    ("data.prune.fraction", 1.0, r"data.prune.fraction must be in \[0, 1\)"),
    ("data.prune.score", "grand", r"data.prune.score='grand' is unknown; valid: random, el2n"),
    ("data.prune.keep", "middle", r"data.prune.keep='middle' is unknown"),
    ("data.prune.fraction", 0.97, r"data.prune.fraction=0.97 keeps 30 of the 1000 examples the "
                                  r"students train on, fewer than data.batch_size=64"),
])
def test_bad_compression_fields_fail_at_start(digits_data_dir, tmp_path, key, value, message):
  config = _config(digits_data_dir, "runlocal,bits=4", **{key: value})
  with pytest.raises(ValueError, match=message):
    kd_job.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)
