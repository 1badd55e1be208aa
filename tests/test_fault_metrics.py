"""Metrics stay exact after a resume (issue 10, "Why" item 4): a killed run logged steps past its
last checkpoint; the resumed run logs them again, and no step may appear twice."""
import os

from kd_jax import metrics


def _log(directory, steps, value, **kwargs):
  writer = metrics.MetricWriter(str(directory), **kwargs)
  for step in steps:
    writer.write(step, {"train/loss": value + step})
  writer.close()


def _event_steps(directory):
  """Scalar steps of each event file, oldest file first."""
  return [[int(e.step) for _, e in metrics._events(path) if e.summary.value]  # pylint: disable=protected-access
          for path in metrics._event_files(str(directory))]  # pylint: disable=protected-access


def test_resume_truncates_jsonl_and_earlier_event_files(tmp_path):
  _log(tmp_path, range(20, 161, 20), 0.0)  # killed at 160, last checkpoint at 80
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 180, "train/lo')  # a line cut short by the kill
  _log(tmp_path, range(100, 161, 20), 1000.0, start_step=80)
  records = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in records] == [20, 40, 60, 80, 100, 120, 140, 160]
  assert [r["train/loss"] for r in records][3:5] == [80.0, 1100.0]
  assert _event_steps(tmp_path / "tensorboard") == [[20, 40, 60, 80], [100, 120, 140, 160]]
  scalars = metrics.read_tensorboard(str(tmp_path / "tensorboard"))["train/loss"]
  assert scalars == [(s, float(s)) for s in (20, 40, 60, 80)] + [
      (s, 1000.0 + s) for s in (100, 120, 140, 160)]
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_fresh_start_clears_a_run_killed_before_its_first_checkpoint(tmp_path):
  _log(tmp_path, [0, 4, 8], 0.0)
  _log(tmp_path, [0, 4], 10.0, start_step=0)
  assert metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) == [
      {"step": 0, "train/loss": 10.0}, {"step": 4, "train/loss": 14.0}]
  assert metrics.read_tensorboard(str(tmp_path / "tensorboard")) == {
      "train/loss": [(0, 10.0), (4, 14.0)]}


def test_reader_keeps_the_newest_file_for_a_repeated_step(tmp_path):
  _log(tmp_path, [10, 20], 0.0)
  _log(tmp_path, [20], 5.0)  # appended without start_step, as a kd_jax before the clean-up did
  assert metrics.read_tensorboard(str(tmp_path / "tensorboard")) == {
      "train/loss": [(10, 10.0), (20, 25.0)]}


def test_event_file_cut_short_is_read_up_to_the_cut(tmp_path):
  _log(tmp_path, [1, 2, 3], 0.0)
  (path,) = metrics._event_files(str(tmp_path / "tensorboard"))  # pylint: disable=protected-access
  os.truncate(path, os.path.getsize(path) - 5)
  assert metrics.read_tensorboard(str(tmp_path / "tensorboard")) == {
      "train/loss": [(1, 1.0), (2, 2.0)]}
  _log(tmp_path, [3], 0.0, start_step=2)
  assert [s for s, _ in metrics.read_tensorboard(str(tmp_path / "tensorboard"))["train/loss"]] == [1, 2, 3]
