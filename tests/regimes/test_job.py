"""The regimes job end to end on digits: every `configs/digits_regimes.py` entry runs (runlocal),
rows and metrics are written, bad input fails at the field."""
import json
import os

import numpy as np
import pytest

from configs import digits_regimes
from kd_jax import experiment, metrics
from kd_jax.regimes import job

# The stages each regime adds after the baseline (born_again: its generations).
STAGES = {
    "multi_teacher": ["teacher_cnn", "teacher_mlp", "student_multi_teacher"],
    "mtard": ["teacher_cnn", "teacher_mlp", "student_multi_teacher"],
    "mutual": ["mutual/student", "mutual/peer"],
    "bdkd": ["mutual/student", "mutual/peer"],
    "born_again": ["born_again/gen_0", "born_again/gen_1", "born_again/gen_2"],
    "uskd": ["student_uskd"],
    "tgeo": ["teacher", "student_tgeo"],
    "mean_teacher": ["student_labeled_only", "mean_teacher/student", "mean_teacher/teacher"],
    "label_free": ["label_free/probe_random_init", "label_free/probe_student",
                   "label_free/probe_teacher"],
}


def _config(data_dir, regime, **overrides):
  config = digits_regimes.get_config(f"runlocal,regime={regime}")
  with config.unlocked():
    config.update_from_flattened_dict({"data.data_dir": data_dir, **overrides})
  return config


def test_every_regime_config_has_its_expected_stages():
  assert set(STAGES) == set(digits_regimes.REGIMES)


@pytest.mark.parametrize("regime", sorted(STAGES))
def test_regime_runs_from_its_runlocal_config(regime, digits_data_dir, tmp_path):
  baseline = regime == "mutual"  # one run keeps the baseline row; the others skip it for time
  rows = job.run(_config(digits_data_dir, regime, **{"student.baseline": baseline}),
                 str(tmp_path))
  assert [r["stage"] for r in rows] == ["student_baseline"] * baseline + STAGES[regime]
  assert all(r["count"] == 497 and 0 <= r["accuracy"] <= 1 for r in rows)
  assert json.load(open(tmp_path / "results.json")) == rows
  assert rows[-1]["stage"] in experiment.format_table(rows)
  # The regime's own stage directory (one stage trains both networks of mutual, mean_teacher).
  stage_dir = {"mutual": "mutual", "bdkd": "mutual", "mean_teacher": "mean_teacher",
               "label_free": "label_free"}.get(regime, STAGES[regime][-1])
  record = metrics.read_jsonl(os.path.join(tmp_path, stage_dir, "metrics.jsonl"))[-1]
  assert record["step"] == 20 - 5 * (regime == "tgeo") and np.isfinite(record["train/loss"])


def test_multi_teacher_with_weights_and_meal_v2_discriminator(digits_data_dir, tmp_path):
  """Per-teacher weights and the discriminator (an ascending part) from the config."""
  config = _config(digits_data_dir, "multi_teacher", **{"student.baseline": False,
                                                        "regime.discriminator_weight": 0.5})
  with config.unlocked():
    config.regime.weights = (3.0, 1.0)
  rows = job.run(config, str(tmp_path))
  assert rows[-1]["stage"] == "student_multi_teacher"
  record = metrics.read_jsonl(os.path.join(tmp_path, "student_multi_teacher",
                                           "metrics.jsonl"))[-1]
  assert {"terms/kd_cnn", "terms/kd_mlp", "terms/meal_v2_discriminator"} <= set(record)
  assert all(np.isfinite(record[k]) for k in record)


@pytest.mark.parametrize("regime,key,value,message", [
    ("multi_teacher", "regime.teachers", {}, r"regime.teachers is empty"),
    ("multi_teacher", "regime.balance", "mtrd", r"regime.balance='mtrd' is unknown"),
    ("multi_teacher", "regime.weights", (1.0,), r"weights must be 2 non-negative numbers"),
    ("mutual", "regime.peers", {}, r"regime.peers is empty"),
    ("born_again", "regime.gt_weights", (1.0, 1.5), r"gt_weights\[1\] must be in \[0, 1\]"),
    ("tgeo", "regime.heldout_examples", 5, r"regime.heldout_examples=5 must leave"),
    ("uskd", "regime.name", "selfkd", r"regime.name='selfkd' is unknown"),
    ("mean_teacher", "regime.labeled_fraction", 0.0, r"labeled_fraction must be in \(0, 1\]"),
    ("mean_teacher", "regime.decay", 1.0, r"decay must be in \[0, 1\)"),
    ("label_free", "regime.momentum", 1.5, r"momentum must be in \[0, 1\)"),
])
def test_bad_regime_fields_fail_with_the_field(regime, key, value, message, digits_data_dir,
                                               tmp_path):
  config = _config(digits_data_dir, regime, **{"student.baseline": False})
  with config.unlocked():
    *groups, leaf = key.split(".")
    node = config
    for group in groups:
      node = node[group]
    node[leaf] = value
  with pytest.raises(ValueError, match=message):
    job.run(config, str(tmp_path))
