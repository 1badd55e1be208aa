"""The one distillation loop resumes: rerun after a kill, every method ends with the values and
metrics of an uninterrupted run; a resume into another config is refused; a NaN stops it with
the iteration named."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dd_tiny_model import tiny_model, tiny_problem
from kd_jax import checkpoint, metrics
from kd_jax.data.dsa import diff_augment
from kd_jax.dataset_distill.datm import StartWindow
from kd_jax.dataset_distill.distill import Recording, distill
from kd_jax.dataset_distill.distribution_matching import DistributionMatching
from kd_jax.dataset_distill.feature_compensator import INFER
from kd_jax.dataset_distill.gradient_matching import GradientMatching
from kd_jax.dataset_distill.method import Context, Teacher
from kd_jax.dataset_distill.recovery import SRe2LRecovery
from kd_jax.dataset_distill.trajectory_matching import TrajectoryMatching
from kd_jax.models import create_model, init_model, make_apply_fn

ITERATIONS, CHECKPOINT_EVERY = 5, 2  # checkpoints after iterations 2, 4 and 5
META = {"model": "tiny", "num_classes": 3, "image_shape": [8, 8, 1], "ipc": 4,
        "label_kind": "logits"}


@functools.cache
def _trajectories():
  """`[2 experts, 3 epochs, P]`: random walks from θ_0 of the tiny model."""
  _, params = tiny_model(jax.random.key(0))
  theta0 = np.asarray(ravel_pytree(params)[0])
  walk = np.cumsum(0.01 * np.random.default_rng(0).standard_normal((2, 3, theta0.size)), axis=1)
  return (theta0 + walk).astype(np.float32)


@functools.cache
def _bn_teacher():
  """A depth-1 BatchNorm ConvNet whose running statistics are its init's (mean 0, var 1)."""
  module = create_model("convnet", num_classes=3, depth=1, width=4, norm="batchnorm")
  params, state = init_model(module, jax.random.key(1), (1, 8, 8, 1))
  return Teacher(make_apply_fn(module), {"params": params, **state})


def _context(directory, ipc=4):
  apply_fn, init_params, images, labels = tiny_problem(num_images=30)
  return Context(train_images=images, train_labels=labels, num_classes=3, ipc=ipc,
                 apply_fn=apply_fn, init_params=init_params,
                 augment=lambda x, key: diff_augment(x, key, strategy="flip"),
                 teacher=_bn_teacher(), seed=0, workdir=directory)


def _matching(label_kind="logits"):
  return TrajectoryMatching(iterations=ITERATIONS, syn_steps=2, expert_epochs=1,
                            window=StartWindow(0, 2, 2), lr_img=10.0, lr_lr=1e-3, batch_syn=6,
                            label_kind=label_kind, trajectories=_trajectories())


def _run(directory, metadata=META, ipc=4, label_kind="logits"):
  """Distils the tiny problem in `directory`; the callback reports the images' mean as an
  evaluation."""
  callback = lambda i, values: {"eval/mean": float(jnp.mean(values["images"]))}
  return distill(_matching(label_kind), _context(directory, ipc),
                 Recording(str(directory), metadata, checkpoint_every=CHECKPOINT_EVERY),
                 callback=callback)


def _kill_after_first_checkpoint(straight_dir, resumed_dir):
  """What a run killed during iteration 3, 4 or 5 leaves: the checkpoint after iteration 2, and
  metrics (and TensorBoard events) of later iterations, which the resume must drop."""
  shutil.copytree(straight_dir, resumed_dir, dirs_exist_ok=True)
  for step in (4, 5):
    shutil.rmtree(resumed_dir / "checkpoints" / str(step))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(uninterrupted result and directory, resumed result and directory)."""
  straight_dir = tmp_path_factory.mktemp("straight")
  straight = _run(straight_dir)
  resumed_dir = tmp_path_factory.mktemp("resumed")
  _kill_after_first_checkpoint(straight_dir, resumed_dir)
  return (straight, straight_dir), (_run(resumed_dir), resumed_dir)


def test_resumed_run_ends_with_the_uninterrupted_set(runs, tmp_path):
  (straight, _), (resumed, _) = runs
  method = _matching()
  method.prepare(_context(tmp_path))
  initial = method.start(_context(tmp_path)).values
  assert not np.allclose(straight.images, initial["images"])  # it distilled
  assert not np.allclose(straight.label_logits, initial["labels"])
  for name in ("images", "labels", "label_logits", "lr"):
    np.testing.assert_array_equal(getattr(resumed, name), getattr(straight, name), err_msg=name)


def test_metrics_hold_each_iteration_once_and_match(runs):
  (_, straight_dir), (_, resumed_dir) = runs
  straight = metrics.read_jsonl(straight_dir / "metrics.jsonl")
  assert [r["step"] for r in straight] == list(range(ITERATIONS + 1))
  assert set(straight[1]) == {"step", "distill/loss", "distill/lr", "distill/start_epoch",
                              "distill/updated", "eval/mean"}
  assert metrics.read_jsonl(resumed_dir / "metrics.jsonl") == straight


def test_checkpoint_restores_the_values(runs, tmp_path):
  (straight, straight_dir), _ = runs
  method = _matching()
  method.prepare(_context(tmp_path))
  start = method.start(_context(tmp_path))
  target = {"iteration": jnp.int32(0), "values": start.values,
            "opt_states": {k: tx.init(start.values[k]) for k, tx in start.optimizers.items()},
            "method_state": {}}
  ckpt = checkpoint.Checkpointer(str(straight_dir / "checkpoints"), META)
  try:
    assert ckpt.latest_step() == ITERATIONS
    restored = ckpt.restore(target)
  finally:
    ckpt.close()
  assert int(restored["iteration"]) == ITERATIONS
  np.testing.assert_array_equal(restored["values"]["images"], straight.images)
  np.testing.assert_array_equal(restored["values"]["labels"], straight.label_logits)


@pytest.mark.parametrize("change,match", [
    (dict(ipc=3, metadata={**META, "ipc": 3}), "ipc=4 \\(this run: 3\\)"),
    (dict(label_kind="hard", metadata={**META, "label_kind": "hard"}),
     "label_kind='logits' \\(this run: 'hard'\\)"),
    (dict(ipc=3), "values.images")])  # metadata that hides a shape change
def test_resume_into_another_config_is_refused(runs, change, match):
  (_, straight_dir), _ = runs
  with pytest.raises(checkpoint.CheckpointError, match=match):
    _run(straight_dir, **change)


OTHER_METHODS = {  # ITERATIONS iterations each; DC's network carries over (state) within 2
    "dc": lambda: GradientMatching(iterations=ITERATIONS, outer_loop=3, inner_loop=2,
                                   batch_real=8, batch_train=6),
    "dm": lambda: DistributionMatching(iterations=ITERATIONS, batch_real=8),
    "sre2l": lambda: SRe2LRecovery(iterations=ITERATIONS, jitter=1),
    "infer": lambda: INFER(iterations=ITERATIONS, compensators_per_base=1, jitter=1),
}


@pytest.mark.parametrize("name", sorted(OTHER_METHODS))
def test_every_method_resumes_to_the_uninterrupted_set(name, tmp_path):
  metadata = {"method": name, "ipc": 4}
  run = lambda directory: distill(OTHER_METHODS[name](), _context(directory),
                                  Recording(str(directory), metadata,
                                            checkpoint_every=CHECKPOINT_EVERY))
  straight = run(tmp_path / "straight")
  _kill_after_first_checkpoint(tmp_path / "straight", tmp_path / "resumed")
  resumed = run(tmp_path / "resumed")
  method = OTHER_METHODS[name]()
  method.prepare(_context(tmp_path / "fresh"))
  initial = method.distilled(method.start(_context(tmp_path / "fresh")).values)
  assert not np.allclose(straight.images, initial.images)  # it distilled
  np.testing.assert_array_equal(resumed.images, straight.images)
  np.testing.assert_array_equal(resumed.labels, straight.labels)
  assert (metrics.read_jsonl(tmp_path / "resumed" / "metrics.jsonl") ==
          metrics.read_jsonl(tmp_path / "straight" / "metrics.jsonl"))


def test_a_nan_loss_stops_the_loop_naming_the_iteration(tmp_path):
  method = DistributionMatching(iterations=ITERATIONS, batch_real=8, lr_img=1e30)
  with pytest.raises(metrics.NonFiniteLossError,
                     match=r"dm: the distillation loss became (nan|inf) at iteration 1; .*"
                           r"last good checkpoint \(iteration 1\).*learning rates of \['images'\]"):
    # Iteration 0 is finite; its update (lr 1e30) sends iteration 1's loss to NaN.
    distill(method, _context(tmp_path), Recording(str(tmp_path), {"ipc": 4}, checkpoint_every=1))
