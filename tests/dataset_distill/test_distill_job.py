"""The distill_dataset job end to end on digits (runlocal): a teacher-driven method, both label
protocols, the files it writes; the teacher trains once and another recipe is refused."""
import dataclasses
import json

import numpy as np
import pytest

from configs import dd_digits
from kd_jax import metrics
from kd_jax.dataset_distill import run as run_lib
from kd_jax.dataset_distill.distilled_set import load_distilled
from kd_jax.dataset_distill.teacher import TeacherRecipe, teacher_accuracy, train_teacher


@pytest.fixture(scope="module")
def rded_job(tmp_path_factory, digits_data_dir):
  config = dd_digits.get_config("runlocal,method=rded,teacher_labels,ipc1")
  with config.unlocked():
    config.data.data_dir = digits_data_dir
  workdir = tmp_path_factory.mktemp("rded")
  return config, workdir, run_lib.run(config, workdir)


def test_both_protocols_are_reported(rded_job):
  _, _, results = rded_job
  assert results["method"] == "rded" and results["protocols"] == ["labels", "teacher"]
  assert 0.0 <= results["teacher_accuracy"] <= 1.0
  for r in (results["distilled_fixed_lr"], results["random_real"],
            results["teacher_protocol"]["distilled"], results["teacher_protocol"]["random_real"]):
    assert len(r["accuracies"]) == 2 and r["mean"] == pytest.approx(np.mean(r["accuracies"]))
  assert "learned_lr" not in results  # RDED learns no α
  text = run_lib.format_results(results)
  assert "[labels]  distilled, fixed lr:" in text and "[teacher soft labels]  distilled:" in text


def test_outputs_name_the_method_and_its_storage(rded_job):
  _, workdir, results = rded_job
  arrays, metadata = load_distilled(workdir)
  assert arrays["images"].shape == (10, 8, 8, 1) and list(arrays["labels"]) == list(range(10))
  assert metadata["method"] == "rded" and metadata["stored_floats"] == 10 * 64
  assert json.loads((workdir / "results.json").read_text())["stored_floats"] == 640
  assert (workdir / "synthetic_images.png").stat().st_size > 0
  assert (workdir / "teacher" / "checkpoints").is_dir()


def test_the_teacher_is_trained_once(rded_job):
  """Calling the job's teacher training again restores the finished teacher (no new steps)."""
  config, workdir, results = rded_job
  t = config.teacher
  recipe = TeacherRecipe(model=t.model.name, model_kwargs=dict(t.model.kwargs), epochs=t.epochs,
                         lr=t.lr, batch_size=t.batch_size, weight_decay=t.weight_decay,
                         crop_padding=t.crop_padding)
  _, (train_x, train_y), (test_x, test_y), _ = run_lib._load_data(config)  # pylint: disable=protected-access
  logged = metrics.read_jsonl(workdir / "teacher" / "metrics.jsonl")
  teacher = train_teacher(recipe, workdir, train_x, train_y, num_classes=10,
                          metadata={"dataset": "digits", "train_split": "train", "zca": False},
                          seed=config.seed)
  assert metrics.read_jsonl(workdir / "teacher" / "metrics.jsonl") == logged
  assert teacher_accuracy(teacher, test_x, test_y) == results["teacher_accuracy"]
  with pytest.raises(Exception, match="epochs"):  # another recipe is refused, not reused
    train_teacher(dataclasses.replace(recipe, epochs=2), workdir, train_x, train_y,
                  num_classes=10, metadata={"dataset": "digits", "train_split": "train",
                                            "zca": False}, seed=config.seed)
