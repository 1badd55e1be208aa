"""Feature-map distillation losses: one value per example.

Feature maps are NHWC `[B, H, W, C]` (or `[B, D]` where noted). Positional inputs: the
student's tensor first, the teacher's counterpart second, auxiliary inputs (learned variances)
after them; hyperparameters are keyword-only. Every loss computes in float32, stops
gradients on its teacher inputs and returns `[B]` (no example couples to another, so there is no
`mask`); reduce with `kd_jax.losses.masked_mean(values, mask)`, whose batch mean equals the
reference's scalar. Losses with learnable parts (FitNet, OFD, AB, FT, VID, PAD, ICKD, ReviewKD)
take those parts' outputs; the parts themselves are Flax modules in `kd_jax.losses.modules`.
Where the reference sums several layer pairs with weights, call the loss once per pair and add.
"""
import math

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm as _normal

from kd_jax.losses.registry import register
from kd_jax.losses.utils import check_choice, check_non_negative, check_positive

# torch.nn.functional.normalize's default `eps`.
NORMALIZE_EPS = 1e-12


def as_float32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def teacher_float32(x) -> jax.Array:
  """The teacher side of a loss: float32, no gradient."""
  return jax.lax.stop_gradient(as_float32(x))


def flatten_examples(x: jax.Array) -> jax.Array:
  """`[B, ...]` → `[B, D]`."""
  return x.reshape(x.shape[0], -1)


def flatten_hw(x: jax.Array) -> jax.Array:
  """`[B, H, W, C]` → `[B, H·W, C]`."""
  return x.reshape(x.shape[0], -1, x.shape[-1])


def l2_normalize(x: jax.Array, axis=-1, eps: float = NORMALIZE_EPS) -> jax.Array:
  """`x / max(‖x‖₂, eps)` along `axis` (torch `F.normalize`)."""
  norm = safe_norm(x, axis=axis, keepdims=True)
  return x / jnp.maximum(norm, eps)


def safe_norm(x: jax.Array, axis=-1, keepdims: bool = False) -> jax.Array:
  """‖x‖₂ along `axis` with a zero (not NaN) gradient at x = 0."""
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def adaptive_pool2d(x: jax.Array, output_size: tuple[int, int], *, reduce: str = "avg") -> jax.Array:
  """torch `adaptive_{avg,max}_pool2d` on NHWC: bins `[⌊i·H/h⌋, ⌈(i+1)·H/h⌉)`.

  Args:
    x: `[B, H, W, C]`.
    output_size: `(h, w)`, each at most the input's.
    reduce: `"avg"` or `"max"`.
  Returns:
    `[B, h, w, C]`.

  >>> adaptive_pool2d(jnp.arange(16.).reshape(1, 4, 4, 1), (2, 2))[0, :, :, 0]
  Array([[ 2.5,  4.5],
         [10.5, 12.5]], dtype=float32)
  """
  check_choice("adaptive_pool2d", "reduce", reduce, ("avg", "max"))
  pool = jnp.mean if reduce == "avg" else jnp.max
  for axis, out in zip((1, 2), output_size):
    size = x.shape[axis]
    if out == size:
      continue
    if not 0 < out <= size:
      raise ValueError(f"output_size {tuple(output_size)} must be positive and at most the "
                       f"input's spatial size {x.shape[1:3]}")
    bins = [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]
    x = jnp.concatenate([pool(jax.lax.slice_in_dim(x, a, b, axis=axis), axis=axis, keepdims=True)
                         for a, b in bins], axis=axis)
  return x


def _check_same_shape(name: str, student: jax.Array, teacher: jax.Array):
  if student.shape != teacher.shape:
    raise ValueError(f"{name}: student shape {student.shape} != teacher shape {teacher.shape}; "
                     "map the student feature to the teacher's shape first (e.g. with "
                     "kd_jax.losses.modules.HintRegressor)")


def _check_nhwc(name: str, x: jax.Array):
  if x.ndim != 4:
    raise ValueError(f"{name} expects NHWC feature maps [B, H, W, C], got shape {x.shape}")


def _mean_over_example(x: jax.Array) -> jax.Array:
  return jnp.mean(flatten_examples(x), axis=1)


def fitnet(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """FitNet hint loss: mean squared error per example.

  ℓ_b = mean_{h,w,c} (r(s)_b − t_b)², where `student_features` is already the output of
  the student's regressor r (`modules.HintRegressor`, whose params live in
  `TrainState.distill_params`).

  Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. Reference: torchdistill
  `MSELoss` on a `models.adaptation.ConvReg` output (RepDistiller `HintLoss`).

  Args:
    student_features: `[B, ...]` regressed student features.
    teacher_features: `[B, ...]` same shape.
  Returns:
    `[B]` float32.

  >>> float(fitnet(jnp.ones((2, 3)), jnp.zeros((2, 3)))[0])
  1.0
  """
  _check_same_shape("fitnet", student_features, teacher_features)
  diff = as_float32(student_features) - teacher_float32(teacher_features)
  return _mean_over_example(jnp.square(diff))


def attention_map(features: jax.Array, *, p: float = 2.0) -> jax.Array:
  """Spatial attention `normalize(mean_c |f|^p)` of NHWC features, flattened to `[B, H·W]`."""
  return l2_normalize(flatten_examples(jnp.mean(jnp.abs(as_float32(features)) ** p, axis=-1)))


def attention_transfer(student_features: jax.Array, teacher_features: jax.Array, *,
                       p: float = 2.0, mode: str = "code") -> jax.Array:
  """Attention transfer (AT) between spatial attention maps.

  With Q = `normalize(mean_c |F|^p)` flattened over H·W:
  `mode="code"` (authors' code, torchdistill default): ℓ_b = mean_{hw} (Q_s − Q_t)²;
  `mode="paper"` (Eq. 2): ℓ_b = ‖Q_s − Q_t‖₂.

  Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017. Reference:
  torchdistill `ATLoss` (one pair; p is fixed to 2 there, RepDistiller `Attention(p=2)`).
  Channel counts may differ; spatial sizes must match.

  Args:
    student_features: `[B, H, W, Cs]`.
    teacher_features: `[B, H, W, Ct]`.
    p: exponent of the activation magnitudes, > 0 (may be traced).
    mode: `"code"` or `"paper"` (static).
  Returns:
    `[B]` float32.

  >>> x = jnp.arange(24.).reshape(1, 2, 3, 4)
  >>> float(attention_transfer(x, 2 * x)[0])
  0.0
  """
  check_positive("attention_transfer", p=p)
  check_choice("attention_transfer", "mode", mode, ("code", "paper"))
  _check_nhwc("attention_transfer", student_features)
  _check_nhwc("attention_transfer", teacher_features)
  if student_features.shape[:3] != teacher_features.shape[:3]:
    raise ValueError(f"attention_transfer: student {student_features.shape} and teacher "
                     f"{teacher_features.shape} differ in batch or spatial size; pool one first "
                     "(adaptive_pool2d)")
  diff = attention_map(student_features, p=p) - attention_map(teacher_float32(teacher_features), p=p)
  if mode == "code":
    return jnp.mean(jnp.square(diff), axis=1)
  return safe_norm(diff, axis=1)


def fsp_matrix(first: jax.Array, second: jax.Array) -> jax.Array:
  """Flow of solution procedure G = F₁ᵀF₂ / (h·w): `[B, C1, C2]`.

  The larger map is adaptive-max-pooled to the smaller spatial size first (torchdistill).
  """
  _check_nhwc("fsp", first)
  _check_nhwc("fsp", second)
  target = (min(first.shape[1], second.shape[1]), min(first.shape[2], second.shape[2]))
  first = adaptive_pool2d(as_float32(first), target, reduce="max")
  second = adaptive_pool2d(as_float32(second), target, reduce="max")
  hw = target[0] * target[1]
  return jnp.einsum("bxi,bxj->bij", flatten_hw(first), flatten_hw(second)) / hw


def _feature_pair(name: str, features) -> tuple[jax.Array, jax.Array]:
  if not (isinstance(features, (tuple, list)) and len(features) == 2):
    raise ValueError(f"{name} must be a pair (first, second) of feature maps, got "
                     f"{type(features).__name__}")
  return features[0], features[1]


def fsp(student_features, teacher_features) -> jax.Array:
  """FSP loss between flow matrices of two layers.

  ℓ_b = Σ_j ‖G_s[b, :, j] − G_t[b, :, j]‖₂ with G = `fsp_matrix(first, second)` (note: a sum
  of column L2 norms, not a squared Frobenius norm, as in torchdistill).

  Yim et al., "A Gift From Knowledge Distillation", CVPR 2017. Reference: torchdistill
  `FSPLoss` (one pair, weight 1).

  Args:
    student_features: a pair `(first, second)` of student maps `[B, H, W, C1]`,
      `[B, H', W', C2]` (the input and output of a stage).
    teacher_features: the teacher's pair, with the same channel counts C1, C2.
  Returns:
    `[B]` float32.

  >>> a, b = jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 5))
  >>> fsp((a, b), (a, b)).shape
  (2,)
  """
  student_first, student_second = _feature_pair("fsp: student_features", student_features)
  teacher_first, teacher_second = _feature_pair("fsp: teacher_features", teacher_features)
  student = fsp_matrix(student_first, student_second)
  teacher = fsp_matrix(teacher_float32(teacher_first), teacher_float32(teacher_second))
  _check_same_shape("fsp (flow matrices)", student, teacher)
  return jnp.sum(safe_norm(student - teacher, axis=1), axis=1)


def factor_transfer(student_factor: jax.Array, teacher_factor: jax.Array, *, p: int = 1) -> jax.Array:
  """Factor transfer (FT) between the translator's and the paraphraser's factors.

  With u = f / ‖f‖₂ over all non-batch entries (D of them): `p=1`: ℓ_b =
  `mean_d |u_s − u_t|` (torchdistill's `l1_loss(reduction='mean')`);
  `p≥2`: ℓ_b = ‖u_s − u_t‖_p.

  Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer",
  NeurIPS 2018. Reference: torchdistill `FTLoss(p=1, reduction='mean')`. Wiring:
  `student_factor = modules.Translator` on the student map, `teacher_factor =
  modules.Paraphraser(...).encode` on the teacher map (paraphraser trained beforehand by
  reconstruction and frozen).

  Args:
    student_factor: `[B, ...]`.
    teacher_factor: `[B, ...]` same shape.
    p: norm order, a positive Python integer (static: it selects the formula).
  Returns:
    `[B]` float32.

  >>> float(factor_transfer(jnp.ones((1, 4)), 3 * jnp.ones((1, 4)))[0])
  0.0
  """
  if not (isinstance(p, int) and p >= 1):
    raise ValueError(f"factor_transfer: p must be a positive integer, got {p!r}")
  _check_same_shape("factor_transfer", student_factor, teacher_factor)
  diff = (l2_normalize(flatten_examples(as_float32(student_factor))) -
          l2_normalize(flatten_examples(teacher_float32(teacher_factor))))
  if p == 1:
    return jnp.mean(jnp.abs(diff), axis=1)
  if p == 2:
    return safe_norm(diff, axis=1)
  total = jnp.sum(jnp.abs(diff) ** p, axis=1)
  positive = total > 0
  return jnp.where(positive, jnp.where(positive, total, 1.0) ** (1.0 / p), 0.0)


def vid(student_mean: jax.Array, teacher_features: jax.Array,
        student_variance: jax.Array) -> jax.Array:
  """Variational information distillation: Gaussian negative log-likelihood of the teacher.

  ℓ_b = mean_{h,w,c} ½[(μ_b − t_b)² / σ²_c + log σ²_c] (the constant ½log 2π dropped).

  Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019.
  Reference: torchdistill `VIDLoss` (one pair) with `Regressor4VID`; RepDistiller `VIDLoss`.
  Wiring: `student_mean, student_variance = modules.VIDRegressor(...)(student_map)`.

  Args:
    student_mean: `[B, H, W, C]` (or `[B, D]`) predicted mean.
    teacher_features: same shape as `student_mean`.
    student_variance: positive variance broadcastable to it, e.g. `[C]`.
  Returns:
    `[B]` float32.

  >>> float(vid(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(2))[0])
  0.0
  """
  _check_same_shape("vid", student_mean, teacher_features)
  variance = as_float32(student_variance)
  diff = as_float32(student_mean) - teacher_float32(teacher_features)
  nll = 0.5 * (jnp.square(diff) / variance + jnp.log(variance))
  return _mean_over_example(nll)


def _pool_to_common_size(student: jax.Array, teacher: jax.Array):
  size = (min(student.shape[1], teacher.shape[1]), min(student.shape[2], teacher.shape[2]))
  return adaptive_pool2d(student, size), adaptive_pool2d(teacher, size)


def nst(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """Neuron selectivity transfer: squared MMD with the polynomial kernel k(a, b) = (aᵀb)².

  Each channel's spatial map, L2-normalised over H·W, is one sample; the student's and the
  teacher's channels are the two sets (channel counts may differ). The larger map is
  adaptive-average-pooled to the smaller spatial size.
  ℓ_b = mean_{ij} k(t_i, t_j) + mean_{ij} k(s_i, s_j) − 2 mean_{ij} k(s_i, t_j).

  Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
  2017. Reference: RepDistiller `NSTLoss` (full loss; torchdistill 1.1.5 has no NST).

  Args:
    student_features: `[B, H, W, Cs]`.
    teacher_features: `[B, H', W', Ct]`.
  Returns:
    `[B]` float32 (≥ 0; 0 when the channel sets coincide).

  >>> x = jnp.arange(24.).reshape(1, 2, 3, 4)
  >>> abs(float(nst(x, x)[0])) < 1e-6
  True
  """
  _check_nhwc("nst", student_features)
  _check_nhwc("nst", teacher_features)
  student, teacher = _pool_to_common_size(as_float32(student_features),
                                          teacher_float32(teacher_features))
  # [B, C, H·W], one normalised sample per channel.
  student = l2_normalize(jnp.swapaxes(flatten_hw(student), 1, 2))
  teacher = l2_normalize(jnp.swapaxes(flatten_hw(teacher), 1, 2))

  def kernel_mean(a, b):
    return jnp.mean(jnp.square(jnp.einsum("bix,bjx->bij", a, b)), axis=(1, 2))

  return kernel_mean(teacher, teacher) + kernel_mean(student, student) - 2 * kernel_mean(student, teacher)


def ofd_margin(bn_scale: jax.Array, bn_bias: jax.Array) -> jax.Array:
  """OFD's per-channel margin: the mean of the teacher's negative pre-ReLU responses.

  For a BatchNorm with scale γ and shift β (so responses ~ N(β, γ²)), with s = `|γ|`:
  m = β − s·φ(β/s) / Φ(−β/s) if Φ(−β/s) > 0.001, else −3s.

  Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019. Reference:
  clovaai/overhaul-distillation `get_margin_from_BN`.

  Args:
    bn_scale, bn_bias: `[C]` the teacher BatchNorm's scale and bias (before its ReLU).
  Returns:
    `[C]` float32 margins (negative).

  >>> bool(ofd_margin(jnp.ones(3), jnp.zeros(3))[0] < 0)
  True
  """
  s = jnp.abs(as_float32(bn_scale))
  m = as_float32(bn_bias)
  tail = _normal.cdf(-m / s)
  truncated_mean = m - s * jnp.exp(-jnp.square(m / s) / 2) / math.sqrt(2 * math.pi) / tail
  return jnp.where(tail > 0.001, truncated_mean, -3 * s)


def ofd(student_features: jax.Array, teacher_features: jax.Array, *, margin: jax.Array) -> jax.Array:
  """Overhaul feature distillation: partial L2 to the margin-ReLU'd teacher.

  With t' = max(t, m): ℓ_b = Σ_{h,w,c} (s − t')² · 1[s > t' or t' > 0]. The student map is
  the connector output (1×1 conv + BN, e.g. `modules.HintRegressor(kernel_size=1,
  use_relu=False)`) taken before its ReLU, and the teacher map is the pre-ReLU feature.

  Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019. Reference:
  clovaai/overhaul-distillation `distillation_loss` (their training divides the batch sum by
  batch size and 1000 and weighs stage i by 2^−(n−i−1): apply those in the objective).
  torchdistill 1.1.5 has no OFD.

  Args:
    student_features: `[B, H, W, C]`.
    teacher_features: `[B, H, W, C]`.
    margin: `[C]` margins (required; an array, so it may be traced), e.g.
      `ofd_margin(bn_scale, bn_bias)` or a running mean of the teacher's negative responses.
  Returns:
    `[B]` float32.

  >>> t = jnp.array([[-5., 2.]])
  >>> float(ofd(jnp.array([[-9., 2.]]), t, margin=jnp.array([-1., -1.]))[0])
  0.0
  """
  _check_same_shape("ofd", student_features, teacher_features)
  margin = jnp.asarray(margin, jnp.float32)
  if margin.shape not in ((), (student_features.shape[-1],)):
    raise ValueError(f"ofd: margin must have shape ({student_features.shape[-1]},) (one per "
                     f"channel), got {margin.shape}")
  student = as_float32(student_features)
  target = jnp.maximum(teacher_float32(teacher_features), jax.lax.stop_gradient(margin))
  active = (student > target) | (target > 0)
  return jnp.sum(flatten_examples(jnp.where(active, jnp.square(student - target), 0.0)), axis=1)


def hierarchical_context(student_features: jax.Array, teacher_features: jax.Array, *,
                         output_sizes: tuple[int, ...] = (4, 2, 1)) -> jax.Array:
  """ReviewKD's hierarchical context loss (HCL): MSE over a spatial pyramid.

  ℓ_b = [MSE(s, t) + Σ_k w_k MSE(pool_k(s), pool_k(t))] / (1 + Σ_k w_k), over the sizes
  k < H in order, with w halving from ½ and pool_k adaptive average pooling to k×k; MSE is
  the mean over one example's entries.

  Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021. Reference:
  torchdistill `HierarchicalContextLoss(reduction='mean', output_sizes=[4, 2, 1])`.
  Wiring: `student_features` is the output of the `modules.AttentionFusion` chain for this
  stage, `teacher_features` the teacher's map at that stage.

  Args:
    student_features: `[B, H, W, C]`.
    teacher_features: `[B, H, W, C]`.
    output_sizes: pyramid sizes, each a positive int (static: they set shapes).
  Returns:
    `[B]` float32.

  >>> x = jnp.ones((2, 4, 4, 3))
  >>> float(hierarchical_context(x, x)[0])
  0.0
  """
  if any(not (isinstance(k, int) and k > 0) for k in output_sizes):
    raise ValueError(f"hierarchical_context: output_sizes must be positive ints, got {output_sizes}")
  _check_nhwc("hierarchical_context", student_features)
  _check_same_shape("hierarchical_context", student_features, teacher_features)
  student = as_float32(student_features)
  teacher = teacher_float32(teacher_features)
  loss = _mean_over_example(jnp.square(student - teacher))
  weight, total_weight = 1.0, 1.0
  for k in output_sizes:
    if k >= student.shape[1]:
      continue
    weight /= 2.0
    pooled = adaptive_pool2d(student, (k, k)) - adaptive_pool2d(teacher, (k, k))
    loss = loss + weight * _mean_over_example(jnp.square(pooled))
    total_weight += weight
  return loss / total_weight


def activation_boundary(student_features: jax.Array, teacher_features: jax.Array, *,
                        margin: float = 1.0) -> jax.Array:
  """Distillation of activation boundaries (AB/DAB): a hinge on the teacher's on/off pattern.

  ℓ_b = Σ_{h,w,c} (s + μ)²·1[s > −μ, t ≤ 0] + (s − μ)²·1[s ≤ μ, t > 0], μ the margin;
  `student_features` is the connector output (`modules.HintRegressor(C_t, kernel_size=1,
  use_relu=False)`), both taken before their ReLU.

  Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
  Neurons", AAAI 2019. Reference: torchdistill `AltActTransferLoss(reduction='mean')` (its
  sample config and the paper use margin 1).

  Args:
    student_features: `[B, ...]`.
    teacher_features: `[B, ...]` same shape.
    margin: μ ≥ 0 (may be traced).
  Returns:
    `[B]` float32.

  >>> float(activation_boundary(jnp.array([[2., -2.]]), jnp.array([[1., -1.]]))[0])
  0.0
  """
  check_non_negative("activation_boundary", margin=margin)
  _check_same_shape("activation_boundary", student_features, teacher_features)
  s = as_float32(student_features)
  t = teacher_float32(teacher_features)
  loss = (jnp.where((s > -margin) & (t <= 0), jnp.square(s + margin), 0.0) +
          jnp.where((s <= margin) & (t > 0), jnp.square(s - margin), 0.0))
  return jnp.sum(flatten_examples(loss), axis=1)


def prime_aware_l2(student_features: jax.Array, teacher_features: jax.Array,
                   student_log_variance: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """Prime-aware adaptive distillation (PAD) with an L2 loss weighted by learned variances.

  ℓ_b = mean_d [(t_bd − s_bd)² / (ε + exp(v_bd)) + v_bd], v the predicted log-variances
  (`modules.HintRegressor(D, use_relu=False)` on the student embedding, torchdistill's
  `VarianceBranch4PAD`).

  Zhang et al., "Prime-Aware Adaptive Distillation", ECCV 2020. Reference: torchdistill
  `PADL2Loss(eps=1e-6, reduction='mean')`.

  Args:
    student_features: `[B, ...]` student embedding.
    teacher_features: `[B, ...]` same shape as the student's.
    student_log_variance: `[B, D]` log-variances, D the flattened width.
    eps: > 0 (may be traced).
  Returns:
    `[B]` float32.

  >>> float(prime_aware_l2(jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.zeros((1, 2)))[0])
  0.0
  """
  check_positive("prime_aware_l2", eps=eps)
  _check_same_shape("prime_aware_l2", student_features, teacher_features)
  s = flatten_examples(as_float32(student_features))
  t = flatten_examples(teacher_float32(teacher_features))
  v = as_float32(student_log_variance)
  if v.shape != s.shape:
    raise ValueError(f"prime_aware_l2: student_log_variance must have shape {s.shape}, got {v.shape}")
  return jnp.mean(jnp.square(t - s) / (eps + jnp.exp(v)) + v, axis=1)


def inter_channel_correlation(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """Inter-channel correlation (ICKD): match row-normalised channel Gram matrices.

  G = row_normalize(F Fᵀ) with F the `[C, H·W]` map of one example;
  ℓ_b = ‖G_s − G_t‖²_F / C. torchdistill's `ChSimLoss` value is `mean_b ℓ_b / B` (it divides
  the batch sum by C·B²); here the extra 1/B is left out so that the value does not depend on
  the batch size: multiply by 1/B to reproduce it.

  Liu et al., "Exploring Inter-Channel Correlation for Diversity-Preserved Knowledge
  Distillation", ICCV 2021. Reference: torchdistill `ChSimLoss` with `ChannelSimilarityEmbed`
  (= `modules.HintRegressor(C_t, kernel_size=3, use_bias=False, use_relu=False)`).

  Args:
    student_features: `[B, H, W, C]` embedded student map.
    teacher_features: `[B, H, W, C]`.
  Returns:
    `[B]` float32.

  >>> x = jnp.arange(24.).reshape(1, 2, 3, 4)
  >>> float(inter_channel_correlation(x, 2 * x)[0])
  0.0
  """
  _check_nhwc("inter_channel_correlation", student_features)
  _check_same_shape("inter_channel_correlation", student_features, teacher_features)

  def gram(x):
    x = flatten_hw(x)
    return l2_normalize(jnp.einsum("bxi,bxj->bij", x, x), axis=2)

  diff = gram(as_float32(student_features)) - gram(teacher_float32(teacher_features))
  return jnp.sum(jnp.square(diff), axis=(1, 2)) / student_features.shape[-1]


def affinity(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """KTA affinity distillation: compare each channel's spatial self-affinity.

  With u_c the unit-normalised `[H·W]` map of channel c:
  ℓ_b = Σ_c ‖u_c u_cᵀ − v_c v_cᵀ‖_F / (H·W), evaluated as √(‖u‖⁴ + ‖v‖⁴ − 2⟨u, v⟩²) / (H·W),
  so memory stays O(B·C·H·W) instead of the (H·W)² affinity matrices.

  He et al., "Knowledge Adaptation for Efficient Semantic Segmentation", CVPR 2019.
  Reference: torchdistill `AffinityLoss(reduction='mean')`.

  Args:
    student_features: `[B, H, W, C]` (the student's affinity adapter output).
    teacher_features: `[B, H, W, C]` (the teacher paraphraser's encoder output).
  Returns:
    `[B]` float32.

  >>> x = jnp.arange(1., 25.).reshape(1, 2, 3, 4)
  >>> abs(float(affinity(x, 3 * x)[0])) < 1e-3
  True
  """
  _check_nhwc("affinity", student_features)
  _check_same_shape("affinity", student_features, teacher_features)
  u = l2_normalize(flatten_hw(as_float32(student_features)), axis=1)
  v = l2_normalize(flatten_hw(teacher_float32(teacher_features)), axis=1)
  uu, vv, uv = (jnp.sum(a * b, axis=1) for a, b in ((u, u), (v, v), (u, v)))
  squared = jnp.maximum(jnp.square(uu) + jnp.square(vv) - 2 * jnp.square(uv), 0.0)
  positive = squared > 0
  norms = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return jnp.sum(norms, axis=1) / u.shape[1]


_TD = "torchdistill 1.1.5 losses.mid_level."
for _name, _fn, _paper, _reference in (
    ("fitnet", fitnet, "Romero et al., FitNets, ICLR 2015",
     "torchdistill MSELoss + models.adaptation.ConvReg; RepDistiller HintLoss"),
    ("at", attention_transfer, "Zagoruyko & Komodakis, Attention Transfer, ICLR 2017",
     _TD + "ATLoss"),
    ("fsp", fsp, "Yim et al., FSP, CVPR 2017", _TD + "FSPLoss"),
    ("ft", factor_transfer, "Kim et al., Factor Transfer, NeurIPS 2018", _TD + "FTLoss"),
    ("vid", vid, "Ahn et al., VID, CVPR 2019", _TD + "VIDLoss + models.wrapper.Regressor4VID"),
    ("nst", nst, "Huang & Wang, Neuron Selectivity Transfer, arXiv 2017",
     "RepDistiller distiller_zoo/NST.py NSTLoss"),
    ("ofd", ofd, "Heo et al., Overhaul of Feature Distillation, ICCV 2019",
     "clovaai/overhaul-distillation distiller.py distillation_loss"),
    ("reviewkd_hcl", hierarchical_context, "Chen et al., Knowledge Review, CVPR 2021",
     _TD + "HierarchicalContextLoss + models.wrapper.AttentionBasedFusion"),
    ("ab", activation_boundary, "Heo et al., Activation Boundaries, AAAI 2019",
     _TD + "AltActTransferLoss"),
    ("pad_l2", prime_aware_l2, "Zhang et al., PAD, ECCV 2020",
     _TD + "PADL2Loss + models.wrapper.VarianceBranch4PAD"),
    ("ickd", inter_channel_correlation, "Liu et al., ICKD, ICCV 2021",
     _TD + "ChSimLoss (without its extra 1/B)"),
    ("kta_affinity", affinity, "He et al., KTA, CVPR 2019", _TD + "AffinityLoss"),
):
  register(_name, _fn, per_example=True, kind="features", paper=_paper, reference=_reference)
