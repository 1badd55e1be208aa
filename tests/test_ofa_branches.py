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


@pytest.mark.parametrize("pair", ["cnn_vit", "vit_cnn", "mlp"])
def test_term_is_the_sum_of_ofa_over_branch_logits(pair):
  distiller, nets, variables = _distiller(pair)
  batch = _batch()
  trainable, frozen, extra = distiller.init(jax.random.PRNGKey(3), variables, batch)
  total, (metrics, _) = distiller.loss(trainable, frozen, extra, batch, 0, jax.random.PRNGKey(4))
  # The same value assembled by hand: each branch applied to its student tap, OFA against the
  # teacher's logits, averaged over the batch, summed over the branches.
  student_out, _ = nets["student"][0](variables["student"], batch["image"], train=True)
  teacher_out, _ = nets["teacher"][0](variables["teacher"], batch["image"], train=False)
  head = distiller._heads["ofa_stages"]
  branch_vars = {"params": trainable["ofa_stages"], **extra["model_state"]["ofa_stages"]}
  taps = [student_out.features[n] for n in digits_kd.OFA_BRANCHES[pair][0]]
  (branch_logits, _, _), _ = head.apply(branch_vars, taps, [teacher_out.logits], train=True,
                                        mutable=["batch_stats"])
  expected = sum(jnp.mean(losses.ofa(b, teacher_out.logits, batch["label"])) for b in branch_logits)
  assert all(b.shape == (6, NUM_CLASSES) for b in branch_logits)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["terms/ofa_stages"], expected, rtol=1e-5)


def test_branches_reach_the_student_stages():
  distiller, _, variables = _distiller("cnn_vit")
  batch = _batch()
  trainable, frozen, extra = distiller.init(jax.random.PRNGKey(3), variables, batch)
  grads = jax.grad(lambda t: distiller.loss(t, frozen, extra, batch, 0,
                                            jax.random.PRNGKey(4))[0])(trainable)
  # Stage 2 is the last block: the branch on it sends gradient into both blocks, and the head
  # (never on the OFA path) gets none.
  student = grads["student"]
  assert float(jnp.abs(student["block0"]["mlp1"]["kernel"]).sum()) > 0
  assert float(jnp.abs(student["block1"]["mlp1"]["kernel"]).sum()) > 0
  assert float(jnp.abs(student["head"]["kernel"]).sum()) == 0
  assert set(grads["ofa_stages"]) == {"branch0", "branch1"}


def test_conv_branch_depth_follows_the_grid():
  # The CNN student's stage1 is 4×4 and stage2 2×2: one stride-2 block on stage1 brings it to the
  # smallest grid; stage2 gets OFA's 1×1 conv.
  distiller, _, variables = _distiller("vit_cnn")
  trainable, _, _ = distiller.init(jax.random.PRNGKey(3), variables, _batch())
  assert "SeparableConv_0" in trainable["ofa_stages"]["branch0"]
  assert "SeparableConv_1" not in trainable["ofa_stages"]["branch0"]
  assert "Conv_0" in trainable["ofa_stages"]["branch1"]
  assert trainable["ofa_stages"]["branch0"]["Dense_0"]["kernel"].shape == (32, NUM_CLASSES)
  assert halvings(16, 7) == 1 and halvings(14, 7) == 1 and halvings(7, 7) == 0
  assert halvings(4, 8) == 0


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
  params = branch.init(jax.random.PRNGKey(1), tokens, train=False)
  from_tokens = branch.apply(params, tokens, train=False)
  from_grid = branch.apply(params, tokens.reshape(2, 4, 4, 8), train=False)
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
