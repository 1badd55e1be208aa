"""Orbax checkpoints: round trip, keep-last-k, metadata and shape checks, corrupt files."""
import glob
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import checkpoint

META = {"model": "mlp", "model_kwargs": {"hidden_sizes": (64,)}, "num_classes": 10,
        "image_shape": [8, 8, 1]}


@flax.struct.dataclass
class _State:  # like a train state: attribute, dict and tuple (optax) paths
  step: jax.Array
  params: dict
  opt_state: tuple


def _state(scale=1.0, rows=3, step=0):
  params = {"w": jnp.full((rows, 2), scale), "b": jnp.zeros(2)}
  return _State(jnp.int32(step), params, optax.sgd(0.1, momentum=0.9).init(params))


def _saved(path, steps, rows=3, metadata=META):
  ckpt = checkpoint.Checkpointer(str(path), metadata)
  for step in steps:
    ckpt.save(step, _state(float(step), rows, step))
  ckpt.close()
  return checkpoint.Checkpointer(str(path), metadata)


def _truncate_arrays(step_dir):
  """Cuts every array data file of one step in half."""
  files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  assert files
  for name in files:
    os.truncate(name, os.path.getsize(name) // 2)


def test_round_trip_and_keep_last_k(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), META, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(float(step), step=step))
  ckpt.wait()
  assert sorted(int(d) for d in os.listdir(tmp_path / "ck") if d.isdigit()) == [2, 3]
  restored = ckpt.restore(_state(0.0))
  assert int(restored.step) == 3
  np.testing.assert_array_equal(restored.params["w"], np.full((3, 2), 3.0))
  ckpt.close()


def test_metadata_mismatch_lists_every_differing_key(tmp_path):
  _saved(tmp_path / "ck", [1], metadata={**META, "num_classes": 100, "adapters": ["a"]}).close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), META)
  with pytest.raises(checkpoint.CheckpointError) as error:
    ckpt.restore(_state())
  ckpt.close()
  message = str(error.value)
  assert "adapters=['a'] (this run: '(missing)')" in message
  assert "num_classes=100 (this run: 10)" in message
  assert "model=" not in message and "kd_jax_version" not in message


def test_restore_variables_checks_class_count_and_shapes(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), META)
  ckpt.save(5, {"trainable": {"student": {"w": jnp.full((3, 2), 2.0)}},  # a step.TrainState's layout
                "extra": {"model_state": {"student": {"batch_stats": {"m": jnp.ones(2)}}}}})
  ckpt.close()
  target = {"params": {"w": jnp.zeros((3, 2))}, "batch_stats": {"m": jnp.zeros(2)}}
  variables = checkpoint.restore_variables(str(tmp_path / "ck"), META, target)
  np.testing.assert_array_equal(variables["params"]["w"], np.full((3, 2), 2.0))
  with pytest.raises(checkpoint.CheckpointError, match="num_classes=10 .*teacher.checkpoint"):
    checkpoint.restore_variables(str(tmp_path / "ck"), {**META, "num_classes": 3}, target)
  wrong = {**target, "params": {"w": jnp.zeros((4, 2))}}
  with pytest.raises(checkpoint.CheckpointError, match="incompatible"):
    checkpoint.restore_variables(str(tmp_path / "ck"), META, wrong)
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.restore_variables(str(tmp_path / "missing"), META, target)


def test_corrupt_newest_step_falls_back_and_is_moved_aside(tmp_path, capsys):
  ckpt = _saved(tmp_path / "ck", [2, 4, 6])
  _truncate_arrays(tmp_path / "ck" / "6")
  with pytest.raises(checkpoint.CorruptCheckpointError, match="ck/6 is corrupt"):
    ckpt.restore(_state(0.0), 6)
  state, step = ckpt.restore_latest(_state(0.0))
  ckpt.close()
  assert step == 4 and int(state.step) == 4
  np.testing.assert_array_equal(state.params["w"], np.full((3, 2), 4.0))
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and "ck/6 is corrupt" in lines[0] and "previous step" in lines[0]
  moved = os.listdir(tmp_path / "ck" / "corrupt")
  assert len(moved) == 1 and moved[0].startswith("6-")  # moved, never deleted
  assert os.listdir(tmp_path / "ck" / "corrupt" / moved[0] / "state")
  assert sorted(int(d) for d in os.listdir(tmp_path / "ck") if d.isdigit()) == [2, 4]


def test_missing_metadata_counts_as_corrupt(tmp_path):
  ckpt = _saved(tmp_path / "ck", [1, 2])
  os.remove(tmp_path / "ck" / "2" / "meta" / "metadata")
  assert ckpt.restore_latest(_state(0.0))[1] == 1
  ckpt.close()


def test_no_intact_step_stops_unless_starting_over(tmp_path):
  ckpt = _saved(tmp_path / "ck", [1, 2])
  for step in ("1", "2"):
    _truncate_arrays(tmp_path / "ck" / step)
  with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint is left.*Rerun"):
    ckpt.restore_latest(_state(0.0))
  assert len(os.listdir(tmp_path / "ck" / "corrupt")) == 2
  assert ckpt.restore_latest(_state(0.0)) == (None, None)  # the rerun starts the stage over
  ckpt.close()
  ckpt = _saved(tmp_path / "ck2", [1])
  _truncate_arrays(tmp_path / "ck2" / "1")
  assert ckpt.restore_latest(_state(0.0), start_over=True) == (None, None)
  ckpt.close()


def test_shape_change_names_the_arrays_and_moves_nothing(tmp_path):
  ckpt = _saved(tmp_path / "ck", [400, 600], rows=3)
  with pytest.raises(checkpoint.CheckpointError) as error:
    ckpt.restore_latest(_state(0.0, rows=4))
  ckpt.close()
  message = str(error.value)
  assert not isinstance(error.value, checkpoint.CorruptCheckpointError)
  assert f"checkpoints in {tmp_path / 'ck'} were written for another model" in message
  assert "params.w=(3, 2) (this run: (4, 2))" in message
  assert "opt_state.0.trace.w=(3, 2)" in message
  assert "delete" not in message.lower() and "strict" not in message and "/600" not in message
  assert sorted(os.listdir(tmp_path / "ck")) == ["400", "600"]


def test_disk_errors_become_os_errors_naming_a_path():
  text = ("RESOURCE_EXHAUSTED: Error writing local file \"/w/teacher/checkpoints/20/x\": Failed to "
          "write 3603 bytes to file 5: No space left on device [os_error_code='28']")
  for raised, filename in [(ValueError(text), "/w/teacher/checkpoints/20/x"),
                           (OSError(28, "No space left on device"), "/w/ck")]:
    with pytest.raises(OSError) as error:
      with checkpoint.naming_os_errors("/w/ck"):
        raise raised
    assert error.value.errno == 28 and error.value.filename == filename
  with pytest.raises(ValueError, match="other"):
    with checkpoint.naming_os_errors("/w/ck"):
      raise ValueError("other")


def test_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="checkpoint.keep"):
    checkpoint.Checkpointer(str(tmp_path / "ck"), META, keep=0)
