"""Workdirs you can trust (issue 10): one config per workdir, one run at a time, short messages
for the mistakes and operating-system errors a user meets. Each test names the item of the
issue's "Why" list it reproduces."""
import builtins
import errno
import json
import os
import signal
import subprocess
import sys
import traceback

import pytest

from configs import digits_kd
from kd_jax import config_checks, data, main, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [{"stage": "teacher", "model": "digits_cnn_teacher", "params": 29066, "accuracy": 0.9738,
         "loss": 0.1, "count": 497}]


def _config(**overrides):
  config = digits_kd.get_config("runlocal")
  with config.unlocked():
    config.update_from_flattened_dict(overrides)
  return config


def _finished(path, config):
  """A workdir as a finished run of `config` leaves it (config.json, results.json)."""
  os.makedirs(path, exist_ok=True)
  workdir.claim(str(path), workdir.config_dict(config)).release()
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(ROWS, f)


def _main(path, *flags):
  """Runs `python -m kd_jax.main` on the runlocal digits config; returns the finished process."""
  return subprocess.run([sys.executable, "-m", "kd_jax.main", "--config=configs/digits_kd.py:runlocal",
                         f"--workdir={path}", *flags], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


def _short_error(proc, *expected):
  """The process failed with one short message holding `expected`, and no traceback."""
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  message = proc.stderr.strip()
  assert message.startswith("error: ") and len(message.splitlines()) <= 8, message
  for text in expected:
    assert text in message, message
  return message


def test_1_changed_config_in_a_used_workdir_is_refused_listing_the_fields(tmp_path):
  _finished(tmp_path, _config())
  before = (tmp_path / "config.json").read_bytes()
  proc = _main(tmp_path, "--config.student.num_epochs=10", "--config.teacher.model=mlp")
  _short_error(proc, "student.num_epochs: 1 → 10", "teacher.model: 'digits_cnn_teacher' → 'mlp'",
               "fresh --workdir")
  assert "97.38" not in proc.stdout  # the old results are not passed off as the new ones
  assert (tmp_path / "config.json").read_bytes() == before  # a refused run writes nothing


def test_1_fields_that_cannot_change_results_are_not_fingerprinted(tmp_path):
  _finished(tmp_path, _config())
  changed = _config(**{"log.every_steps": 7, "checkpoint.every_steps": 3, "checkpoint.keep": 9,
                       "data.data_dir": "/elsewhere", "mesh.coordinator_address": "h:1"})
  assert workdir.check_config(str(tmp_path), workdir.config_dict(changed))
  assert workdir.config_diff(workdir.config_dict(_config()), workdir.config_dict(
      _config(**{"optim.learning_rate": 0.1}))) == ["optim.learning_rate: 0.05 → 0.1"]


def test_1_a_failing_run_writes_no_config(tmp_path):
  proc = _main(tmp_path / "w", "--config.data.batch_size=0")
  _short_error(proc, "config.data.batch_size=0", ">= 1")
  assert not (tmp_path / "w").exists()


def test_1_files_without_a_config_are_not_trusted(tmp_path):
  (tmp_path / "teacher").mkdir()
  with pytest.raises(workdir.WorkdirError, match="no config.json"):
    workdir.check_config(str(tmp_path), workdir.config_dict(_config()))


def test_2_a_second_run_is_refused_and_a_dead_holder_never_blocks(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from kd_jax import workdir; lock = workdir.Lock(sys.argv[1]); "
       "print('locked', flush=True); time.sleep(300)", str(tmp_path)],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir.WorkdirError, match=rf"in use by pid {holder.pid} on host "):
      workdir.Lock(str(tmp_path))
    _short_error(_main(tmp_path), f"in use by pid {holder.pid}", "another --workdir")
    assert not (tmp_path / "config.json").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  workdir.Lock(str(tmp_path)).release()  # the killed holder's lock is gone with it


def test_5_workdir_that_is_a_file(tmp_path):
  (tmp_path / "f").write_text("x")
  _short_error(_main(tmp_path / "f"), f"--workdir={tmp_path / 'f'} is a file")
  with pytest.raises(workdir.WorkdirError, match="is below a file"):
    workdir.check_path(str(tmp_path / "f" / "sub"))


def test_5_unknown_config_field_names_it_and_lists_the_group(tmp_path):
  _short_error(_main(tmp_path, "--config.distill.temprature=2"),
               "--config.distill.temprature: config.distill has no field 'temprature'. Its fields: ")
  config = _config()
  assert config_checks.unknown_field(config, "student.num_epoch") == (
      "--config.student.num_epoch: config.student has no field 'num_epoch'. Its fields: baseline, "
      "label_fraction, model, model_kwargs, num_epochs, omit_class, quantize. Did you mean "
      "--config.student.num_epochs or --config.teacher.num_epochs or --config.tune.num_epochs?")
  assert config_checks.unknown_field(config, "studnt.model").endswith("Did you mean --config.student?")
  assert config_checks.unknown_field(config, "student.model_kwargs.hidden_sizes") is None


def test_5_out_of_range_values():
  config = workdir.config_dict(_config())
  for field, value, text in [("data.eval_batch_size", 0, ">= 1"), ("teacher.num_epochs", 0, ">= 1"),
                             ("optim.learning_rate", 0.0, "> 0"), ("log.every_steps", 0, ">= 1")]:
    group, name = field.split(".")
    bad = {**config, group: {**config[group], name: value}}
    with pytest.raises(ValueError, match=rf"config.{field}={value} .*{text}"):
      config_checks.check_values(bad)
  config_checks.check_values(config)


def _read_only(monkeypatch, root, code=errno.EROFS):
  """Makes every write under `root` fail with `code`, as a read-only mount would (the tests run
  as root, for whom chmod does not stop writes)."""
  root = os.path.abspath(root)

  def refuse(path):
    if os.path.abspath(os.fspath(path)).startswith(root):
      raise OSError(code, os.strerror(code), os.fspath(path))

  real_open, real_makedirs, real_replace = builtins.open, os.makedirs, os.replace

  def open_(path, mode="r", *args, **kwargs):
    if set(mode) & set("wax+"):
      refuse(path)
    return real_open(path, mode, *args, **kwargs)

  def makedirs(path, *args, **kwargs):
    if not os.path.isdir(path):
      refuse(path)
    return real_makedirs(path, *args, **kwargs)

  def replace(src, dst):
    refuse(dst)
    return real_replace(src, dst)

  monkeypatch.setattr(builtins, "open", open_)
  monkeypatch.setattr(os, "makedirs", makedirs)
  monkeypatch.setattr(os, "replace", replace)


def test_5_finished_read_only_workdir_shows_its_results(tmp_path, monkeypatch, capsys):
  _finished(tmp_path, _config())
  monkeypatch.setattr(main.jax.config, "update", lambda *args: None)  # no compilation cache
  _read_only(monkeypatch, tmp_path)
  main._run(_config(), str(tmp_path))  # pylint: disable=protected-access
  assert "97.38%" in capsys.readouterr().out


@pytest.mark.parametrize("code,text", [(errno.EROFS, "read-only file system"),
                                       (errno.EACCES, "permission denied")])
def test_5_read_only_workdir_names_workdir(tmp_path, monkeypatch, code, text):
  monkeypatch.setattr(main.jax.config, "update", lambda *args: None)
  _read_only(monkeypatch, tmp_path, code)
  config = _config()
  with pytest.raises(OSError) as error:
    main._run(config, str(tmp_path / "w"))  # pylint: disable=protected-access
  message = main._message(error.value, config, str(tmp_path / "w"))  # pylint: disable=protected-access
  assert message.startswith(f"--workdir: {tmp_path / 'w'}: {text}; ") and "--workdir" in message[12:]


def test_5_os_errors_name_the_field_that_holds_the_path(tmp_path):
  paths = {"--workdir": str(tmp_path / "w"), "config.data.data_dir": str(tmp_path / "data"),
           "config.experts.directory": str(tmp_path / "w" / "experts")}
  for path, code, expected in [
      (tmp_path / "data" / "digits" / "x", errno.EROFS, "config.data.data_dir: "),
      (tmp_path / "w" / "experts" / "e.npy", errno.ENOSPC, "config.experts.directory: "),
      (tmp_path / "w" / "teacher", errno.ENOTDIR, "--workdir: "),
      (tmp_path / "other", errno.EACCES, "")]:
    message = workdir.describe_os_error(OSError(code, os.strerror(code), str(path)), paths)
    assert message.startswith(f"{expected}{path}: "), message
  assert "last complete checkpoint" in workdir.describe_os_error(
      OSError(errno.ENOSPC, "No space left", str(tmp_path / "w" / "x")), paths)
  assert workdir.describe_os_error(OSError(errno.EACCES, "denied", str(tmp_path / "other")), paths) == (
      f"{tmp_path / 'other'}: permission denied; make it writable for this user, or choose another path.")
  assert workdir.describe_os_error(OSError(errno.ENOENT, "gone", "x"), paths) is None


def test_5_missing_tfds_data_dir_makes_no_false_claim(tmp_path):
  with pytest.raises(ValueError, match="not prepared in data_dir") as error:
    data.open_source("cifar10", "train", str(tmp_path))
  shown = "".join(traceback.format_exception(error.value))
  assert "already prepared" not in shown and "tfds build cifar10" in shown
