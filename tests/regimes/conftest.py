"""Shared pieces of the regime tests: tiny digits models, batches, and a kill-and-resume check
through `trainer.train`."""
import functools

import chex
import jax
import pytest

from kd_jax import data, models, trainer

BATCH = 16


@functools.cache
def _model(name: str, classes: int, seed: int, kwargs: tuple):
  module = models.create_model(name, num_classes=classes, **dict(kwargs))
  params, state = models.init_model(module, jax.random.key(seed), (1, 8, 8, 1))
  return models.make_apply_fn(module), {"params": params, **state}


@pytest.fixture(scope="session")
def model():
  """`model(name, classes=10, seed=0, **kwargs) -> (apply_fn, variables)` of a registered
  model on 8×8×1 digits (cached: the step donates its state, so tests copy what they train)."""
  return lambda name, classes=10, seed=0, **kwargs: _model(name, classes, seed,
                                                           tuple(sorted(kwargs.items())))


@pytest.fixture(scope="module")
def train_batches(digits_data_dir):
  """`start -> iterator` of deterministic digits batches of 16, as the job feeds `trainer.train`."""
  source = data.open_source("digits", "train", digits_data_dir)
  info = data.dataset_info("digits", digits_data_dir)
  return lambda start: data.train_batches(source, batch_size=BATCH, seed=0, start_step=start,
                                          mean=info.mean, std=info.std, prefetch=0)


@pytest.fixture(scope="module")
def batches(train_batches):
  it = train_batches(0)
  return [next(it) for _ in range(3)]


def _final_state(stage: trainer.Stage, workdir: str, train_batches):
  return trainer.final_state(stage, workdir, next(train_batches(0)))


@pytest.fixture
def resumed_equals_uninterrupted(tmp_path, train_batches):
  """`check(make_stage) -> state`: `make_stage(num_steps)` trained 4 steps straight, and 2 steps
  then resumed to 4 in another workdir, must checkpoint identical states; returns that state."""

  def check(make_stage):
    options = trainer.LoopOptions(log_every=1, checkpoint_every=2, tensorboard=False)
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    trainer.train(make_stage(4), straight, train_batches, options)
    trainer.train(make_stage(2), interrupted, train_batches, options)
    trainer.train(make_stage(4), interrupted, train_batches, options)
    state = _final_state(make_stage(4), straight, train_batches)
    assert int(state.step) == 4
    chex.assert_trees_all_equal(state, _final_state(make_stage(4), interrupted, train_batches))
    return state

  return check

