"""Orbax checkpoints: round trip, keep-last-k, metadata checks, corrupt files."""
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import checkpoint
from kd_jax.train_step import TrainState

META = {"model": "mlp", "num_classes": 10, "image_shape": [8, 8, 1]}


def _state(scale=1.0):
  params = {"w": jnp.full((3, 2), scale), "b": jnp.zeros(2)}
  return TrainState.create(params, {"batch_stats": {"m": jnp.ones(2)}}, optax.sgd(0.1, momentum=0.9))


def test_round_trip_and_keep_last_k(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), META, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(float(step)).replace(step=jnp.int32(step)))
  ckpt.wait()
  assert sorted(int(d) for d in os.listdir(tmp_path / "ck") if d.isdigit()) == [2, 3]
  restored = ckpt.restore(_state(0.0))
  assert int(restored.step) == 3
  np.testing.assert_array_equal(restored.params["w"], np.full((3, 2), 3.0))
  ckpt.close()


def test_metadata_mismatch_names_the_field(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), META)
  ckpt.save(1, _state())
  ckpt.close()
  other = checkpoint.Checkpointer(str(tmp_path / "ck"), {**META, "num_classes": 100})
  with pytest.raises(checkpoint.CheckpointError, match="num_classes=10.*expects num_classes=100"):
    other.restore(_state())
  other.close()


def test_restore_variables_checks_class_count_and_shapes(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), META)
  ckpt.save(5, _state(2.0))
  ckpt.close()
  target = {"params": {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, "batch_stats": {"m": jnp.zeros(2)}}
  variables = checkpoint.restore_variables(str(tmp_path / "ck"), META, target)
  np.testing.assert_array_equal(variables["params"]["w"], np.full((3, 2), 2.0))
  with pytest.raises(checkpoint.CheckpointError, match="teacher.checkpoint"):
    checkpoint.restore_variables(str(tmp_path / "ck"), {**META, "num_classes": 3}, target)
  wrong = {**target, "params": {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}}
  with pytest.raises(checkpoint.CheckpointError, match="incompatible"):
    checkpoint.restore_variables(str(tmp_path / "ck"), META, wrong)
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.restore_variables(str(tmp_path / "missing"), META, target)


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), META)
  ckpt.save(1, _state())
  ckpt.close()
  for root, _, files in os.walk(tmp_path / "ck" / "1" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
    checkpoint.Checkpointer(str(tmp_path / "ck"), META).restore(_state())


def test_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="checkpoint.keep"):
    checkpoint.Checkpointer(str(tmp_path / "ck"), META, keep=0)
