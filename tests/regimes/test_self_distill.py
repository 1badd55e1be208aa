"""Self-distillation: teacher-free USKD's loss, born-again generations (each distils from the
previous one's returned variables, ground-truth weights → term weights), bad input, and a killed
generation sequence resumed through `trainer.train`."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import losses, trainer
from kd_jax.regimes import self_distill
from kd_jax.step import TrainState, cross_entropy, make_train_step, per_part_optimizer


def _weights(stage):
  return {c.name: c.term.weight for c in stage.method.terms}


def test_teacher_free_uskd_step_loss_is_ce_plus_uskd_by_hand(model, batches):
  apply, variables = model("mlp", seed=1, hidden_sizes=(32, 24))
  method = self_distill.uskd(apply, feature="stage1", weight=2.0, hparams={"beta": 0.5})
  batch = batches[0]
  trainable, frozen, extra = method.init(jax.random.key(0), {"student": variables}, batch)
  assert frozen == {} and set(trainable) == {"student", "uskd"}
  tx = per_part_optimizer(trainable, optax.sgd(0.1))
  state = jax.tree.map(jnp.copy, TrainState.create(tx, trainable, frozen, extra))
  _, metrics = jax.jit(make_train_step(method, tx))(state, batch, jax.random.key(0))
  out, _ = apply(variables, batch["image"], train=True)
  weak = trainable["uskd"]["weak_head"]
  weak_logits = out.features["stage1"] @ weak["kernel"] + weak["bias"]
  expected = (cross_entropy(out.logits, batch["label"]).mean()
              + 2.0 * losses.uskd(out.logits, weak_logits, batch["label"], beta=0.5).mean())
  np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-5)


def test_gt_weights_map_to_term_weights_and_stages_to_generation_dirs(model):
  student, teacher = model("mlp", seed=1, hidden_sizes=(32,)), model("mlp", seed=2,
                                                                     hidden_sizes=(64,))
  stages = self_distill.generations(student, [1.0, 0.3, 0.0], tx=optax.sgd(0.1), num_steps=3,
                                    temperature=2.0)
  assert [s.name for s in stages] == ["born_again/gen_0", "born_again/gen_1", "born_again/gen_2"]
  assert _weights(stages[0]) == {"ce": 1.0}  # no teacher: labels only
  assert stages[0].variables == {"student": student[1]}
  for k, g in ((1, 0.3), (2, 0.0)):
    stage = stages[k]
    assert _weights(stage) == pytest.approx({"ce": g, "kd": 1.0 - g})
    assert stage.method.terms[1].term.hparams == {"temperature": 2.0}
    assert stage.method.teachers == {"teacher": student[0]} and stage.variables["teacher"] is None
    assert stage.metadata == {"regime": "born_again", "generation": k, "gt_weight": g,
                              "temperature": 2.0}
  first = self_distill.generations(student, [0.25], teacher=teacher, tx=optax.sgd(0.1),
                                   num_steps=3)[0]
  assert _weights(first) == {"ce": 0.25, "kd": 0.75}
  assert first.method.teachers == {"teacher": teacher[0]}
  assert first.variables["teacher"] is teacher[1]


def test_each_generation_distils_from_the_previous_generations_returned_variables(
    model, monkeypatch):
  student = model("mlp", seed=1, hidden_sizes=(32,))
  teacher = model("mlp", seed=2, hidden_sizes=(64,))
  stages = self_distill.generations(student, [0.5, 0.5, 0.5], teacher=teacher,
                                    tx=optax.sgd(0.1), num_steps=3)
  trained, returned = [], []

  def fake_train(stage, workdir, train_batches, options):
    trained.append((stage, workdir))
    returned.append(jax.tree.map(lambda x: x + len(returned), student[1]))
    return returned[-1]

  monkeypatch.setattr(trainer, "train", fake_train)
  results = self_distill.train_generations(stages, "/work", None, trainer.LoopOptions())
  assert all(r is e for r, e in zip(results, returned)) and len(results) == 3
  assert all(w == "/work" for _, w in trained)
  assert [s.name for s, _ in trained] == [s.name for s in stages]
  assert trained[0][0].variables["teacher"] is teacher[1]
  for k in (1, 2):
    teacher_vars = trained[k][0].variables["teacher"]
    assert teacher_vars is returned[k - 1]
    for a, b in zip(jax.tree.leaves(teacher_vars), jax.tree.leaves(returned[k - 1])):
      assert a is b
    assert trained[k][0].variables["student"] is student[1]  # every generation starts afresh
  assert stages[1].variables["teacher"] is None  # the given stages are not changed


def test_bad_input_is_named(model):
  student = model("mlp", seed=1, hidden_sizes=(32,))
  make = lambda weights, **kw: self_distill.generations(student, weights, tx=optax.sgd(0.1),
                                                        num_steps=3, **kw)
  with pytest.raises(ValueError, match="born_again: gt_weights is empty"):
    make([])
  for weights in ([1.0, 1.5], [1.0, -0.1], [1.0, float("nan")]):
    with pytest.raises(ValueError, match=r"born_again: gt_weights\[1\] must be in \[0, 1\], got"):
      make(weights)
  with pytest.raises(ValueError, match=r"gt_weights\[0\] is 0.5 but generation 0 has no teacher"):
    make([0.5, 1.0])
  with pytest.raises(ValueError, match="born_again: temperature must be > 0, got 0.0"):
    make([1.0], temperature=0.0)
  with pytest.raises(ValueError, match="USKD's weak head needs one student feature"):
    self_distill.uskd(student[0], feature="logits")


def test_a_killed_generation_sequence_resumes_to_the_uninterrupted_result(
    model, tmp_path, train_batches):
  student = model("mlp", seed=1, hidden_sizes=(32,))
  make = lambda: self_distill.generations(student, [1.0, 0.5], tx=optax.sgd(0.1, momentum=0.9),
                                          num_steps=4, temperature=2.0)
  options = trainer.LoopOptions(log_every=1, checkpoint_every=2, tensorboard=False)
  straight = self_distill.train_generations(make(), str(tmp_path / "a"), train_batches, options)
  interrupted = str(tmp_path / "b")
  gen0 = self_distill.train_generations(make()[:1], interrupted, train_batches, options)[0]
  killed = make()[1]  # generation 1 stops at its step-2 checkpoint
  trainer.train(dataclasses.replace(killed, num_steps=2,
                                    variables={**killed.variables, "teacher": gen0}),
                interrupted, train_batches, options)
  starts = []
  counting = lambda start: (starts.append(start), train_batches(start))[1]
  resumed = self_distill.train_generations(make(), interrupted, counting, options)
  chex.assert_trees_all_equal(resumed, straight)
  # Generation 0 is restored at its last step (4), generation 1 resumes at its checkpoint (2);
  # start 0 only draws each stage's example batch.
  assert sorted(set(starts)) == [0, 2, 4]
  assert not np.allclose(straight[0]["params"]["head"]["kernel"],
                         straight[1]["params"]["head"]["kernel"])
