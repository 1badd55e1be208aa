"""The matching loop resumes: rerun after a kill, it ends with the images, labels, α and
metrics of an uninterrupted run; a resume into another config is refused."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from dd_tiny_model import tiny_model
from kd_jax import checkpoint, metrics
from kd_jax.data.dsa import diff_augment
from kd_jax.dataset_distill.datm import StartWindow
from kd_jax.dataset_distill.distill import MatchingConfig, Recording, SyntheticSet, distill

ITERATIONS, CHECKPOINT_EVERY = 5, 2  # checkpoints after iterations 2, 4 and 5
META = {"model": "tiny", "num_classes": 3, "image_shape": [8, 8, 1], "ipc": 4,
        "label_kind": "logits"}
CONFIG = MatchingConfig(iterations=ITERATIONS, syn_steps=2, expert_epochs=1,
                        window=StartWindow(0, 2, 2), batch_syn=6, lr_img=10.0, lr_lr=1e-3)


@functools.cache
def _model():
  """(apply_fn, unravel, trajectories `[2 experts, 3 epochs, P]`: random walks from θ_0)."""
  apply_fn, params = tiny_model(jax.random.key(0))
  theta0, unravel = ravel_pytree(params)
  walk = np.cumsum(0.01 * np.random.default_rng(0).standard_normal((2, 3, theta0.size)), axis=1)
  return apply_fn, unravel, (np.asarray(theta0) + walk).astype(np.float32)


def _initial_set(num_images=12, label_kind="logits"):
  images = np.random.default_rng(1).standard_normal((num_images, 8, 8, 1)).astype(np.float32)
  class_ids = np.arange(num_images) % 3
  labels = 2 * np.eye(3, dtype=np.float32)[class_ids] if label_kind == "logits" else class_ids
  return SyntheticSet(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(0.01), label_kind)


def _run(directory, metadata=META, **initial):
  """Distils the tiny problem in `directory`; the callback reports the images' mean as an
  evaluation."""
  apply_fn, unravel, trajectories = _model()
  callback = lambda i, s: {"eval/mean": float(jnp.mean(s.images))}
  return distill(trajectories, apply_fn, unravel, _initial_set(**initial), CONFIG,
                 Recording(str(directory), metadata, checkpoint_every=CHECKPOINT_EVERY),
                 augment=lambda x, key: diff_augment(x, key, strategy="flip"),
                 callback=callback)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(uninterrupted result and directory, resumed result and directory)."""
  straight_dir = tmp_path_factory.mktemp("straight")
  straight = _run(straight_dir)
  # What a run killed during iteration 3, 4 or 5 leaves: the checkpoint after iteration 2, and
  # metrics (and TensorBoard events) of later iterations, which the resume must drop.
  resumed_dir = tmp_path_factory.mktemp("resumed")
  shutil.copytree(straight_dir, resumed_dir, dirs_exist_ok=True)
  for step in (4, 5):
    shutil.rmtree(resumed_dir / "checkpoints" / str(step))
  return (straight, straight_dir), (_run(resumed_dir), resumed_dir)


def test_resumed_run_ends_with_the_uninterrupted_set(runs):
  (straight, _), (resumed, _) = runs
  initial = _initial_set()
  assert not np.allclose(straight.images, initial.images)  # it distilled
  assert not np.allclose(straight.labels, initial.labels)
  for name in ("images", "labels", "lr"):
    np.testing.assert_array_equal(getattr(resumed, name), getattr(straight, name), err_msg=name)


def test_metrics_hold_each_iteration_once_and_match(runs):
  (_, straight_dir), (_, resumed_dir) = runs
  straight = metrics.read_jsonl(straight_dir / "metrics.jsonl")
  assert [r["step"] for r in straight] == list(range(ITERATIONS + 1))
  assert set(straight[1]) == {"step", "distill/loss", "distill/lr", "distill/start_epoch",
                              "distill/updated", "eval/mean"}
  assert metrics.read_jsonl(resumed_dir / "metrics.jsonl") == straight


def test_checkpoint_restores_the_set_with_its_shapes(runs):
  (straight, straight_dir), _ = runs
  values = {"images": straight.images, "labels": straight.labels, "lr": straight.lr}
  target = {"iteration": jnp.int32(0), "values": values,
            "opt_states": {k: optax.sgd(1.0, momentum=0.5).init(v) for k, v in values.items()}}
  ckpt = checkpoint.Checkpointer(str(straight_dir / "checkpoints"), META)
  try:
    assert ckpt.latest_step() == ITERATIONS
    restored = ckpt.restore(target)
  finally:
    ckpt.close()
  assert int(restored["iteration"]) == ITERATIONS
  for name, value in restored["values"].items():
    np.testing.assert_array_equal(value, values[name], err_msg=name)


@pytest.mark.parametrize("change,match", [
    (dict(num_images=9, metadata={**META, "ipc": 3}), "ipc=4 \\(this run: 3\\)"),
    (dict(label_kind="hard", metadata={**META, "label_kind": "hard"}),
     "label_kind='logits' \\(this run: 'hard'\\)"),
    (dict(num_images=9), "values.images")])  # metadata that hides a shape change
def test_resume_into_another_config_is_refused(runs, change, match):
  (_, straight_dir), _ = runs
  with pytest.raises(checkpoint.CheckpointError, match=match):
    _run(straight_dir, **change)
