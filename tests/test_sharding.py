"""Sharded KD steps equal the 1-device step; FSDP divides per-device parameter memory."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kd_jax import sharding
from multihost_worker import build_problem, make_batch


def _as_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _run_single_device(step, state, num_steps):
  step = jax.jit(step)
  history = []
  for i in range(num_steps):
    state, metrics = step(state, make_batch(seed=i), jax.random.PRNGKey(0))
    history.append(metrics)
  return _as_numpy(state), _as_numpy(history)


def _run_sharded(step, state, num_steps, axes, rules=(), fsdp_min_size=64):
  mesh = sharding.make_mesh(axes)
  state_sh = sharding.state_shardings(state, mesh, rules, fsdp_min_size=fsdp_min_size)
  train_step, state = sharding.shard_train_step(step, state, mesh, rules,
                                                fsdp_min_size=fsdp_min_size)
  history = []
  for i in range(num_steps):
    state, metrics = train_step(state, sharding.shard_batch(make_batch(seed=i), mesh),
                                jax.random.PRNGKey(0))
    history.append(metrics)
  assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim),
                                   state, state_sh))
  return _as_numpy(state), _as_numpy(history), state_sh


def _abstract_problem(**widths):
  """The `TrainState` as `jax.ShapeDtypeStruct`s: traced, never compiled."""
  return jax.eval_shape(lambda: build_problem(**widths)[1])


def _zeros(tree):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)


@pytest.fixture(scope="module")
def problem():
  step, state = build_problem()
  state = _as_numpy(state)
  return step, state, _run_single_device(step, state, num_steps=2)


@pytest.mark.parametrize("axes", [[("data", -1)], [("data", -1), ("fsdp", 2)], [("fsdp", 8)]])
def test_sharded_kd_step_equals_single_device(problem, axes):
  step, state, (want_state, want_metrics) = problem
  got_state, got_metrics, state_sh = _run_sharded(step, state, 2, axes)
  # Metrics (loss, CE, KD, grad norm), params, BatchNorm statistics, the teacher and the
  # momentum buffer (= the first step's gradient, accumulated) all match.
  assert set(want_metrics[0]) >= {"train/loss", "terms/ce", "terms/kd", "grads/l2"}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_metrics, want_metrics)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_state, want_state)
  if ("fsdp", 2) in axes or ("fsdp", 8) in axes:
    assert state_sh.trainable["student"]["Conv_1"]["kernel"].spec != P()
    assert state_sh.frozen["teacher"]["params"]["Conv_1"]["kernel"].spec != P()


def _per_device_bytes(tree, device):
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def test_fsdp_divides_per_device_parameter_bytes():
  state = _zeros(_abstract_problem(student_width=(32, 64), teacher_width=(64, 128)))
  big = 1000  # leaves below this many elements stay replicated
  for fsdp in (2, 4, 8):
    mesh = sharding.make_mesh([("data", -1), ("fsdp", fsdp)])
    for tree in (state.trainable["student"], state.frozen["teacher"]):
      placed = jax.device_put(tree, sharding.param_shardings(tree, mesh, fsdp_min_size=big))
      leaves = jax.tree.leaves(tree)
      want = sum(x.nbytes // fsdp if x.size >= big else x.nbytes for x in leaves)
      assert want < sum(x.nbytes for x in leaves)
      for device in mesh.devices.flat:
        assert _per_device_bytes(placed, device) == want


def test_optimizer_state_follows_its_param():
  state = _abstract_problem()
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  state_sh = sharding.state_shardings(state, mesh, fsdp_min_size=64)
  # per_part_optimizer: one optax.multi_transform branch per trainable part.
  trace = state_sh.opt_state.inner_states["student"].inner_state[0].trace
  assert trace["student"] == state_sh.trainable["student"]
  assert state_sh.trainable["student"]["Conv_1"]["kernel"].spec == P(None, None, None, "fsdp")
  assert state_sh.step.spec == P()


def test_rules_override_auto_fsdp_and_match_regex():
  state = _abstract_problem()
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)])
  rules = [(r"Dense_0/kernel$", (None, "fsdp")), (r"Conv_\d/kernel$", ())]
  state_sh = sharding.state_shardings(state, mesh, rules, fsdp_min_size=1)
  for tree in (state_sh.trainable["student"], state_sh.frozen["teacher"]["params"]):
    assert tree["Dense_0"]["kernel"].spec == P(None, "fsdp")
    assert tree["Conv_0"]["kernel"].spec == P()
    assert tree["Conv_1"]["bias"].spec == P("fsdp")  # no rule: auto FSDP


def test_rules_match_full_state_paths():
  """Rules see the path inside the state's tree: `student/...` in `trainable`,
  `teacher/params/...` in `frozen`, `model_state/student/batch_stats/...` in `extra`."""
  state = _abstract_problem()
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)])
  rules = [(r"^teacher/params/Conv_1/kernel$", ()),
           (r"^student/Conv_1/kernel$", (None, None, None, "fsdp")),
           (r"^model_state/student/batch_stats/", ())]
  state_sh = sharding.state_shardings(state, mesh, rules, fsdp_min_size=1)
  assert state_sh.frozen["teacher"]["params"]["Conv_1"]["kernel"].spec == P()
  assert state_sh.trainable["student"]["Conv_1"]["kernel"].spec == P(None, None, None, "fsdp")
  stats = state_sh.extra["model_state"]["student"]["batch_stats"]
  assert all(s.spec == P() for s in jax.tree.leaves(stats))
  assert state_sh.frozen["teacher"]["params"]["Conv_0"]["kernel"].spec != P()  # auto FSDP


def test_shard_batch_builds_the_global_batch():
  mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
  host = make_batch()
  batch = sharding.shard_batch(host, mesh)
  assert batch["image"].sharding.spec == P(("data", "fsdp"))
  assert len(batch["image"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])
  with pytest.raises(ValueError, match="data.batch_size"):
    sharding.shard_batch(make_batch(batch_size=12), mesh)


@pytest.mark.parametrize("axes, match", [
    ([("data", 3)], "does not divide"),
    ([("data", -1), ("fsdp", -1)], "at most one -1"),
    ([("data", 2), ("fsdp", 2)], "covers 4 devices"),
    ([("data", -1), ("data", 2)], "repeated"),
    ([("data",)], "pairs"),
])
def test_make_mesh_rejects_bad_axes(axes, match):
  with pytest.raises(ValueError, match=f"mesh.axes.*{match}"):
    sharding.make_mesh(axes)


def test_make_mesh_fills_the_rest():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}


def test_bad_rules_raise_naming_the_rule():
  params = _abstract_problem().trainable
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 8)])
  with pytest.raises(ValueError, match=r"mesh.rules.*Dense_0.*does not divide"):
    sharding.param_shardings(params, mesh, [("Dense_0/kernel", (None, "fsdp"))])
  with pytest.raises(ValueError, match=r"mesh.rules.*not in the mesh"):
    sharding.param_shardings(params, mesh, [("kernel", ("model",))])
  with pytest.raises(ValueError, match=r"mesh.rules.*dimensions"):
    sharding.param_shardings(params, mesh, [("bias", (None, None))])


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert not sharding.initialize_distributed()
  assert not sharding.initialize_distributed(num_processes=1)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="coordinator_address"):
    sharding.initialize_distributed()


@pytest.mark.parametrize("cores, batches, fixed, expected", [
    (2, [64, 500], 1, 2),     # the digits job on 2 cores
    (8, [64, 500], 1, 4),     # gcd 4: four devices, not eight
    (6, [64, 96], 1, 4),      # 6 does not divide 64: the largest that does
    (8, [64], 2, 8),          # an fsdp axis of 2 needs an even count
    (4, [6], 4, 1),           # nothing above 1 fits: leave one device
    (1, [64], 1, 1),
])
def test_host_device_count_divides_every_batch(cores, batches, fixed, expected):
  count = sharding.host_device_count(cores, batches, fixed)
  assert count == expected
  assert all(b % count == 0 for b in batches) and (count == 1 or count % fixed == 0)


def _devices_after_use_host_cores(code_args: str, env_flags: str = "") -> list:
  """Runs `use_host_cores(...)` in a fresh interpreter (before JAX starts), returns
  [its return value, the CPU device count]."""
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = env_flags
  code = ("import json, jax\nfrom kd_jax import sharding\n"
          f"n = sharding.use_host_cores({code_args})\n"
          "print(json.dumps([n, len(jax.devices('cpu'))]))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  return __import__("json").loads(out.stdout.strip().splitlines()[-1])


def test_use_host_cores_splits_the_cpu_and_respects_the_users_choice():
  # Asked for 2 devices explicitly (the CI machine may have any number of cores).
  assert _devices_after_use_host_cores("[64, 500], requested=2") == [2, 2]
  # 0 leaves XLA's single device; a device count in XLA_FLAGS is the user's and wins.
  assert _devices_after_use_host_cores("[64], requested=0") == [0, 1]
  assert _devices_after_use_host_cores(
      "[64]", "--xla_force_host_platform_device_count=3") == [0, 3]


def test_use_host_cores_is_a_noop_once_jax_has_started(monkeypatch):
  jax.devices()  # this process's backends are up (8 devices from conftest's XLA_FLAGS)
  monkeypatch.setenv("XLA_FLAGS", "")  # so only the started backends stop it
  assert sharding.use_host_cores([64], requested=2) == 0
  assert len(jax.devices()) == 8


def test_evaluation_accepts_variables_committed_to_other_devices():
  """A teacher restored from a checkpoint written on one device comes back committed to device
  0; evaluating it on the 8-device mesh must not fail on incompatible devices."""
  from kd_jax import models, trainer
  module = models.create_model("mlp", num_classes=3, hidden_sizes=(4,))
  params, _ = models.init_model(module, jax.random.key(0), (1, 2, 2, 1))
  apply_fn = models.make_apply_fn(module)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(8, 2, 2, 1)).astype(np.float32),
              "label": rng.integers(0, 3, 8), "mask": np.ones(8, np.float32)}]
  on_device0 = jax.device_put({"params": params}, jax.devices()[0])
  assert jax.tree.leaves(on_device0)[0].sharding.device_set == {jax.devices()[0]}
  assert trainer.evaluate(apply_fn, on_device0, batches) == trainer.evaluate(
      apply_fn, {"params": jax.device_get(params)}, batches)
  logits, _ = trainer.predict(apply_fn, on_device0, batches)
  assert logits.shape == (8, 3)
