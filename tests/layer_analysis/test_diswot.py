"""DisWOT: the classifier-gradient closed form, the two distances, candidate specs, the command."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.analysis import diswot
from kd_jax.models import ModelOutput

LABELS = jnp.arange(16) % 10


def test_class_gradients_are_the_classifier_weight_gradient_of_cross_entropy(mlp):
  module, params, images, output = mlp

  def loss(head):
    logits = module.apply({"params": {**params, "head": head}}, images, train=False).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

  expected = jax.jit(jax.grad(loss))(params["head"])["kernel"].T  # [K, D]
  np.testing.assert_allclose(diswot.class_gradients(output, LABELS), expected, atol=1e-6)


def test_distances_are_zero_for_a_copy_of_the_teacher_and_positive_for_another_student(mlp):
  teacher = mlp[3]
  same = diswot.distances(teacher, teacher, LABELS)
  assert all(abs(float(v)) < 1e-6 for v in same.values())
  rng = np.random.default_rng(2)
  other = ModelOutput(rng.standard_normal((16, 10), np.float32),
                      {"pre_logits": np.abs(rng.standard_normal((16, 5), np.float32))})
  distances = diswot.distances(teacher, other, LABELS)
  assert float(distances["semantic"]) > 1e-3 and float(distances["relation"]) > 1e-3
  np.testing.assert_allclose(distances["score"],
                             -(distances["semantic"] + distances["relation"]))


def test_candidate_specs_parse_python_keyword_literals():
  assert diswot.Candidate.parse("mlp:hidden_sizes=(64,)") == diswot.Candidate(
      "mlp", {"hidden_sizes": (64,)})
  spec = diswot.Candidate.parse("vit_tiny:patch_size=2, hidden_dim=16")
  assert spec.kwargs == {"patch_size": 2, "hidden_dim": 16}
  assert str(spec) == "vit_tiny(patch_size=2, hidden_dim=16)"
  assert diswot.Candidate.parse("mlp") == diswot.Candidate("mlp", {})
  for bad in ("mlp:hidden_sizes=", "mlp:(64,)", "mlp:hidden_sizes=[n]"):
    with pytest.raises(ValueError, match="--student="):
      diswot.Candidate.parse(bad)


def test_command_ranks_candidates_for_the_workdir_teacher(kd_workdir, tmp_path):
  students = ["mlp:hidden_sizes=(8,)", "mlp:hidden_sizes=(4,)"]
  result = diswot.run(kd_workdir, students, examples=16, inits=1, out=str(tmp_path))
  ranking = result["ranking"]
  assert sorted(r["student"] for r in ranking) == ["mlp(hidden_sizes=(4,))",
                                                   "mlp(hidden_sizes=(8,))"]
  assert ranking[0]["score"] >= ranking[1]["score"]
  assert all(r["score"] <= 0 and r["params"] > 0 for r in ranking)
  with open(tmp_path / "diswot.json") as f:
    assert json.load(f)["ranking"] == ranking
  table = diswot.format_result(result).splitlines()
  assert table[2].startswith(f"   1  {ranking[0]['student']}")
  assert table[3].startswith(f"   2  {ranking[1]['student']}")
  with pytest.raises(ValueError, match=r"--student=mlp\(hidden_size=.*has no field"):
    diswot.run(kd_workdir, ["mlp:hidden_size=(8,)"], examples=16, inits=1, out=str(tmp_path))
