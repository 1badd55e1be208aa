"""OFA-KD's branch projectors for heterogeneous pairs (kd_jax.models.ofa_branch + the distiller's
`ofa` term on intermediate student taps)."""
import flax.linen as nn
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_kd
from kd_jax import kd_job, losses, metrics
from kd_jax.distiller import Distiller, Term
from kd_jax.models import create_model, init_model, make_apply_fn
from kd_jax.models.ofa_branch import OFABranch, PatchMerging, halvings

NUM_CLASSES = 10


def _pair(pair: str):
  teacher, teacher_kwargs, student, student_kwargs = digits_kd.PAIRS[pair]
  nets = {}
  for role, name, kwargs, seed in (("teacher", teacher, teacher_kwargs, 0),
                                   ("student", student, student_kwargs, 1)):
    module = create_model(name, num_classes=NUM_CLASSES, **kwargs)
    params, state = init_model(module, jax.random.PRNGKey(seed), (1, 8, 8, 1))
    nets[role] = (make_apply_fn(module), {"params": params, **state})
  return nets


def _batch(n=6):
  x = jax.random.normal(jax.random.PRNGKey(2), (n, 8, 8, 1))
  return {"image": x, "label": jnp.arange(n) % NUM_CLASSES}


def _distiller(pair: str, **term_fields):
  nets = _pair(pair)
  taps, branch = digits_kd.OFA_BRANCHES[pair]
  fields = {"student": taps, "options": {"branch": branch}, "name": "ofa_stages", **term_fields}
  distiller = Distiller(nets["student"][0], [Term("ofa", **fields)],
                        {"teacher": nets["teacher"][0]})
  variables = {"student": nets["student"][1], "teacher": nets["teacher"][1]}
  return distiller, nets, variables


@pytest.fixture(scope="module", params=["cnn_vit", "vit_cnn", "mlp"])
def initialised(request):
  """(pair, distiller, nets, variables, batch, (trainable, frozen, extra)) for one pair."""
  distiller, nets, variables = _distiller(request.param)
  batch = _batch()
  return (request.param, distiller, nets, variables, batch,
          distiller.init(jax.random.PRNGKey(3), variables, batch))


def test_term_is_the_sum_of_ofa_over_branch_logits(initialised):
  pair, distiller, nets, variables, batch, (trainable, frozen, extra) = initialised
  loss = jax.jit(lambda t: distiller.loss(t, frozen, extra, batch, 0, jax.random.PRNGKey(4)))
  total, (metrics, _) = loss(trainable)
  head = distiller._heads["ofa_stages"]

  @jax.jit
  def by_hand(trainable):
    # Each branch applied to its student tap, OFA against the teacher's logits, averaged over
    # the batch, summed over the branches.
    student_out, _ = nets["student"][0](variables["student"], batch["image"], train=True)
    teacher_out, _ = nets["teacher"][0](variables["teacher"], batch["image"], train=False)
    branch_vars = {"params": trainable["ofa_stages"], **extra["model_state"]["ofa_stages"]}
    taps = [student_out.features[n] for n in digits_kd.OFA_BRANCHES[pair][0]]
    (branch_logits, _, _), _ = head.apply(branch_vars, taps, [teacher_out.logits], train=True,
                                          mutable=["batch_stats"])
    return branch_logits, sum(jnp.mean(losses.ofa(b, teacher_out.logits, batch["label"]))
                              for b in branch_logits)

  branch_logits, expected = by_hand(trainable)
  assert all(b.shape == (6, NUM_CLASSES) for b in branch_logits)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["terms/ofa_stages"], expected, rtol=1e-5)
  if pair == "cnn_vit":
    # The gradient reaches both ViT blocks through the branches; the student's head, never on
    # the path of an ofa_stages term, gets none.
    grads = jax.jit(jax.grad(lambda t: loss(t)[0]))(trainable)
    student = grads["student"]
    assert float(jnp.abs(student["block0"]["mlp1"]["kernel"]).sum()) > 0
    assert float(jnp.abs(student["block1"]["mlp1"]["kernel"]).sum()) > 0
    assert float(jnp.abs(student["head"]["kernel"]).sum()) == 0
    assert set(grads["ofa_stages"]) == {"branch0", "branch1"}
  if pair == "vit_cnn":
    # The CNN student's stage1 is 4×4 and stage2 2×2: one stride-2 block on stage1 brings it to
    # the smallest grid; stage2 gets OFA's 1×1 conv.
    branches = trainable["ofa_stages"]
    assert "SeparableConv_0" in branches["branch0"] and "SeparableConv_1" not in branches["branch0"]
    assert "Conv_0" in branches["branch1"]
    assert branches["branch0"]["Dense_0"]["kernel"].shape == (32, NUM_CLASSES)


def test_downsampling_steps():
  assert halvings(16, 7) == 1 and halvings(14, 7) == 1 and halvings(7, 7) == 0
  assert halvings(4, 8) == 0 and halvings(32, 4) == 3


def test_token_branch_merges_patches_in_swin_order():
  # Patch merging concatenates each 2×2 neighbourhood as (0,0), (1,0), (0,1), (1,1).
  grid = jnp.arange(16.0).reshape(1, 4, 4, 1)
  merging = PatchMerging(3)
  params = merging.init(jax.random.PRNGKey(0), grid)
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.LayerNorm):
      captured["merged"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    out = merging.apply(params, grid)
  assert out.shape == (1, 2, 2, 3)
  np.testing.assert_array_equal(captured["merged"][0, 0, 1], [2.0, 6.0, 3.0, 7.0])


def test_token_branch_accepts_sequences_and_grids_alike():
  branch = OFABranch("tokens", NUM_CLASSES, width=8, downsample=1, blocks=1, num_heads=2)
  tokens = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
  params = jax.jit(lambda x: branch.init(jax.random.PRNGKey(1), x, train=False))(tokens)
  apply = jax.jit(lambda x: branch.apply(params, x, train=False))
  from_tokens, from_grid = apply(tokens), apply(tokens.reshape(2, 4, 4, 8))
  assert from_tokens.shape == (2, NUM_CLASSES)
  np.testing.assert_allclose(from_tokens, from_grid, rtol=1e-6)


def test_errors_name_the_field():
  with pytest.raises(ValueError, match="teacher='logits'"):
    distiller, _, variables = _distiller("cnn_vit", teacher="pre_logits")
    distiller.init(jax.random.PRNGKey(3), variables, _batch())
  with pytest.raises(ValueError, match="options.branch='capsule' is unknown"):
    distiller, _, variables = _distiller("cnn_vit", options={"branch": "capsule"})
    distiller.init(jax.random.PRNGKey(3), variables, _batch())
  with pytest.raises(ValueError, match="options .*'heads'.* unknown"):
    _distiller("cnn_vit", options={"heads": 2})
  with pytest.raises(ValueError, match="not a multiple of num_heads=3"):
    distiller, _, variables = _distiller("cnn_vit", options={"branch": "tokens", "num_heads": 3})
    distiller.init(jax.random.PRNGKey(3), variables, _batch())


def test_heterogeneous_pair_runs_ofa_from_its_runlocal_config(digits_data_dir, tmp_path):
  """CNN teacher → ViT student with OFA-KD's recipe (CE + OFA on the logits + OFA branches on
  both blocks' token grids), from `configs/digits_kd.py:pair=cnn_vit,terms=ofa+ofa_stages`."""
  config = digits_kd.get_config("pair=cnn_vit,terms=ofa+ofa_stages,runlocal,tune=false")
  terms = [t.to_dict() for t in config.distill.terms]
  assert [t.get("name", t["loss"]) for t in terms] == ["ce", "ofa", "ofa_stages"]
  assert terms[2]["student"] == ("stage1", "stage2") and terms[2]["options"] == {"branch": "tokens"}
  with config.unlocked():
    config.data.data_dir = digits_data_dir
    config.student.baseline = False
  rows = kd_job.run(config, str(tmp_path))
  assert [r["stage"] for r in rows] == ["teacher", "student_kd"]
  record = metrics.read_jsonl(os.path.join(tmp_path, "student_kd", "metrics.jsonl"))[-1]
  assert all(np.isfinite(record[f"terms/{name}"]) for name in ("ce", "ofa", "ofa_stages"))
