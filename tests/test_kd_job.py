"""The three-stage KD job end to end on digits: outputs, resume, faults, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import digits_kd
from kd_jax import checkpoint, experiment, kd_job, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **overrides):
  """The runlocal digits config on `data_dir`, with `{"group.field": value}` overrides."""
  config = digits_kd.get_config("runlocal")
  with config.unlocked():
    config.update_from_flattened_dict({"data.data_dir": data_dir, **overrides})
  return config


@pytest.fixture(scope="module")
def finished_run(digits_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("kd"))
  return workdir, kd_job.run(_config(digits_data_dir), workdir)


def test_job_writes_table_metrics_tensorboard_and_checkpoints(finished_run):
  workdir, rows = finished_run
  assert [r["stage"] for r in rows] == ["teacher", "student_baseline", "student_kd"]
  assert rows[0]["params"] > rows[1]["params"] == rows[2]["params"] > 0
  assert all(r["count"] == 497 for r in rows)  # every test example, padding masked out
  assert json.load(open(os.path.join(workdir, "results.json"))) == rows
  for stage in ("teacher", "student_baseline", "student_kd"):
    records = metrics.read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))
    assert records[-1]["step"] == 20 and np.isfinite(records[-1]["train/loss"])
    events = os.listdir(os.path.join(workdir, stage, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
  assert "terms/kd" in records[-1] and "terms/ce" in records[-1]
  table = experiment.format_table(rows)
  assert "student_kd" in table and "%" in table


def test_rerun_restores_finished_stages_without_training(finished_run, digits_data_dir):
  workdir, rows = finished_run
  teacher_log = os.path.join(workdir, "teacher", "metrics.jsonl")
  lines_before = len(metrics.read_jsonl(teacher_log))
  assert kd_job.run(_config(digits_data_dir), workdir) == rows
  assert len(metrics.read_jsonl(teacher_log)) == lines_before


def test_student_can_distill_from_a_teacher_checkpoint_path(finished_run, digits_data_dir, tmp_path):
  workdir, rows = finished_run
  config = _config(digits_data_dir, **{"teacher.checkpoint": os.path.join(workdir, "teacher", "checkpoints"),
                                       "student.baseline": False,
                                       "tune.validation_examples": 0})  # tuning is tested above
  new_rows = kd_job.run(config, str(tmp_path))
  assert [r["stage"] for r in new_rows] == ["teacher", "student_kd"]
  assert new_rows[0]["accuracy"] == rows[0]["accuracy"]
  assert not os.path.exists(tmp_path / "teacher")


def test_teacher_checkpoint_with_other_class_count_is_rejected(finished_run, digits_data_dir, tmp_path):
  workdir, _ = finished_run
  config = _config(digits_data_dir, **{"teacher.checkpoint": os.path.join(workdir, "teacher", "checkpoints"),
                                       "teacher.model": "digits_cnn_student"})
  with pytest.raises(checkpoint.CheckpointError, match="model='digits_cnn_teacher'.*teacher.checkpoint"):
    kd_job.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before any stage (validation runs included) trained


@pytest.mark.parametrize("key,value,message", [
    ("teacher.model", "resnet9000", r"teacher.model: unknown model 'resnet9000'; valid names: .*resnet8x4"),
    ("distill.terms", ({"loss": "kdd"},), r"distill.terms\[0\] \(kdd\): unknown loss 'kdd'; "
                                          r"valid names: .*kd"),
    ("distill.terms", ({"loss": "kd", "hparams": {"temperature": 0.0}},), r"temperature"),
    ("distill.terms", ({"loss": "sp", "student": "pre_logits", "teacher": "pre_logits",
                        "hparams": {"temperature": 4.0}},),
     r"loss 'sp' does not take 'temperature'; its hyperparameters are: p=2"),
    ("distill.terms", ({"loss": "fitnet", "student": "stage9", "teacher": "stage2"},),
     r"distill.terms\[0\] \(fitnet\): the student has no feature 'stage9'; its taps are: "
     r"logits, pre_logits, stage1"),
    ("data.name", "no_such_dataset_xyz", r"no_such_dataset_xyz"),
    ("precision", "float8", r"precision='float8' is unknown"),
    ("data.batch_size", 5000, r"data.batch_size=5000"),
])
def test_bad_config_values_fail_at_start_with_the_field(digits_data_dir, tmp_path, key, value, message):
  config = _config(digits_data_dir, **{key: value})
  with pytest.raises(ValueError, match=message):
    kd_job.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "teacher" / "checkpoints")


def test_missing_dataset_explains_how_to_prepare(tmp_path):
  config = _config(str(tmp_path / "empty_tfds"), **{"data.name": "cifar10", "data.in_memory": False})
  with pytest.raises(ValueError, match="tfds build cifar10"):
    kd_job.run(config, str(tmp_path / "work"))


def _main(workdir, data_dir, *extra):
  return [sys.executable, "-m", "kd_jax.main", "--config=configs/digits_kd.py:runlocal",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *extra]


def test_feature_terms_with_automatic_adapters_run_from_the_command_line(tmp_path, digits_data_dir):
  """KD + FitNet on a named feature pair (an adapter created for the width change) + SP on
  pre_logits, all from `--config.distill.terms`."""
  terms = ("({'loss': 'ce', 'weight': 0.1}, {'loss': 'kd', 'weight': 0.9}, "
           "{'loss': 'fitnet', 'student': 'stage1', 'teacher': 'stage2'}, "
           "{'loss': 'sp', 'student': 'pre_logits', 'teacher': 'pre_logits'})")
  command = _main(tmp_path, digits_data_dir, f"--config.distill.terms={terms}")
  command[3] = "--config=configs/digits_kd.py:runlocal,pair=cnn"
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "student_kd" in proc.stdout
  record = metrics.read_jsonl(os.path.join(tmp_path, "student_kd", "metrics.jsonl"))[-1]
  assert all(np.isfinite(record[f"terms/{name}"]) for name in ("ce", "kd", "fitnet", "sp"))
  meta = json.load(open(next((tmp_path / "student_kd" / "checkpoints").glob("*/meta/metadata"))))
  assert [t["loss"] for t in meta["terms"]] == ["ce", "kd", "fitnet", "sp"]


def test_unknown_config_key_names_the_key(tmp_path, digits_data_dir):
  proc = subprocess.run(_main(tmp_path, digits_data_dir, "--config.distill.temprature=2"),
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "temprature" in proc.stderr


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(digits_data_dir, tmp_path):
  from kd_jax import data, models, optim, trainer  # pylint: disable=g-import-not-at-top
  from kd_jax.distiller import supervised  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  images, labels = data.load_arrays("digits", "train", digits_data_dir)
  source = data.ArrayDataSource(images.astype(np.float32), labels)

  def batches(start):  # real batches, then NaN images from step 13 on (batch index 12)
    for step, batch in enumerate(data.train_batches(source, batch_size=32, seed=0, start_step=start), start):
      if step >= 12:
        batch["image"] = np.full_like(batch["image"], np.nan)
      yield batch

  module = models.create_model("digits_cnn_student", num_classes=10)
  params, model_state = models.init_model(module, jax.random.PRNGKey(0), (1, 8, 8, 1))
  stage = trainer.Stage("student", supervised(models.make_apply_fn(module)),
                        {"student": {"params": params, **model_state}},
                        {"model": "digits_cnn_student", "num_classes": 10, "image_shape": [8, 8, 1]},
                        optim.make_optimizer(
                            name="sgd", schedule=optim.make_schedule(
                                name="constant", learning_rate=0.01, total_steps=40, steps_per_epoch=40)),
                        num_steps=40)
  options = trainer.LoopOptions(log_every=5, checkpoint_every=10, tensorboard=False)
  with pytest.raises(metrics.NonFiniteLossError, match=r"at step 13\b.*last good checkpoint \(step 10\)"):
    trainer.train(stage, str(tmp_path), batches, options)
  assert sorted(int(d) for d in os.listdir(tmp_path / "student" / "checkpoints") if d.isdigit()) == [10]


def test_killed_run_resumes_to_identical_results(finished_run, digits_data_dir, tmp_path):
  """SIGKILL mid-way through the baseline student; the rerun must finish with the same numbers."""
  _, uninterrupted = finished_run
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_main(workdir, digits_data_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  marker = workdir / "student_baseline" / "checkpoints" / "8"
  deadline = time.time() + 400
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert marker.exists(), "the run never reached its first student checkpoint"
  assert not (workdir / "results.json").exists()
  resumed = subprocess.run(_main(workdir, digits_data_dir), cwd=ROOT, capture_output=True, text=True,
                           timeout=400)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "student_kd" in resumed.stdout
  assert json.load(open(workdir / "results.json")) == uninterrupted


def test_each_arm_gets_its_recipe_from_validation_only(finished_run):
  """Every arm × recipe trains on train[:1000] against a teacher of train[:1000]; each arm's
  best validation recipe is the one its test row names."""
  workdir, rows = finished_run
  record = json.load(open(os.path.join(workdir, "validation.json")))
  assert record["train_examples"] == 1000 and record["validation_examples"] == 300
  slugs = [r["slug"] for r in record["grid"]]
  assert slugs == ["crop0_lr0.05_ep1", "crop1_lr0.05_ep1"]
  by_slug = {r.slug: r for r in kd_job.recipe_grid(_config(None))}
  for row in rows[1:]:
    scores = record["accuracy"][row["stage"]]
    assert list(scores) == slugs
    best = max(slugs, key=scores.get)
    assert record["chosen"][row["stage"]] == best and row["recipe"] == str(by_slug[best])
  # 1000 examples / 64 = 15 steps per epoch on the validation side, 1300 / 64 = 20 on test.
  last = lambda stage: metrics.read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))[-1]
  assert last("validation/teacher")["step"] == 15 and last("teacher")["step"] == 20
  assert last("validation/student_kd/crop1_lr0.05_ep1")["step"] == 15


def test_omitted_class_and_label_fraction_shape_the_transfer_sets(digits_data_dir, tmp_path,
                                                                   monkeypatch):
  """Students never see the omitted class; with `teacher.on_label_subset` the teacher trains on
  the same stratified half (all classes); the `+bias` rows raise only that class's recall."""
  from kd_jax import data  # pylint: disable=g-import-not-at-top
  seen = []
  real = data.train_batches

  def recording(source, **kwargs):
    seen.append(data.class_ids(source))
    return real(source, **kwargs)

  monkeypatch.setattr(data, "train_batches", recording)
  config = _config(digits_data_dir, **{"student.omit_class": 3, "student.label_fraction": 0.5,
                                       "teacher.on_label_subset": True})
  rows = kd_job.run(config, str(tmp_path))
  teachers = [labels for labels in seen if 3 in labels]
  students = [labels for labels in seen if 3 not in labels]
  labels = data.load_arrays("digits", "train", digits_data_dir)[1]
  halves = {len(data.stratified_fraction(labels[:n], 0.5, seed=0)) for n in (1000, 1300)}
  assert {len(t) for t in teachers} == halves  # half of train[:1000], half of train
  assert students and all(len(s) < max(halves) for s in students)
  assert [r["stage"] for r in rows] == ["teacher", "student_baseline", "student_baseline+bias",
                                        "student_kd", "student_kd+bias"]
  for plain, corrected in (rows[1:3], rows[3:5]):
    assert corrected["class_bias"] >= 0
    assert corrected["omitted_class_accuracy"] >= plain["omitted_class_accuracy"]
  assert "omitted" in experiment.format_table(rows)


@pytest.mark.parametrize("key,value,message", [
    ("student.omit_class", 10, r"student.omit_class must be -1 \(none\) or a class in 0..9"),
    ("student.label_fraction", 0.0, r"student.label_fraction must be in \(0, 1\]"),
    ("tune.validation_examples", 1290, r"tune.validation_examples=1290 must leave"),
    ("tune.learning_rate", (), r"tune.learning_rate is empty"),
])
def test_bad_transfer_set_and_tuning_fields_fail_at_start(digits_data_dir, tmp_path, key, value,
                                                          message):
  with pytest.raises(ValueError, match=message):
    kd_job.run(_config(digits_data_dir, **{key: value}), str(tmp_path))
