"""Teacher-output caching: the cached KD step equals the live one; builds resume; stale caches
(other teacher, seed, augmentation, storage, batches) are errors; the KD job distils alike."""
import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_kd
from kd_jax import array_store, data, kd_job, losses, metrics, models, teacher_cache
from kd_jax.distiller import Distiller, Term
from kd_jax.models.output import ModelOutput

CLASSES, BATCH, STEPS = 10, 16, 5  # 48 examples: 3 steps per epoch, so the cache spans 2 epochs
SOURCE = data.ArrayDataSource(np.random.RandomState(0).randint(0, 256, (48, 8, 8, 1), np.uint8),
                              np.random.RandomState(1).randint(0, CLASSES, 48))
TERMS = [Term("ce", weight=0.1), Term("kd", weight=0.9, hparams={"temperature": 4.0}),
         Term("dkd")]


def _mlp(hidden: int, seed: int):
  """A one-hidden-layer MLP as a plain apply function and its variables (nothing to compile)."""
  rs = np.random.RandomState(seed)
  params = {"w1": rs.normal(0, 0.1, (64, hidden)).astype(np.float32),
            "w2": rs.normal(0, 0.1, (hidden, CLASSES)).astype(np.float32)}

  def apply_fn(variables, x, *, train, rngs=None):
    del train, rngs
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ variables["params"]["w1"])
    return ModelOutput(h @ variables["params"]["w2"], {"pre_logits": h}), {}

  return apply_fn, {"params": params}


@pytest.fixture(scope="module")
def nets():
  """`{"teacher": (apply, variables), "student": (apply, variables)}`."""
  return {"teacher": _mlp(32, 0), "student": _mlp(16, 1)}


def _batches(seed=1, crop_padding=1):
  """The training batches of SOURCE and the metadata that describes them."""
  augment = data.AugmentConfig(crop_padding=crop_padding, flip=True)
  batches = lambda start: data.train_batches(SOURCE, batch_size=BATCH, seed=seed, augment=augment,
                                             start_step=start, prefetch=0)
  return batches, {"examples": len(SOURCE), "seed": seed, "batch_size": BATCH,
                   "augment": dataclasses.asdict(augment)}


def _build(directory, nets, batches, metadata, storage="float32", teacher_vars=None):
  apply_fn, variables = nets["teacher"]
  return teacher_cache.build(str(directory), batches, apply_fn, teacher_vars or variables,
                             num_steps=STEPS, storage=storage, metadata=metadata, chunk_steps=2)


@pytest.fixture(scope="module")
def built(nets, tmp_path_factory):
  directory = tmp_path_factory.mktemp("cache") / "teacher_cache"
  return directory, _build(directory, nets, *_batches())


def test_cached_and_live_steps_give_the_same_loss_and_gradients(nets, built):
  batches, _ = _batches()
  batch = next(teacher_cache.with_teacher_logits(batches, built[1])(4))  # epoch 1, row order 2
  (student_apply, student_vars), (teacher_apply, teacher_vars) = nets["student"], nets["teacher"]
  results = []
  for cached in ((), ("teacher",)):
    distiller = Distiller(student_apply, TERMS, {"teacher": teacher_apply}, cached=cached)
    trainable, frozen, extra = distiller.init(
        jax.random.PRNGKey(2), {"student": student_vars, "teacher": teacher_vars}, batch)
    value_and_grad = jax.jit(jax.value_and_grad(distiller.loss, has_aux=True))
    (loss, (step_metrics, _)), grads = value_and_grad(trainable, frozen, extra, batch,
                                                      jnp.int32(4), jax.random.PRNGKey(3))
    results.append((sorted(frozen), loss, step_metrics, grads))
  (live_frozen, *live), (cached_frozen, *cached) = results
  assert live_frozen == ["teacher"] and cached_frozen == []  # a cached teacher is not in the state
  chex.assert_trees_all_close(cached, live, rtol=1e-6, atol=1e-6)


def test_a_resumed_build_gives_the_arrays_of_an_uninterrupted_one(nets, built, tmp_path):
  batches, metadata = _batches()
  starts = []

  def killed(start):  # the build dies while computing step 3, in its second chunk [2, 4)
    starts.append(start)
    for step, batch in enumerate(batches(start), start):
      if step == 3:
        raise KeyboardInterrupt("killed")
      yield batch

  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path / "cache", nets, killed, metadata)
  starts.clear()
  resumed = _build(tmp_path / "cache", nets, lambda start: starts.append(start) or batches(start),
                   metadata)
  assert starts == [0, 2, 4]  # the first batch (shapes), then only the chunks not written
  for name, array in built[1].arrays.items():
    np.testing.assert_array_equal(resumed.arrays[name], array)


@pytest.mark.parametrize("change,field", [
    ("teacher", "teacher_params"), ("seed", "seed"), ("crop_padding", "augment.crop_padding"),
    ("storage", "storage")])
def test_a_cache_of_other_inputs_is_stale_naming_the_field(nets, built, change, field):
  batches, metadata = _batches(**({change: 2} if change in ("seed", "crop_padding") else {}))
  teacher_vars = (jax.tree.map(lambda x: x + 1, nets["teacher"][1]) if change == "teacher"
                  else None)
  with pytest.raises(array_store.StaleStoreError, match=rf"(?s)other inputs.*\b{field}: "):
    _build(built[0], nets, batches, metadata, "float16" if change == "storage" else "float32",
           teacher_vars)


def test_batches_other_than_the_cached_ones_are_refused_on_read(built):
  batches, _ = _batches(crop_padding=0)  # e.g. the augmentation code changed, its config not
  with pytest.raises(array_store.StaleStoreError, match="step 0's batch is not the one in"):
    next(teacher_cache.with_teacher_logits(batches, built[1])(0))


def test_a_teacher_feature_term_cannot_read_a_cached_teacher(nets):
  with pytest.raises(ValueError, match=r"distill.terms\[1\] \(fitnet\): teacher 'teacher' is "
                                       r"cached .* reads \['pre_logits'\]"):
    Distiller(nets["student"][0], [Term("ce"), Term("fitnet", student="pre_logits",
                                                    teacher="pre_logits")],
              {"teacher": nets["teacher"][0]}, cached=("teacher",))


def test_top_k_storage_keeps_the_top_probabilities_and_shares_the_rest(nets, tmp_path):
  batches, metadata = _batches()
  cache = _build(tmp_path / "top3", nets, batches, metadata, storage="top3")
  batch = next(teacher_cache.with_teacher_logits(batches, cache)(1))
  apply_fn, variables = nets["teacher"]
  p = jax.nn.softmax(apply_fn(variables, batch["image"], train=False)[0].logits)
  q = jax.nn.softmax(batch["teacher_logits"])
  top = jnp.argsort(-p, axis=-1)[:, :3]
  np.testing.assert_allclose(jnp.take_along_axis(q, top, -1), jnp.take_along_axis(p, top, -1),
                             rtol=1e-5)
  rest = jnp.sort(q, axis=-1)[:, :-3]  # the other 7 classes share the remaining mass equally
  np.testing.assert_allclose(rest, jnp.broadcast_to(rest[:, :1], rest.shape), rtol=1e-5)
  logits = jnp.asarray(np.random.RandomState(0).normal(size=(4, CLASSES)), jnp.float32)
  np.testing.assert_allclose(teacher_cache.dense_logits(
      *map(np.asarray, losses.teacher_topk(logits, CLASSES)), CLASSES), logits, rtol=1e-6)


def test_kd_job_with_the_teacher_cache_trains_the_student_the_live_teacher_trains(
    digits_data_dir, tmp_path, monkeypatch):
  """The same KD stage from the live teacher and from its cache (the teacher trained once)."""
  inits, init_model = {}, models.init_model

  def init_once(module, rng, shape):  # both runs initialise alike: compile each init once
    key = repr(module), tuple(np.asarray(rng)), shape
    if key not in inits:
      inits[key] = init_model(module, rng, shape)
    return inits[key]

  monkeypatch.setattr(models, "init_model", init_once)

  def run(workdir, **overrides):
    config = digits_kd.get_config("runlocal")
    with config.unlocked():
      config.update_from_flattened_dict({
          "data.data_dir": digits_data_dir, "data.train_split": "train[:128]",
          "data.eval_split": "test[:64]", "tune.validation_examples": 0,
          "student.baseline": False, "log.tensorboard": False, "teacher.model": "mlp",
          "teacher.model_kwargs": {"hidden_sizes": (32,)}, **overrides})
    return kd_job.run(config, str(workdir))

  live = run(tmp_path / "live")
  cached = run(tmp_path / "cached", **{"teacher.cache": "float32", "teacher.checkpoint": str(
      tmp_path / "live" / "teacher" / "checkpoints")})
  store = json.load(open(tmp_path / "cached" / "teacher_cache" / "student_kd" / "crop1" /
                         array_store.STORE_FILE))
  assert store["metadata"]["num_steps"] == 2 and store["metadata"]["augment"]["crop_padding"] == 1
  logs = [metrics.read_jsonl(os.path.join(tmp_path, arm, "student_kd", "metrics.jsonl"))
          for arm in ("live", "cached")]
  # Equal to float32 rounding: the cache's teacher pass runs each batch on one device, the live
  # step one shard per device, and XLA:CPU's dot kernels round the two shapes differently.
  assert [r["train/loss"] for r in logs[1]] == pytest.approx([r["train/loss"] for r in logs[0]],
                                                             rel=1e-5)
  assert cached[1].keys() == live[1].keys() and cached[1]["count"] == live[1]["count"] == 64
  for key in ("accuracy", "loss"):
    assert cached[1][key] == pytest.approx(live[1][key], rel=1e-5)
