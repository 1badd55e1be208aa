"""Logit distillation losses as pure per-example functions (optax conventions).

Positional inputs: the student's tensor first, the teacher's counterpart second, auxiliary
inputs (labels, class means) after them. Keyword-only: `mask` (`[B]`, 1 = real example, 0 =
padding) on the losses whose value couples examples, and the hyperparameters; float
hyperparameters may be traced (e.g. a jitted temperature schedule). Every function returns one
value per example `[B]` unless its docstring says it is a batch-relation loss (one scalar per
batch). Inputs of any float dtype are computed in at least float32 (bf16 in, f32 out); teacher
inputs are wrapped in `jax.lax.stop_gradient`. `labels` are `[B]` integer ids or `[B, C]` soft
labels, whose argmax is the ground-truth class (as the references do).
"""
import jax
import jax.numpy as jnp

from kd_jax.losses.registry import register
from kd_jax.losses.utils import check_choice, check_hparam, check_non_negative, check_positive

Array = jax.Array


def _float(x: Array) -> Array:
  """Casts to at least float32 (bf16/f16 → f32; f64 stays f64 when x64 is on)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _student_teacher(student: Array, teacher: Array) -> tuple[Array, Array]:
  if student.shape != teacher.shape:
    raise ValueError(f"student and teacher shapes differ: {student.shape} vs {teacher.shape}")
  return _float(student), jax.lax.stop_gradient(_float(teacher))


def _hard_label_ids(labels: Array) -> Array:
  """`[B]` ids, or the argmax of `[B, C]` soft labels."""
  labels = jnp.asarray(labels)
  return jnp.argmax(labels, axis=-1) if labels.ndim == 2 else labels


def _one_hot_labels(labels: Array, num_classes: int) -> Array:
  """`[B, C]` boolean one-hot of the (arg)max class."""
  return jax.nn.one_hot(_hard_label_ids(labels), num_classes, dtype=jnp.bool_)


def _kl(log_p: Array, log_q: Array) -> Array:
  """KL(p ‖ q) over the last axis from log-probabilities; `[B]`."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _non_target_log_softmax(logits: Array, target: Array) -> Array:
  """log-softmax over the classes where `target` is False; 0 at the target class."""
  masked = jnp.where(target, -jnp.inf, logits)
  lse = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
  return jnp.where(target, 0.0, logits - lse)


def _masked_batch_mean(values: Array, mask: Array | None) -> Array:
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask, values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kd(student_logits: Array, teacher_logits: Array, *, temperature: float = 4.0) -> Array:
  """Hinton KD: T²·KL(softmax(t/T) ‖ softmax(s/T)) per example.

  Args:
    student_logits, teacher_logits: `[B, C]`.
    temperature: T > 0.
  Returns:
    `[B]` float32. Its mean equals torchdistill `KDLoss(temperature=T)` with 'batchmean'
    reduction times T² (the soft term of `alpha·CE + beta·T²·KL`).

  Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS-W 2014.
  Reference: torchdistill `losses.mid_level.KDLoss`.

  >>> s = jnp.array([[2., 1., 0.]]); t = jnp.array([[1., 2., 0.]])
  >>> float(kd(s, s)[0])
  0.0
  >>> round(float(kd(s, t, temperature=1.0)[0]), 4)
  0.4205
  """
  check_positive("kd", temperature=temperature)
  s, t = _student_teacher(student_logits, teacher_logits)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  return temperature**2 * _kl(log_pt, log_ps)


def reverse_kl(student_logits: Array, teacher_logits: Array, *,
               temperature: float = 1.0) -> Array:
  """Reverse KL: T²·KL(softmax(s/T) ‖ softmax(t/T)) per example (mode-seeking).

  Args:
    student_logits, teacher_logits: `[B, C]`.
    temperature: T > 0.
  Returns:
    `[B]` float32.

  Used as a KD objective e.g. in Gu et al., "MiniLLM", ICLR 2024; no torchdistill class.

  >>> s = jnp.array([[2., 0., 0.]]); t = jnp.zeros((1, 3))
  >>> round(float(reverse_kl(s, t)[0]), 4), round(float(kd(s, t, temperature=1.0)[0]), 4)
  (0.433, 0.4743)
  """
  check_positive("reverse_kl", temperature=temperature)
  s, t = _student_teacher(student_logits, teacher_logits)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  return temperature**2 * _kl(log_ps, log_pt)


def jensen_shannon(student_logits: Array, teacher_logits: Array, *,
                   temperature: float = 1.0) -> Array:
  """Jensen–Shannon divergence: T²·[½KL(p_t ‖ m) + ½KL(p_s ‖ m)], m = ½(p_s + p_t).

  Symmetric, bounded by T²·log 2, computed in log-space.

  Args:
    student_logits, teacher_logits: `[B, C]`.
    temperature: T > 0.
  Returns:
    `[B]` float32.

  Lin, "Divergence measures based on the Shannon entropy", IEEE T-IT 1991; no torchdistill class.

  >>> s = jnp.array([[2., 1., 0.]]); t = jnp.array([[1., 2., 0.]])
  >>> round(float(jensen_shannon(s, t)[0]), 4)
  0.101
  """
  check_positive("jensen_shannon", temperature=temperature)
  s, t = _student_teacher(student_logits, teacher_logits)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  log_m = jnp.logaddexp(log_ps, log_pt) - jnp.log(2.0)
  return temperature**2 * 0.5 * (_kl(log_pt, log_m) + _kl(log_ps, log_m))


def logit_mse(student_logits: Array, teacher_logits: Array) -> Array:
  """Mean squared error between logits, averaged over classes: mean_c (s_c − t_c)².

  Args:
    student_logits, teacher_logits: `[B, C]`.
  Returns:
    `[B]` float32; its mean equals `torch.nn.functional.mse_loss(s, t)`.

  Kim et al., "Comparing Kullback-Leibler Divergence and Mean Squared Error Loss in Knowledge
  Distillation", IJCAI 2021 (github.com/jhoon-oh/kd_data).

  >>> float(logit_mse(jnp.array([[1., 3.]]), jnp.array([[0., 1.]]))[0])
  2.5
  """
  s, t = _student_teacher(student_logits, teacher_logits)
  return jnp.mean(jnp.square(s - t), axis=-1)


def dkd(student_logits: Array, teacher_logits: Array, labels: Array, *, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0) -> Array:
  """Decoupled KD: α·TCKD + β·NCKD per example.

  TCKD = T²·KL([p_t,gt, 1 − p_t,gt] ‖ [p_s,gt, 1 − p_s,gt]) on softmax(·/T);
  NCKD = T²·KL(p̂_t ‖ p̂_s), p̂ = softmax(·/T) over the non-target classes only (the reference
  masks the gt logit by subtracting 1000). The warm-up factor min(epoch/warmup, 1) is NOT
  included: multiply by `kd_jax.losses.warmup_factor(step, warmup_steps)`.

  Args:
    student_logits, teacher_logits: `[B, C]`.
    labels: `[B]` int or `[B, C]` soft (argmax is the target).
    alpha: TCKD weight (mdistiller CIFAR default 1.0).
    beta: NCKD weight (mdistiller CIFAR default 8.0; 0.5 on ImageNet).
    temperature: T > 0 (default 4.0).
  Returns:
    `[B]` float32; its mean equals mdistiller `dkd_loss`.

  Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.
  Reference: megvii-research/mdistiller `mdistiller/distillers/DKD.py` (`dkd_loss`).

  >>> s = jnp.array([[2., 1., 0.]]); t = jnp.array([[1., 2., 0.]])
  >>> float(dkd(t, t, jnp.array([0]))[0])
  0.0
  >>> round(float(dkd(s, t, jnp.array([0]), temperature=1.0)[0]), 4)
  0.9069
  """
  check_positive("dkd", temperature=temperature)
  check_non_negative("dkd", alpha=alpha, beta=beta)
  s, t = _student_teacher(student_logits, teacher_logits)
  target = _one_hot_labels(labels, s.shape[-1])
  s, t = s / temperature, t / temperature

  def binary_log_probs(logits):
    log_p = jax.nn.log_softmax(logits, axis=-1)
    log_p_gt = jnp.sum(jnp.where(target, log_p, 0.0), axis=-1)
    log_p_rest = jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_p), axis=-1)
    return jnp.stack([log_p_gt, log_p_rest], axis=-1)

  tckd = _kl(binary_log_probs(t), binary_log_probs(s))
  nckd = _kl(_non_target_log_softmax(t, target), _non_target_log_softmax(s, target))
  return temperature**2 * (alpha * tckd + beta * nckd)


def nkd(student_logits: Array, teacher_logits: Array, labels: Array, *,
        temperature: float = 1.0, gamma: float = 1.5) -> Array:
  """Normalized KD: −p_t,gt·log p_s,gt − γ·T²·Σ_{i≠gt} p̂_t,i·log p̂_s,i per example.

  The target term uses softmax at T=1; p̂ = softmax(·/T) over the non-target logits only.

  Args:
    student_logits, teacher_logits: `[B, C]`.
    labels: `[B]` int or `[B, C]` soft (argmax is the target).
    temperature: T > 0 (default 1.0).
    gamma: weight of the non-target term (default 1.5).
  Returns:
    `[B]` float32; its mean equals cls_KD `NKDLoss`.

  Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
  with Normalized Loss and Customized Soft Labels", ICCV 2023.
  Reference: yzd-v/cls_KD `mmcls/models/dis_losses/nkd.py` (`NKDLoss`).

  >>> s = jnp.array([[2., 1., 0.]]); t = jnp.array([[1., 2., 0.]])
  >>> round(float(nkd(s, t, jnp.array([0]))[0]), 4)
  0.7484
  """
  check_positive("nkd", temperature=temperature)
  check_non_negative("nkd", gamma=gamma)
  s, t = _student_teacher(student_logits, teacher_logits)
  target = _one_hot_labels(labels, s.shape[-1])
  log_ps = jax.nn.log_softmax(s, axis=-1)
  pt = jax.nn.softmax(t, axis=-1)
  target_term = -jnp.sum(jnp.where(target, pt * log_ps, 0.0), axis=-1)
  log_ps_non = _non_target_log_softmax(s / temperature, target)
  pt_non = jnp.where(target, 0.0, jnp.exp(_non_target_log_softmax(t / temperature, target)))
  non_target_term = -gamma * temperature**2 * jnp.sum(pt_non * log_ps_non, axis=-1)
  return target_term + non_target_term


def uskd(student_logits: Array, weak_logits: Array, labels: Array, *, mask: Array | None = None,
         alpha: float = 1.0, beta: float = 0.1, mu: float = 0.005) -> Array:
  """Teacher-free USKD: α·target term + β·Zipf non-target term + μ·weak-supervision term.

  Per example, with p = softmax(s), w = softmax(weak) and gt the target class::

    target:     −q·log p_gt, q = sg(p_gt² + 1 − mean_batch(p_gt²));
    non-target: −Σ_{i≠gt} z_i·log p̂_i, p̂ = softmax over non-target student logits, z a Zipf
                distribution 1/rank over the non-target classes, ranked (descending) by
                w_i/(1 − w_gt + 1e-6) + log p_i/(1 − log p_gt + 1e-6) (the reference ranks by
                the student's log-probabilities; kept for parity);
    weak:       −Σ_i y_i·log w_i with y = 0.9·onehot + 0.1/C.

  `weak_logits` come from a linear head on an intermediate student feature (a
  `flax.linen.Dense(num_classes)` whose params live in the student-side state).

  The target term's soft label uses a batch mean (of the detached p_gt²), so `mask` removes
  padded examples from that mean; the values are per example.

  Args:
    student_logits: `[B, C]` final student logits.
    weak_logits: `[B, C]` logits of the weak head.
    labels: `[B]` int (soft labels are reduced to their argmax; the reference's top-2 mixup
      variant is not implemented).
    mask: `[B]` (1 = real example, 0 = padding) or None.
    alpha, beta, mu: term weights (reference defaults 1.0, 0.1, 0.005).
  Returns:
    `[B]` float32; its mean (no padding) equals cls_KD `USKDLoss` given `fc(fea_mid)`.

  Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
  with Normalized Loss and Customized Soft Labels", ICCV 2023.
  Reference: yzd-v/cls_KD `mmcls/models/dis_losses/uskd.py` (`USKDLoss`).

  >>> s = jnp.array([[2., 1., 0.], [0., 1., 2.]]); w = jnp.zeros((2, 3))
  >>> uskd(s, w, jnp.array([0, 2])).shape
  (2,)
  """
  check_non_negative("uskd", alpha=alpha, beta=beta, mu=mu)
  s, weak = _float(student_logits), _float(weak_logits)
  if s.shape != weak.shape:
    raise ValueError(f"student_logits and weak_logits shapes differ: {s.shape} vs {weak.shape}")
  num_classes = s.shape[-1]
  target = _one_hot_labels(labels, num_classes)

  log_p = jax.nn.log_softmax(s, axis=-1)
  log_p_gt = jnp.sum(jnp.where(target, log_p, 0.0), axis=-1)
  p_gt_sq = jax.lax.stop_gradient(jnp.exp(2.0 * log_p_gt))
  soft_target = p_gt_sq + 1.0 - _masked_batch_mean(p_gt_sq, mask)
  target_term = -soft_target * log_p_gt

  log_w = jax.nn.log_softmax(weak, axis=-1)
  smoothed = 0.9 * target + 0.1 / num_classes
  weak_term = -mu * jnp.sum(smoothed * log_w, axis=-1)

  w = jnp.exp(log_w)
  w_gt = jnp.sum(jnp.where(target, w, 0.0), axis=-1, keepdims=True)
  score = w / (1.0 - w_gt + 1e-6) + log_p / (1.0 - log_p_gt[:, None] + 1e-6)
  rank = jnp.argsort(jnp.argsort(-jax.lax.stop_gradient(score), axis=-1), axis=-1)
  zipf = jnp.where(target, 0.0, 1.0 / (rank + 1.0).astype(s.dtype))
  zipf = zipf / jnp.sum(zipf, axis=-1, keepdims=True)
  non_target_term = -jnp.sum(zipf * _non_target_log_softmax(s, target), axis=-1)
  return alpha * target_term + beta * non_target_term + weak_term


def _cosine_rows(x: Array, y: Array, eps: float) -> Array:
  """Cosine similarity of matching rows, as `torch.nn.functional.cosine_similarity`."""
  norms = (jnp.maximum(jnp.linalg.norm(x, axis=-1), eps) *
           jnp.maximum(jnp.linalg.norm(y, axis=-1), eps))
  return jnp.sum(x * y, axis=-1) / norms


def dist(student_logits: Array, teacher_logits: Array, *, mask: Array | None = None,
         beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
         eps: float = 1e-8) -> Array:
  """DIST (batch relation, ONE SCALAR PER BATCH): β·T²·inter + γ·T²·intra on softmax(·/T).

  inter = 1 − mean_i Pearson(p_s[i, :], p_t[i, :]) over examples;
  intra = 1 − mean_c Pearson(p_s[:, c], p_t[:, c]) over classes, correlating each class
  column across the (unmasked) examples of the batch.

  Args:
    student_logits, teacher_logits: `[B, C]`.
    mask: `[B]` (1 = real example) or None; masked examples leave both relations, so the
      result equals the loss on the sliced batch.
    beta, gamma: weights of the inter- and intra-class terms (default 1.0).
    temperature: T > 0, torchdistill's `tau` (default 1.0).
    eps: the cosine-similarity floor (default 1e-8).
  Returns:
    Scalar float32 (batch-level; do not `masked_mean` it again).

  Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.
  Reference: torchdistill `losses.mid_level.DISTLoss`.

  >>> t = jnp.array([[1., 2., 0.], [0., 1., 3.]])
  >>> abs(float(dist(t, t))) < 1e-6
  True
  """
  check_positive("dist", temperature=temperature)
  check_non_negative("dist", beta=beta, gamma=gamma)
  s, t = _student_teacher(student_logits, teacher_logits)
  ps = jax.nn.softmax(s / temperature, axis=-1)
  pt = jax.nn.softmax(t / temperature, axis=-1)
  m = jnp.ones(ps.shape[:1], ps.dtype) if mask is None else jnp.asarray(mask, ps.dtype)
  m = m[:, None]

  def center_rows(p):
    return p - jnp.mean(p, axis=-1, keepdims=True)

  def center_columns(p):  # over the real examples only; padded rows become zero
    return (p - jnp.sum(p * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)) * m

  inter = 1.0 - _masked_batch_mean(_cosine_rows(center_rows(ps), center_rows(pt), eps), mask)
  intra = 1.0 - jnp.mean(_cosine_rows(center_columns(ps).T, center_columns(pt).T, eps))
  return temperature**2 * (beta * inter + gamma * intra)


def logit_standardized_kd(student_logits: Array, teacher_logits: Array, *,
                          temperature: float = 2.0, eps: float = 1e-7) -> Array:
  """KD on z-scored logits: T²·KL(softmax(z(t)/T) ‖ softmax(z(s)/T)), z(l) = (l − mean)/(eps + std).

  `std` is the unbiased (ddof=1) standard deviation over classes, as `torch.std`.

  Args:
    student_logits, teacher_logits: `[B, C]`, C ≥ 2.
    temperature: T > 0 (default 2.0, torchdistill's example config).
    eps: added to the std (default 1e-7).
  Returns:
    `[B]` float32; its mean equals torchdistill `LogitStdKDLoss` ('batchmean') times T².

  Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024.
  Reference: torchdistill `losses.mid_level.LogitStdKDLoss`.

  >>> s = jnp.array([[2., 1., 0.]])
  >>> abs(float(logit_standardized_kd(s, 3.0 * s + 1.0)[0])) < 1e-6
  True
  """
  check_positive("logit_standardized_kd", temperature=temperature)
  check_non_negative("logit_standardized_kd", eps=eps)
  s, t = _student_teacher(student_logits, teacher_logits)

  def standardize(logits):
    centered = logits - jnp.mean(logits, axis=-1, keepdims=True)
    return centered / (eps + jnp.std(logits, axis=-1, ddof=1, keepdims=True))

  return kd(standardize(s), standardize(t), temperature=temperature)


def ofa(student_logits: Array, teacher_logits: Array, labels: Array, *, eps: float = 1.0,
        temperature: float = 1.0) -> Array:
  """OFA adaptive target loss: −Σ_c [(p_t,c + 1[c=y])^ε − 1[c=y]]·log p_s,c per example.

  p = softmax(·/T). With ε = 1 it is the cross-entropy to the teacher; ε > 1 raises the
  target-class weight above p_t,y (OFA uses 1.5 on ImageNet).

  Args:
    student_logits, teacher_logits: `[B, C]`.
    labels: `[B]` int or `[B, C]` soft (argmax gives the target mask, as OFAKD).
    eps: ε > 0 (OFAKD default 1.0; 1.5 for ImageNet).
    temperature: T > 0 (default 1.0).
  Returns:
    `[B]` float32; its mean equals OFAKD `ofa_loss`.

  Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
  Distillation", NeurIPS 2023. Reference: Hao840/OFAKD `distillers/ofa.py` (`ofa_loss`).

  >>> s = jnp.array([[2., 1., 0.]]); t = jnp.array([[1., 2., 0.]])
  >>> round(float(ofa(s, t, jnp.array([0]))[0]), 4)
  1.2529
  """
  check_positive("ofa", eps=eps, temperature=temperature)
  s, t = _student_teacher(student_logits, teacher_logits)
  target = _one_hot_labels(labels, s.shape[-1]).astype(s.dtype)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  pt = jax.nn.softmax(t / temperature, axis=-1)
  weight = (pt + target)**eps - target
  return -jnp.sum(weight * log_ps, axis=-1)


def teacher_class_means(features: Array, labels: Array, num_classes: int, *,
                        mask: Array | None = None) -> Array:
  """Per-class mean of (teacher) embeddings, the class centers of the ND loss.

  Args:
    features: `[N, D]` embeddings, e.g. the teacher's pre-logit features over the train set.
    labels: `[N]` int class ids.
    num_classes: C.
    mask: `[N]` (1 = real row, 0 = padding) or None; padded rows do not count.
  Returns:
    `[C, D]` float32; rows of classes with no example are zero.

  >>> teacher_class_means(jnp.array([[1., 0.], [3., 2.], [5., 5.]]), jnp.array([0, 0, 1]), 3)
  Array([[2., 1.],
         [5., 5.],
         [0., 0.]], dtype=float32)
  """
  features = _float(features)
  weights = jax.nn.one_hot(labels, num_classes, dtype=features.dtype)
  if mask is not None:
    weights = weights * jnp.asarray(mask, features.dtype)[:, None]
  sums = weights.T @ features
  counts = jnp.sum(weights, axis=0)[:, None]
  return sums / jnp.maximum(counts, 1.0)


def nd(student_features: Array, teacher_features: Array, labels: Array,
       class_means: Array) -> Array:
  """ND (norm and direction) loss: 1 − ⟨f_s, ê_y⟩ / max(‖f_s‖, ‖f_t‖) per example.

  ê_y is the unit-normalised teacher class mean of the example's class (`class_means`, loss
  state computed once from the teacher; see `teacher_class_means`). The reference's
  `nd_loss_factor` is left to the caller's loss weight.

  Args:
    student_features: `[B, D]` student embeddings (projected to the teacher's width).
    teacher_features: `[B, D]` teacher embeddings.
    labels: `[B]` int class ids.
    class_means: `[C, D]` teacher class centers (gradient-stopped).
  Returns:
    `[B]` float32; its mean equals the reference `DirectNormLoss` with nd_loss_factor=1.

  Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction",
  arXiv 2305.17007. Reference: `DirectNormLoss` in the authors' ND repository (KD++).

  >>> centers = jnp.array([[2., 0.], [0., 1.]])
  >>> nd(jnp.array([[3., 0.]]), jnp.array([[0., 4.]]), jnp.array([0]), centers)
  Array([0.25], dtype=float32)
  """
  s, t = _student_teacher(student_features, teacher_features)
  centers = jax.lax.stop_gradient(_float(class_means))
  if centers.ndim != 2 or centers.shape[-1] != s.shape[-1]:
    raise ValueError(f"class_means must be [num_classes, {s.shape[-1]}], got {centers.shape}")
  unit_centers = centers / jnp.linalg.norm(centers, axis=-1, keepdims=True)
  direction = jnp.take(unit_centers, _hard_label_ids(labels), axis=0)
  max_norm = jnp.maximum(jnp.linalg.norm(s, axis=-1), jnp.linalg.norm(t, axis=-1))
  return 1.0 - jnp.sum(s * direction, axis=-1) / max_norm


def meal_v2(student_logits: Array, teacher_logits: Array) -> Array:
  """MEAL V2 soft cross-entropy: −Σ_c p̄_c·log softmax(s)_c, p̄ = mean_k softmax(t_k).

  Args:
    student_logits: `[B, C]`.
    teacher_logits: `[B, C]` (one teacher) or `[K, B, C]` (K teachers, stacked).
  Returns:
    `[B]` float32; its mean equals MEAL V2's `KLLoss` on the wrapper's averaged soft labels.
    The adversarial part lives in `kd_jax.losses.meal`.

  Shen & Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet
  without Tricks", NeurIPS-W 2020. Reference: szq0214/MEAL-V2 `extensions/kd_loss.py`
  (`KLLoss`) and `extensions/teacher_wrapper.py`.

  >>> s = jnp.array([[2., 1., 0.]])
  >>> round(float(meal_v2(s, jnp.stack([s, s]))[0]), 4)
  0.8324
  """
  s = _float(student_logits)
  t = jax.lax.stop_gradient(_float(teacher_logits))
  if t.ndim == s.ndim:
    t = t[None]
  if t.shape[1:] != s.shape:
    raise ValueError(f"teacher_logits must be {s.shape} or [K, *{s.shape}], got {t.shape}")
  soft = jnp.mean(jax.nn.softmax(t, axis=-1), axis=0)
  return -jnp.sum(soft * jax.nn.log_softmax(s, axis=-1), axis=-1)


def bdkd(student_logits: Array, teacher_logits: Array, *, temperature: float = 4.0,
         balance: float = 2.0) -> Array:
  """Balanced-divergence KD: T²·[w_f·KL(p_t ‖ p_s) + w_r·KL(p_s ‖ p_t)] with entropy-gap weights.

  Per example, on p = softmax(·/T): if the student is less confident than the teacher
  (H(p_s) > H(p_t)) the mode-seeking reverse KL is up-weighted, (w_f, w_r) = (1, λ);
  otherwise the mass-covering forward KL is, (w_f, w_r) = (λ, 1). The weights are constants
  of the (stopped) entropies, not differentiated.

  NOTE: transcribed from the paper's description; no reference implementation was available
  to check the exact weighting, and `balance` (λ) has no published default.

  Args:
    student_logits, teacher_logits: `[B, C]`.
    temperature: T > 0 (default 4.0).
    balance: λ ≥ 1, the weight given to the favoured divergence.
  Returns:
    `[B]` float32.

  Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation",
  arXiv 2212.12965.

  >>> t = jnp.array([[1., 2., 0.]])
  >>> float(bdkd(t, t)[0])
  0.0
  """
  check_positive("bdkd", temperature=temperature)
  check_hparam("bdkd", "balance", balance, lambda b: b >= 1.0, ">= 1")
  s, t = _student_teacher(student_logits, teacher_logits)
  log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
  entropy_s = -jnp.sum(jnp.exp(log_ps) * log_ps, axis=-1)
  entropy_t = -jnp.sum(jnp.exp(log_pt) * log_pt, axis=-1)
  student_less_confident = jax.lax.stop_gradient(entropy_s > entropy_t)
  w_forward = jnp.where(student_less_confident, 1.0, balance)
  w_reverse = jnp.where(student_less_confident, balance, 1.0)
  return temperature**2 * (w_forward * _kl(log_pt, log_ps) + w_reverse * _kl(log_ps, log_pt))


def soft_teacher_cls(student_logits: Array, teacher_logits: Array, labels: Array, *,
                     mask: Array | None = None, background_class: int = -1) -> Array:
  """Soft Teacher score-weighted classification (ONE SCALAR PER BATCH).

  Σ_i w_i·CE(s_i, y_i) / max(Σ_i w_i, 1), with w_i = 1 for foreground (pseudo-labelled)
  examples and w_i = softmax(t_i)[background] for examples whose label is the background
  class: background proposals count as much as the teacher believes they are background.

  Args:
    student_logits, teacher_logits: `[B, C]` proposal (RoI) logits; one class is background.
    labels: `[B]` int assigned labels (the background class for negative proposals).
    mask: `[B]` (1 = real proposal, 0 = padding) or None; padded proposals get weight 0.
    background_class: index of the background class (default -1, the last, as mmdet); an int
      in [−C, C), which may be traced.
  Returns:
    Scalar float32 (batch-level: normalised by the weight sum, not the count).

  Xu et al., "End-to-End Semi-Supervised Object Detection with Soft Teacher", ICCV 2021.
  Reference: microsoft/SoftTeacher `ssod/models/soft_teacher.py` (`unsup_rcnn_cls_loss`).

  >>> s = jnp.zeros((2, 3)); t = jnp.array([[0., 0., 0.], [0., 0., 9.]])
  >>> round(float(soft_teacher_cls(s, t, jnp.array([0, 2]))), 4)
  1.0986
  """
  s, t = _student_teacher(student_logits, teacher_logits)
  num_classes = s.shape[-1]
  check_hparam("soft_teacher_cls", "background_class", background_class,
               lambda c: (-num_classes <= c) & (c < num_classes),
               f"the index of one of the {num_classes} classes")
  background_class = background_class % num_classes
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be [B] int class ids, got shape {labels.shape}")
  log_ps = jax.nn.log_softmax(s, axis=-1)
  ce = -jnp.take_along_axis(log_ps, labels[:, None], axis=-1)[:, 0]
  background_score = jax.nn.softmax(t, axis=-1)[:, background_class]
  weights = jnp.where(labels == background_class, background_score, 1.0)
  if mask is not None:
    weights = weights * jnp.asarray(mask, weights.dtype)
  return jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1.0)


def skd_instance(student_logits: Array, teacher_logits: Array, *, mask: Array | None = None,
                 temperature: float = 4.0, mode: str = "paper") -> Array:
  """SKD instance term: KL(p_t ‖ p_s) on p = softmax(·/T), per example.

  mode="paper" (default, the paper's Eq. 1 and torchdistill's default): the plain KL, i.e.
  `kd(...) / T²`, for every example. mode="code" (the authors' code): T²·KL on the examples
  whose teacher confidence max softmax(t) is at most the batch median, 0 on the others; the
  median is over the real examples of the batch, so those values depend on the batch.

  Args:
    student_logits, teacher_logits: `[B, C]`.
    mask: `[B]` (1 = real example, 0 = padding) or None; padded examples leave the median and
      get value 0 (in both modes).
    temperature: T > 0 (default 4.0, the authors' code; the paper gives no value).
    mode: "paper" or "code" (static).
  Returns:
    `[B]` float32; its mean over the B examples equals torchdistill
    `SKDInstanceLoss(mode=mode)`.

  Jeong et al., "Streamlined Knowledge Distillation", CVPR 2026.
  Reference: torchdistill `losses.mid_level.SKDInstanceLoss`.

  >>> t = jnp.array([[3., 0.], [1., 0.], [0., 0.]]); s = jnp.zeros((3, 2))
  >>> (skd_instance(s, t, temperature=1.0, mode="code") > 0).tolist()
  [False, True, False]
  >>> (skd_instance(s, t, temperature=1.0) > 0).tolist()
  [True, True, False]
  """
  check_positive("skd_instance", temperature=temperature)
  check_choice("skd_instance", "mode", mode, ("paper", "code"))
  s, t = _student_teacher(student_logits, teacher_logits)
  valid = jnp.ones(s.shape[:1], bool) if mask is None else jnp.asarray(mask) > 0
  kl = kd(s, t, temperature=temperature)
  if mode == "paper":
    return jnp.where(valid, kl / temperature**2, 0.0)
  confidence = jnp.max(jax.nn.softmax(t, axis=-1), axis=-1)
  median = jnp.nanquantile(jnp.where(valid, confidence, jnp.nan), 0.5)
  return jnp.where(valid & (confidence <= median), kl, 0.0)


def skd_direction(student_logits: Array, teacher_logits: Array, *, mask: Array | None = None,
                  tikhonov: float = 0.1, mode: str = "paper") -> Array:
  """SKD direction term (ONE SCALAR PER BATCH): mean_i √(d_iᵀ (Σ + λI)⁻¹ d_i).

  d = G_s − G_t, G = l̂ l̂ᵀ the `[B, B]` Gram matrix of L2-normalised logits, Σ the covariance
  of d's columns (unbiased, over rows). mode="code" follows the authors' code: Gram matrices
  divided by C and the loss times the fraction of classes whose batch-summed teacher
  confidence is at most the median.

  Args:
    student_logits, teacher_logits: `[B, C]`.
    mask: `[B]` (1 = real example, 0 = padding) or None; padded examples leave the Gram matrices, the covariance, the mean and
      the class confidences, so the result equals the loss on the sliced batch.
    tikhonov: λ > 0 (default 0.1).
    mode: "paper" (default, the paper's equation and torchdistill's default) or "code" (static).
  Returns:
    Scalar float32.

  Jeong et al., "Streamlined Knowledge Distillation", CVPR 2026.
  Reference: torchdistill `losses.mid_level.SKDDirectionLoss`.

  >>> t = jnp.array([[1., 2., 0.], [0., 1., 3.], [2., 0., 1.]])
  >>> float(skd_direction(t, t))
  0.0
  """
  check_positive("skd_direction", tikhonov=tikhonov)
  check_choice("skd_direction", "mode", mode, ("paper", "code"))
  s, t = _student_teacher(student_logits, teacher_logits)
  batch, num_classes = s.shape
  m = jnp.ones((batch,), s.dtype) if mask is None else jnp.asarray(mask, s.dtype)
  count = jnp.sum(m)
  scale = num_classes if mode == "code" else 1.0

  def gram(logits):
    unit = logits / jnp.maximum(jnp.linalg.norm(logits, axis=-1, keepdims=True), 1e-12)
    return (unit @ unit.T) / scale * m[:, None] * m[None, :]

  diff = gram(s) - gram(t)
  centered = (diff - jnp.sum(diff, axis=0) / jnp.maximum(count, 1.0)) * m[:, None]
  covariance = centered.T @ centered / jnp.maximum(count - 1.0, 1.0)
  precision = jnp.linalg.inv(covariance + tikhonov * jnp.eye(batch, dtype=s.dtype))
  squared = jnp.einsum("bi,ij,bj->b", diff, precision, diff)
  positive = squared > 0  # sqrt with a finite gradient at 0 (s = t, padded rows)
  distance = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  loss = _masked_batch_mean(distance, mask)
  if mode == "code":
    class_confidence = jnp.sum(jax.nn.softmax(t, axis=-1) * m[:, None], axis=0)
    loss = loss * jnp.mean(class_confidence <= jnp.quantile(class_confidence, 0.5))
  return loss


_TORCHDISTILL = "torchdistill 1.1.5 losses.mid_level"
for _name, _fn, _per_example, _paper, _reference in (
    ("kd", kd, True, "Hinton et al., NIPS-W 2014", f"{_TORCHDISTILL}.KDLoss"),
    ("reverse_kl", reverse_kl, True, "Gu et al. (MiniLLM), ICLR 2024", "none"),
    ("jensen_shannon", jensen_shannon, True, "Lin, IEEE T-IT 1991", "none"),
    ("logit_mse", logit_mse, True, "Kim et al., IJCAI 2021", "jhoon-oh/kd_data"),
    ("dkd", dkd, True, "Zhao et al., CVPR 2022",
     "megvii-research/mdistiller distillers/DKD.py dkd_loss"),
    ("nkd", nkd, True, "Yang et al., ICCV 2023",
     "yzd-v/cls_KD mmcls/models/dis_losses/nkd.py NKDLoss"),
    ("uskd", uskd, True, "Yang et al., ICCV 2023",
     "yzd-v/cls_KD mmcls/models/dis_losses/uskd.py USKDLoss"),
    ("dist", dist, False, "Huang et al., NeurIPS 2022", f"{_TORCHDISTILL}.DISTLoss"),
    ("logit_standardized_kd", logit_standardized_kd, True, "Sun et al., CVPR 2024",
     f"{_TORCHDISTILL}.LogitStdKDLoss"),
    ("ofa", ofa, True, "Hao et al., NeurIPS 2023", "Hao840/OFAKD distillers/ofa.py ofa_loss"),
    ("nd", nd, True, "Wang et al., arXiv 2305.17007", "ND/KD++ DirectNormLoss"),
    ("meal_v2", meal_v2, True, "Shen & Savvides, NeurIPS-W 2020",
     "szq0214/MEAL-V2 extensions/kd_loss.py KLLoss"),
    ("bdkd", bdkd, True, "Amara et al., arXiv 2212.12965", "paper description (no code read)"),
    ("skd_instance", skd_instance, True, "Jeong et al., CVPR 2026",
     f"{_TORCHDISTILL}.SKDInstanceLoss"),
    ("skd_direction", skd_direction, False, "Jeong et al., CVPR 2026",
     f"{_TORCHDISTILL}.SKDDirectionLoss"),
    ("soft_teacher_cls", soft_teacher_cls, False, "Xu et al., ICCV 2021",
     "microsoft/SoftTeacher ssod/models/soft_teacher.py unsup_rcnn_cls_loss"),
):
  register(_name, _fn, per_example=_per_example, kind="logits", paper=_paper,
           reference=_reference)
