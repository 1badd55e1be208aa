"""Every config loads (full and :runlocal); the CIFAR-100 recipe runs end to end on mock data."""
import glob
import importlib
import os

import pytest
import tensorflow_datasets as tfds

from configs import common
from kd_jax import kd_job, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not p.endswith("common.py"))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_loads_locked_with_documented_command(name):
  module = importlib.import_module(f"configs.{name}")
  assert "python -m kd_jax.main" in module.__doc__
  config = module.get_config()
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.no_such_field = 1


@pytest.mark.parametrize("teacher,student", importlib.import_module("configs.cifar100_kd").PAIRS)
def test_cifar100_recipe_matches_repdistiller(teacher, student):
  config = importlib.import_module("configs.cifar100_kd").get_config(f"teacher={teacher},student={student}")
  assert (config.teacher.num_epochs, config.student.num_epochs) == (240, 240)
  assert tuple(config.optim.decay_epochs) == (150, 180, 210) and config.optim.decay_rate == 0.1
  assert config.data.batch_size == 64 and config.optim.weight_decay == 5e-4
  ce, kd = (t.to_dict() for t in config.distill.terms)
  assert ce == {"loss": "ce", "weight": 0.1}
  assert kd == {"loss": "kd", "weight": 0.9, "hparams": {"temperature": 4.0}}
  assert config.teacher.model in models.list_models() and config.student.model in models.list_models()
  small_student = any(s in config.student.model for s in ("shufflenet", "mobilenet"))
  assert config.optim.learning_rate == (0.01 if small_student else 0.05)


def test_digits_terms_arg_builds_ce_plus_each_named_term_with_its_taps():
  config = importlib.import_module("configs.digits_kd").get_config("pair=cnn,terms=fitnet+kd")
  assert config.student.model == "digits_cnn_student"
  assert [t.loss for t in config.distill.terms] == ["ce", "fitnet", "kd"]
  assert config.distill.terms[0].weight == 0.1 and config.distill.terms[1].student == "stage1"
  dkd = importlib.import_module("configs.digits_kd").get_config("terms=dkd").distill.terms
  assert dkd[0].weight == 1.0 and dkd[1].warmup_steps == 30 * (1300 // 64) // 12
  with pytest.raises(ValueError, match="pair='resnet' is unknown; valid: mlp, cnn, vit"):
    importlib.import_module("configs.digits_kd").get_config("pair=resnet")


def test_parse_arg_rejects_unknown_names():
  assert common.parse_arg("runlocal,seed=3", runlocal=False, seed=0).to_dict() == {"runlocal": True, "seed": 3}
  with pytest.raises(ValueError, match="unknown config argument 'fast'; valid: runlocal, seed"):
    common.parse_arg("fast", runlocal=False, seed=0)


@pytest.mark.slow  # 50–100 s on 2 cores (the whole KD job on mock CIFAR-100); the recipe's values
# are checked above; run with `python -m pytest -m slow tests/test_configs.py`
def test_cifar100_runlocal_runs_on_mock_data(tmp_path):
  config = importlib.import_module("configs.cifar100_kd").get_config(
      "teacher=resnet14,student=resnet8,runlocal")  # the smallest CIFAR pair: compile time
  with config.unlocked():
    config.update_from_flattened_dict({"data.train_split": "train[:32]", "data.eval_split": "test[:16]",
                                       "data.batch_size": 8, "data.eval_batch_size": 16,
                                       "checkpoint.every_steps": 2})
  with tfds.testing.mock_data(num_examples=64):
    rows = kd_job.run(config, str(tmp_path))
  assert [r["stage"] for r in rows] == ["teacher", "student_baseline", "student_kd"]
  assert all(r["count"] == 64 for r in rows)  # mock_data ignores split slicing: 64 test examples
