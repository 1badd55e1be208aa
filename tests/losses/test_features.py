"""Feature-map losses: torchdistill parity, identities, gradients, dtypes and modules."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax import losses
from kd_jax.losses import features as F
from kd_jax.losses import modules as M

from reference_fixtures import assert_close, normal, ref


# --- torchdistill parity (batch mean of the per-example values equals the reference scalar).

@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_matches_torchdistill(mode):
  values = F.attention_transfer(ref(f"at_{mode}/student"), ref(f"at_{mode}/teacher"), mode=mode)
  assert values.shape == (6,)
  assert_close(values.mean(), ref(f"at_{mode}/value"))


def test_fsp_matches_torchdistill():
  values = F.fsp((ref("fsp/student_first"), ref("fsp/student_second")),
                 (ref("fsp/teacher_first"), ref("fsp/teacher_second")))
  assert_close(values.mean(), ref("fsp/value"))


@pytest.mark.parametrize("p", [1, 2])
def test_ft_matches_torchdistill(p):
  values = F.factor_transfer(ref(f"ft_p{p}/student"), ref(f"ft_p{p}/teacher"), p=p)
  assert_close(values.mean(), ref(f"ft_p{p}/value"))


def test_vid_and_regressor_match_torchdistill():
  model = M.VIDRegressor(features=4, hidden_features=5)
  params = {f"Dense_{i}": {"kernel": ref(f"vid/kernel{i}")} for i in range(3)}
  params["softplus_variance"] = ref("vid/softplus_variance")
  init = jax.eval_shape(model.init, jax.random.key(0), ref("vid/input"))["params"]
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
  mean, variance = jax.jit(model.apply)({"params": params}, ref("vid/input"))
  assert_close(F.vid(mean, ref("vid/teacher"), variance).mean(), ref("vid/value"))


def _bn(prefix):
  return ({"scale": ref(f"{prefix}scale"), "bias": ref(f"{prefix}bias")},
          {"mean": ref(f"{prefix}mean"), "var": ref(f"{prefix}var")})


def test_hint_regressor_and_fitnet_match_torchdistill():
  model = M.HintRegressor(features=4, kernel_size=3)
  bn_params, bn_stats = _bn("hint/")
  variables = {"params": {"Conv_0": {"kernel": ref("hint/kernel"), "bias": ref("hint/conv_bias")},
                          "BatchNorm_0": bn_params},
               "batch_stats": {"BatchNorm_0": bn_stats}}
  init = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), ref("hint/input"))
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, variables)
  out = jax.jit(partial(model.apply, train=False))(variables, ref("hint/input"))
  assert_close(out, ref("hint/output"))
  assert_close(F.fitnet(out, ref("hint/teacher")).mean(), ref("hint/value"))


def test_hcl_matches_torchdistill():
  values = F.hierarchical_context(ref("hcl/student"), ref("hcl/teacher"))
  assert_close(values.mean(), ref("hcl/value"))


def test_attention_fusion_matches_torchdistill():
  model = M.AttentionFusion(mid_channels=4, out_channels=5, use_attention=True)
  bn1, stats1 = _bn("abf/bn1_")
  bn2, stats2 = _bn("abf/bn2_")
  variables = {"params": {"Conv_0": {"kernel": ref("abf/conv1")}, "BatchNorm_0": bn1,
                          "Conv_1": {"kernel": ref("abf/attention_kernel"),
                                     "bias": ref("abf/attention_bias")},
                          "Conv_2": {"kernel": ref("abf/conv2")}, "BatchNorm_1": bn2},
               "batch_stats": {"BatchNorm_0": stats1, "BatchNorm_1": stats2}}
  inputs = (ref("abf/input"), ref("abf/residual"))
  init = jax.eval_shape(partial(model.init, train=False), jax.random.key(0), *inputs)
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, variables)
  out, fused = jax.jit(partial(model.apply, train=False))(variables, *inputs)
  assert_close(out, ref("abf/output"))
  assert_close(fused, ref("abf/fused"))


def test_nst_matches_repdistiller_formula():
  assert_close(F.nst(ref("nst/student"), ref("nst/teacher")).mean(), ref("nst/value"))


def test_ofd_matches_clovaai_formula():
  margin = F.ofd_margin(ref("ofd/bn_scale"), ref("ofd/bn_bias"))
  assert_close(margin, ref("ofd/margin"))
  values = F.ofd(ref("ofd/student"), ref("ofd/teacher"), margin=margin)
  assert_close(values.mean(), ref("ofd/value"), tol=1e-4 * float(ref("ofd/value")))


def test_ab_ickd_affinity_pad_match_torchdistill():
  s, t = ref("ab/student"), ref("ab/teacher")
  assert_close(F.activation_boundary(s, t).mean(), ref("ab/value"))
  # torchdistill's ChSimLoss divides by the batch size once more.
  assert_close(F.inter_channel_correlation(s, t).mean() / s.shape[0], ref("ickd/value"))
  assert_close(F.affinity(s, t).mean(), ref("affinity/value"))
  values = F.prime_aware_l2(ref("pad_l2/student"), ref("pad_l2/teacher"), ref("pad_l2/log_variance"))
  assert_close(values.mean(), ref("pad_l2/value"))


# --- identities.

def test_zero_at_identity_and_invariances():
  x = normal(0, (3, 4, 4, 5))
  positive = jnp.abs(x) + 0.1
  for values in (F.fitnet(x, x), F.attention_transfer(x, 3.0 * x),
                 F.attention_transfer(x, x, mode="paper"), F.factor_transfer(x, 2.0 * x),
                 F.factor_transfer(x, x, p=3), F.nst(x, x), F.hierarchical_context(x, x),
                 F.fsp((x, x), (x, x)), F.ofd(positive, positive, margin=-jnp.ones(5)),
                 F.inter_channel_correlation(x, 2.0 * x), F.affinity(x, 0.5 * x),
                 F.activation_boundary(2 * jnp.sign(x), x)):
    assert values.shape == (3,)
    assert_close(values, jnp.zeros(3), tol=1e-6)
  # VID's NLL is minimised by the teacher mean; variance 1 gives 0.
  assert_close(F.vid(x, x, jnp.ones(5)), jnp.zeros(3))


def test_ofd_ignores_student_below_negative_teacher():
  teacher = -jnp.ones((1, 2, 2, 3))
  student = teacher - 5.0  # below the margin-ReLU'd teacher where it is negative: no loss
  assert float(F.ofd(student, teacher, margin=-jnp.ones(3) * 0.5)[0]) == 0.0
  assert float(F.ofd(student + 10, teacher, margin=-jnp.ones(3) * 0.5)[0]) > 0.0


def test_adaptive_pool_matches_divisible_reshape():
  x = normal(1, (2, 6, 4, 3))
  expected = x.reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4))
  assert_close(F.adaptive_pool2d(x, (3, 2)), expected, tol=1e-6)
  assert_close(F.adaptive_pool2d(x, (3, 2), reduce="max"), x.reshape(2, 3, 2, 2, 2, 3).max((2, 4)))


# --- gradients, teacher stop, dtypes.

PER_EXAMPLE = {
    "fitnet": lambda s, t: F.fitnet(s, t),
    "at": lambda s, t: F.attention_transfer(s, t),
    "at_paper": lambda s, t: F.attention_transfer(s, t, mode="paper"),
    "ft": lambda s, t: F.factor_transfer(s, t),
    "ft_p2": lambda s, t: F.factor_transfer(s, t, p=2),
    "nst": lambda s, t: F.nst(s, t),
    "hcl": lambda s, t: F.hierarchical_context(s, t, output_sizes=(2, 1)),
    "fsp": lambda s, t: F.fsp((s, s ** 2), (t, t ** 2)),
    "ofd": lambda s, t: F.ofd(s, t, margin=-0.5 * jnp.ones(3)),
    "vid": lambda s, t: F.vid(s, t, 1.5 * jnp.ones(3)),
    "ab": lambda s, t: F.activation_boundary(s, t),
    "ickd": lambda s, t: F.inter_channel_correlation(s, t),
    "affinity": lambda s, t: F.affinity(s, t),
    "pad_l2": lambda s, t: F.prime_aware_l2(s, t, 0.1 * jnp.ones((2, 48))),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_gradients_teacher_stop_and_dtypes(name):
  fn = jax.jit(PER_EXAMPLE[name])
  s, t = normal(2, (2, 4, 4, 3)), normal(3, (2, 4, 4, 3))
  check_grads(jax.jit(lambda a: jnp.sum(fn(a, t))),
              (s,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)
  teacher_grad = jax.jit(jax.grad(lambda b: jnp.sum(fn(s, b))))(t)
  assert not np.any(np.asarray(teacher_grad))
  low, full = fn(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)), fn(s, t)
  assert low.dtype == jnp.float32 and low.shape == (2,)
  assert_close(low, full, tol=0.1 * float(jnp.max(jnp.abs(full))) + 1e-3)


# --- hyperparameter checks.

@pytest.mark.parametrize("call, match", [
    (lambda x: F.attention_transfer(x, x, p=0), "p must be > 0, got 0"),
    (lambda x: F.attention_transfer(x, x, mode="math"), "mode"),
    (lambda x: F.factor_transfer(x, x, p=0), "p must be a positive integer"),
    (lambda x: F.hierarchical_context(x, x, output_sizes=(0,)), "output_sizes"),
    (lambda x: F.ofd(x, x, margin=jnp.ones(7)), "margin must have shape"),
    (lambda x: F.fitnet(x, x[..., :2]), "student shape"),
    (lambda x: F.attention_transfer(x, x[:, :2]), "spatial"),
    (lambda x: F.adaptive_pool2d(x, (2, 2), reduce="sum"), "reduce"),
    (lambda x: F.activation_boundary(x, x, margin=-1.0), "margin must be >= 0"),
    (lambda x: F.prime_aware_l2(x, x, jnp.ones((2, 3))), "student_log_variance"),
    (lambda x: F.prime_aware_l2(x, x, x, eps=0.0), "eps must be > 0"),
    (lambda x: F.fsp(x, (x, x)), r"student_features must be a pair \(first, second\)"),
])
def test_invalid_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((2, 4, 4, 3)))


# --- modules.

def test_paraphraser_translator_shapes_and_ft_wiring():
  teacher_map, student_map = normal(4, (2, 4, 4, 6)), normal(5, (2, 4, 4, 3))
  paraphraser = M.Paraphraser(channels=6, rate=0.5)
  translator = M.Translator(features=3)

  @jax.jit
  def run(teacher_map, student_map):
    p_vars = paraphraser.init(jax.random.key(0), teacher_map, train=False)
    factor, recon = paraphraser.apply(p_vars, teacher_map, train=False)
    encoded = paraphraser.apply(p_vars, teacher_map, train=False, method=M.Paraphraser.encode)
    t_vars = translator.init(jax.random.key(1), student_map, train=False)

    def loss(params):
      out = translator.apply({**t_vars, "params": params}, student_map, train=False)
      return jnp.mean(F.factor_transfer(out, factor))

    return factor, recon, encoded, jax.grad(loss)(t_vars["params"])

  factor, recon, encoded, grads = run(teacher_map, student_map)
  assert factor.shape == (2, 4, 4, 3) and recon.shape == teacher_map.shape
  assert_close(encoded, factor)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_vid_regressor_initial_variance():
  variables = M.VIDRegressor(features=4, hidden_features=3, init_variance=2.0).init(
      jax.random.key(0), jnp.ones((1, 5)))
  variance = jax.nn.softplus(variables["params"]["softplus_variance"]) + 1e-5
  assert_close(variance, jnp.full(4, 2.0))
  with pytest.raises(ValueError, match="init_variance"):
    M.VIDRegressor(features=4, hidden_features=3, init_variance=0.0).init(
        jax.random.key(0), jnp.ones((1, 5)))


def test_attention_fusion_chain_shapes():
  deep, shallow = normal(6, (2, 2, 2, 8)), normal(7, (2, 4, 4, 4))
  first = M.AttentionFusion(mid_channels=5, out_channels=8, use_attention=False)
  second = M.AttentionFusion(mid_channels=5, out_channels=4, use_attention=True)
  (out1, res), _ = jax.eval_shape(partial(first.init_with_output, train=False),
                                  jax.random.key(0), deep)
  (out2, res2), _ = jax.eval_shape(partial(second.init_with_output, train=False),
                                   jax.random.key(1), shallow, res)
  assert out1.shape == deep.shape and out2.shape == shallow.shape and res2.shape == (2, 4, 4, 5)


def test_registered_feature_losses_metadata():
  names = [n for n in losses.list_losses() if losses.get_loss(n).kind == "features"]
  assert sorted(names) == ["ab", "at", "fitnet", "fsp", "ft", "ickd", "kta_affinity", "nst", "ofd",
                           "pad_l2", "reviewkd_hcl", "vid"]
  for name in names:
    spec = losses.get_loss(name)
    assert spec.per_example and not spec.takes_mask
