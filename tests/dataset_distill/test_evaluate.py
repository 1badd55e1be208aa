"""K-network evaluation: together = one after another = on a mesh (with DSA); bad meshes raise;
a new lr or epoch count reuses the compiled steps; the teacher soft-label protocol."""
# pylint: disable=protected-access
import jax
import numpy as np
import pytest

from dd_tiny_model import tiny_problem
from kd_jax.data.dsa import diff_augment
from kd_jax.dataset_distill import evaluate
from kd_jax.dataset_distill.method import Teacher
from kd_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def setup():
  dsa = lambda x, key: diff_augment(x, key, strategy="flip_cutout")  # per-image draws
  return (*tiny_problem(), dsa)


NETS_ON_MESH = dict(num_nets=8, lr=0.05, epochs=2, batch_size=5)


@pytest.fixture(scope="module")
def one_device(setup):
  """(params, accuracies) of the networks of NETS_ON_MESH trained on one device."""
  apply_fn, init_params, images, labels, dsa = setup
  params = evaluate.train_networks(apply_fn, init_params, images, labels, augment=dsa,
                                   **NETS_ON_MESH)
  return params, evaluate.networks_accuracy(apply_fn, params, images, labels)


def test_together_with_shared_dsa_equals_one_after_another(setup):
  apply_fn, init_params, images, labels, dsa = setup
  kwargs = dict(num_nets=3, lr=0.05, epochs=2, batch_size=5, augment=dsa, seed=1)
  together = evaluate.train_networks(apply_fn, init_params, images, labels, **kwargs)
  apart = evaluate.train_networks(apply_fn, init_params, images, labels, vectorize=False,
                                  **kwargs)
  for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(apart)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axes", [(("data", 8),), (("data", 4), ("fsdp", 2))])
def test_sharded_networks_equal_one_device(setup, one_device, axes):
  apply_fn, init_params, images, labels, dsa = setup
  mesh = make_mesh(axes)
  params, accuracies = one_device
  sharded = evaluate.train_networks(apply_fn, init_params, images, labels, augment=dsa,
                                    mesh=mesh, **NETS_ON_MESH)
  leaf = jax.tree.leaves(sharded)[0]
  assert leaf.sharding.spec[0] == "data" and len(leaf.sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  result = evaluate.evaluate_set(apply_fn, init_params, images, labels, images, labels,
                                 augment=dsa, mesh=mesh, **NETS_ON_MESH)
  np.testing.assert_allclose(result["accuracies"], accuracies, rtol=1e-5)


def test_bad_mesh_or_arguments_raise(setup):
  apply_fn, init_params, images, labels, _ = setup
  kwargs = dict(lr=0.05, epochs=1, batch_size=5)
  with pytest.raises(ValueError, match=r"eval.num_nets=6 .* size 4"):
    evaluate.train_networks(apply_fn, init_params, images, labels, num_nets=6,
                            mesh=make_mesh((("data", 4), ("fsdp", 2))), **kwargs)
  with pytest.raises(ValueError, match="'data' axis"):
    evaluate.train_networks(apply_fn, init_params, images, labels, num_nets=8,
                            mesh=make_mesh((("fsdp", 8),)), **kwargs)
  with pytest.raises(ValueError, match="vectorize=True"):
    evaluate.train_networks(apply_fn, init_params, images, labels, num_nets=8, vectorize=False,
                            mesh=make_mesh((("data", 8),)), **kwargs)
  with pytest.raises(ValueError, match="lr must be > 0"):
    evaluate.train_networks(apply_fn, init_params, images, labels, num_nets=2,
                            **{**kwargs, "lr": -0.01})


def test_new_lr_or_epochs_reuse_the_compiled_steps(setup):
  apply_fn, init_params, images, labels, dsa = setup
  mesh = make_mesh((("data", 2), ("fsdp", 4)))
  run = lambda lr, epochs, **kw: evaluate.train_networks(
      apply_fn, init_params, images, labels, num_nets=2, lr=lr, epochs=epochs, batch_size=5,
      augment=dsa, **kw)
  jitted = [evaluate._init_states, evaluate._network_batches, evaluate._network_update,
            evaluate._sharded_networks_step]
  first = run(0.05, 1), run(0.05, 1, mesh=mesh)
  compiled = [f._cache_size() for f in jitted]
  second = run(0.01, 3), run(0.01, 3, mesh=mesh)
  assert [f._cache_size() for f in jitted] == compiled
  kernel = lambda params: max(jax.tree.leaves(params), key=lambda leaf: leaf.size)
  for a, b in zip(first, second):
    assert not np.allclose(kernel(a), kernel(b))


def _teacher(apply_fn, init_params):
  """A fixed random network as the teacher (logits scaled up so its labels are not uniform)."""
  scaled = lambda variables, x, **kw: (lambda out: (out[0].replace(logits=5 * out[0].logits),
                                                    out[1]))(apply_fn(variables, x, **kw))
  return Teacher(scaled, {"params": init_params(jax.random.key(42))})


def test_teacher_protocol_at_t1_equals_training_on_the_teachers_probabilities(setup):
  """KD at T = 1 is the cross-entropy to the teacher's probabilities plus a constant: without
  augmentation the teacher protocol trains the same networks as its precomputed soft labels."""
  apply_fn, init_params, images, labels, _ = setup
  teacher = _teacher(apply_fn, init_params)
  probs = jax.nn.softmax(teacher.apply_fn(teacher.variables, images, train=False)[0].logits)
  kwargs = dict(num_nets=2, lr=0.05, epochs=3, batch_size=5)
  relabelled = evaluate.train_networks(apply_fn, init_params, images, labels, teacher=teacher,
                                       temperature=1.0, **kwargs)
  precomputed = evaluate.train_networks(apply_fn, init_params, images, np.asarray(probs),
                                        **kwargs)
  hard = evaluate.train_networks(apply_fn, init_params, images, labels, **kwargs)
  for a, b, c in zip(*map(jax.tree.leaves, (relabelled, precomputed, hard))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert not all(np.allclose(a, c, atol=1e-3) for a, c in
                 zip(jax.tree.leaves(relabelled), jax.tree.leaves(hard)))


def test_teacher_protocol_labels_each_augmented_batch(setup):
  """With DSA the teacher sees the augmented batch: its labels differ from labels precomputed
  on the clean images, and the three layouts (together, apart, on a mesh) agree."""
  apply_fn, init_params, images, labels, dsa = setup
  teacher = _teacher(apply_fn, init_params)
  probs = np.asarray(jax.nn.softmax(
      teacher.apply_fn(teacher.variables, images, train=False)[0].logits))
  kwargs = dict(num_nets=2, lr=0.05, epochs=3, batch_size=5, augment=dsa, temperature=1.0)
  together = evaluate.train_networks(apply_fn, init_params, images, labels, teacher=teacher,
                                     **kwargs)
  apart = evaluate.train_networks(apply_fn, init_params, images, labels, teacher=teacher,
                                  vectorize=False, **kwargs)
  on_mesh = evaluate.train_networks(apply_fn, init_params, images, labels, teacher=teacher,
                                    mesh=make_mesh((("data", 2), ("fsdp", 4))), **kwargs)
  precomputed = evaluate.train_networks(apply_fn, init_params, images, probs, **kwargs)
  for a, b, c in zip(*map(jax.tree.leaves, (together, apart, on_mesh))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  assert not all(np.allclose(a, p, atol=1e-4) for a, p in
                 zip(jax.tree.leaves(together), jax.tree.leaves(precomputed)))
