"""Online / mutual regime (DML, BD-KD): what each network's terms are, symmetric gradients, one
trace, bad input, and kill-and-resume through `trainer.train` with every network evaluated."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import losses, trainer
from kd_jax.distiller import Distiller, Term
from kd_jax.regimes import mutual
from kd_jax.regimes.mutual import Mutual
from kd_jax.step import TrainState, make_train_step, per_part_optimizer


def _grads(method, variables, batch):
  trainable, frozen, extra = method.init(jax.random.key(0), variables, batch)
  return jax.jit(jax.grad(lambda t: method.loss(t, frozen, extra, batch, 0,
                                                jax.random.key(0))[0]))(trainable)


def test_dml_gradient_is_kd_from_a_frozen_copy_of_the_peer_and_symmetric(model, batches):
  (a_apply, a_vars), (_, b_vars) = (model("mlp", seed=s, hidden_sizes=(32,)) for s in (1, 2))
  method = Mutual({"student": a_apply, "peer": a_apply}, temperature=2.0, mutual_weight=0.5)
  grads = _grads(method, {"student": a_vars, "peer": b_vars}, batches[0])
  # The student's gradient: CE + 0.5·KD(T=2) from a frozen teacher holding the peer's weights.
  kd = Distiller(a_apply, [Term("ce"), Term("kd", weight=0.5, hparams={"temperature": 2.0})],
                 {"teacher": a_apply})
  chex.assert_trees_all_close(grads["student"],
                              _grads(kd, {"student": a_vars, "teacher": b_vars},
                                     batches[0])["student"], rtol=1e-5, atol=1e-7)
  # Swapping the two networks' weights swaps their gradients.
  swapped = _grads(method, {"student": b_vars, "peer": a_vars}, batches[0])
  chex.assert_trees_all_close(grads["peer"], swapped["student"], rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(grads["student"], swapped["peer"], rtol=1e-5, atol=1e-7)


def test_each_network_averages_its_peers_and_bdkd_balances_only_the_compact_one(model, batches):
  networks = {"student": model("mlp", seed=1, hidden_sizes=(32,)),
              "peer1": model("mlp", seed=2, hidden_sizes=(64,)),
              "peer2": model("digits_cnn_student", seed=3)}
  variables = {n: v for n, (_, v) in networks.items()}
  batch = batches[0]
  logits = {n: apply(variables[n], batch["image"], train=True)[0].logits
            for n, (apply, _) in networks.items()}
  method = Mutual({n: apply for n, (apply, _) in networks.items()}, temperature=3.0,
                  compact="student", balance=4.0)
  trainable, frozen, extra = method.init(jax.random.key(0), variables, batch)
  loss, (metrics, _) = jax.jit(method.loss)(trainable, frozen, extra, batch, 0, jax.random.key(0))
  for name in networks:  # BD-KD for the compact student, DML's KL for the others
    divergence = losses.bdkd if name == "student" else losses.kd
    hparams = {"balance": 4.0} if name == "student" else {}
    expected = np.mean([divergence(logits[name], logits[peer], temperature=3.0,
                                   **hparams).mean() for peer in networks if peer != name])
    np.testing.assert_allclose(metrics[f"terms/{name}/mutual"], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, sum(metrics[f"terms/{n}/{t}"] for n in networks
                                       for t in ("ce", "mutual")), rtol=1e-5)
  assert not np.isclose(losses.bdkd(logits["student"], logits["peer1"], temperature=3.0,
                                    balance=4.0).mean(),
                        losses.kd(logits["student"], logits["peer1"], temperature=3.0).mean())


def test_step_traces_once_and_trains_every_network_and_its_batch_stats(model, batches):
  networks = {"student": model("mlp", seed=1, hidden_sizes=(32,)),
              "peer": model("convnet", seed=2, depth=1, width=8, norm="batchnorm")}
  method = Mutual({n: apply for n, (apply, _) in networks.items()})
  trainable, frozen, extra = method.init(jax.random.key(0), {n: v for n, (_, v) in
                                                             networks.items()}, batches[0])
  tx = per_part_optimizer(trainable, optax.sgd(0.1))
  first = jax.device_get(TrainState.create(tx, trainable, frozen, extra))
  state = jax.tree.map(jnp.copy, TrainState.create(tx, trainable, frozen, extra))
  step = jax.jit(chex.assert_max_traces(make_train_step(method, tx), n=1), donate_argnums=0)
  for batch in batches:
    state, metrics = step(state, batch, jax.random.key(0))
  assert int(state.step) == len(batches)
  for name in networks:
    assert {f"terms/{name}/ce", f"terms/{name}/mutual", f"train/{name}/accuracy"} <= set(metrics)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), first.trainable[name],
                         state.trainable[name])
    assert min(jax.tree.leaves(moved)) > 0, f"{name} did not train"
  assert not jax.tree.all(jax.tree.map(np.array_equal, first.extra["model_state"]["peer"],
                                       jax.device_get(state.extra["model_state"]["peer"])))
  np.testing.assert_allclose(metrics["train/accuracy"], metrics["train/student/accuracy"])


def test_bad_input_is_named(model, batches):
  a_apply, a_vars = model("mlp", seed=1, hidden_sizes=(32,))
  with pytest.raises(ValueError, match="at least two networks"):
    Mutual({"student": a_apply})
  with pytest.raises(ValueError, match="name one network 'student'"):
    Mutual({"a": a_apply, "b": a_apply})
  with pytest.raises(ValueError, match=r"compact='tiny' is not a network"):
    Mutual({"student": a_apply, "peer": a_apply}, compact="tiny")
  with pytest.raises(ValueError, match=r"balance must be >= 1, got 0.5"):
    Mutual({"student": a_apply, "peer": a_apply}, compact="student", balance=0.5)
  with pytest.raises(ValueError, match=r"temperature must be > 0"):
    Mutual({"student": a_apply, "peer": a_apply}, temperature=-1.0)
  five_apply, five_vars = model("mlp", classes=5, seed=2, hidden_sizes=(32,))
  method = Mutual({"student": a_apply, "peer": five_apply})
  with pytest.raises(ValueError, match=r"class counts differ \(student 10, peer 5\)"):
    method.init(jax.random.key(0), {"student": a_vars, "peer": five_vars}, batches[0])
  with pytest.raises(ValueError, match=r"no variables for \['peer'\]"):
    method.init(jax.random.key(0), {"student": a_vars}, batches[0])


def test_kill_and_resume_through_the_trainer_is_identical_and_every_network_is_evaluated(
    model, batches, resumed_equals_uninterrupted):
  networks = {"student": model("mlp", seed=1, hidden_sizes=(32,)),
              "peer": model("convnet", seed=2, depth=1, width=8, norm="batchnorm")}
  make_stage = lambda steps: mutual.stage("mutual", networks, tx=optax.sgd(0.05, momentum=0.9),
                                          num_steps=steps, compact="student", temperature=2.0)
  state = resumed_equals_uninterrupted(make_stage)
  assert set(state.trainable) == set(state.extra["model_state"]) == {"student", "peer"}
  assert state.extra["model_state"]["peer"]["batch_stats"]
  chex.assert_trees_all_equal(trainer.student_variables(state),
                              mutual.network_variables(state, "student"))
  results = make_stage(4).method.evaluate(jax.device_get(state), lambda: batches[:2])
  assert set(results) == {"student", "peer"}
  assert all(r["count"] == 32 and 0 <= r["accuracy"] <= 1 for r in results.values())
