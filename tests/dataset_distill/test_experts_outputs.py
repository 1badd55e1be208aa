"""Expert buffer (resume, metadata checks), distilled-set files, vmap vs sequential evaluation."""
import json

import jax
import numpy as np
import pytest

from dd_tiny_model import tiny_problem
from kd_jax.data import ArrayDataSource
from kd_jax.dataset_distill import experts as experts_lib
from kd_jax.dataset_distill.distilled_set import load_distilled, save_distilled
from kd_jax.dataset_distill.evaluate import networks_accuracy, train_networks

META = {"model": "tiny", "model_kwargs": {}, "num_classes": 3, "image_shape": [8, 8, 1]}


@pytest.fixture(scope="module")
def setup():
  return tiny_problem()


def _train(directory, setup, **overrides):
  apply_fn, init_params, images, labels = setup
  kwargs = dict(metadata=META, num_experts=2, epochs=2, lr=0.1, batch_size=5, seed=0,
                log=lambda *_: None)
  kwargs.update(overrides)
  return experts_lib.train_experts(directory, apply_fn, init_params, images, labels, **kwargs)


def test_buffer_shape_resume_and_mismatch(tmp_path, setup):
  trajectories, meta = _train(tmp_path, setup)
  assert trajectories.shape == (2, 3, meta["num_params"]) and meta["num_experts"] == 2
  assert isinstance(trajectories, np.memmap)
  assert not np.allclose(trajectories[0, 0], trajectories[0, -1])
  assert not np.allclose(trajectories[0, 0], trajectories[1, 0])  # own seeds

  # A killed run: expert 0 finished (marked), expert 1 not; the rerun keeps 0, redoes 1.
  full = np.array(trajectories)
  (tmp_path / experts_lib.TRAJECTORIES).unlink()
  (tmp_path / experts_lib.PARTS).mkdir()
  np.save(tmp_path / experts_lib.PARTS / "expert_00000.npy", full[0] + 1.0)
  resumed, _ = _train(tmp_path, setup)
  np.testing.assert_allclose(resumed[0], full[0] + 1.0)
  np.testing.assert_allclose(resumed[1], full[1], rtol=1e-6, atol=1e-7)
  assert not (tmp_path / experts_lib.PARTS).exists()

  with pytest.raises(ValueError, match=r"lr: file has 0.1, run expects 0.5"):
    _train(tmp_path, setup, lr=0.5)
  with pytest.raises(ValueError, match="model"):
    experts_lib.load_buffer(tmp_path, {**META, "model": "convnet"})
  with pytest.raises(FileNotFoundError, match="train_experts"):
    experts_lib.load_buffer(tmp_path / "nowhere")


def test_distilled_set_round_trip(tmp_path):
  images = np.random.default_rng(0).standard_normal((6, 8, 8, 1)).astype(np.float32)
  probs = np.full((6, 3), 1 / 3, np.float32)
  save_distilled(tmp_path, images=images, labels=probs, lr=0.02, metadata={"ipc": 2, **META},
                 label_logits=np.zeros((6, 3)))
  arrays, meta = load_distilled(tmp_path, {"ipc": 2})
  np.testing.assert_array_equal(arrays["images"], images)
  np.testing.assert_array_equal(arrays["labels"], probs)
  assert float(arrays["lr"]) == pytest.approx(0.02) and meta["num_images"] == 6
  source = ArrayDataSource.from_npz(tmp_path / "distilled.npz")  # usable by any kd_jax training
  assert len(source) == 6 and source[1]["label"].shape == (3,)
  assert not list(tmp_path.glob("*.tmp*"))
  with pytest.raises(ValueError, match="ipc: file has 2, run expects 10"):
    load_distilled(tmp_path, {"ipc": 10})
  json.loads((tmp_path / "distilled.json").read_text())


def test_vmap_and_sequential_train_the_same_networks(setup):
  apply_fn, init_params, images, labels = setup
  kwargs = dict(num_nets=2, lr=0.05, epochs=1, batch_size=5, seed=3)
  together = train_networks(apply_fn, init_params, images, labels, vectorize=True, **kwargs)
  apart = train_networks(apply_fn, init_params, images, labels, vectorize=False, **kwargs)
  for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(apart)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  first = max(jax.tree.leaves(together), key=lambda leaf: leaf.size)
  assert not np.allclose(first[0], first[1])  # different networks
  accs = networks_accuracy(apply_fn, together, images, labels, batch_size=5)
  assert accs.shape == (2,) and np.all((0.0 <= accs) & (accs <= 1.0))
